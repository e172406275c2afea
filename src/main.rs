//! The `derma` command line.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use derma::cuda::{self, DeviceRequest};
use derma::io;
use derma::nn::summary::{render, summarize};
use derma::nn::{EfficientNet, HeadKind, ModelConfig, Variant};
use derma::ops::loss::LossKind;
use derma::tools::forward;
use derma::train::config::{LossKind as LossArg, Precision};
use std::path::PathBuf;

mod cli;

#[derive(Parser)]
#[command(name = "derma", version, about = "EfficientNet-B0 training for skin-lesion classification (ISIC 2019)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value per process, parsed once: the size difference between variants costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Inspect or convert models.
    #[command(subcommand)]
    Model(ModelCmd),
    /// One forward (and in train mode one backward) pass on given inputs, written to a safetensors file.
    Forward(ForwardArgs),
    /// Verify a dataset folder, build the decode cache, split train/validation and compute class weights.
    Prepare(cli::data::PrepareArgs),
    /// Write a synthetic dataset in the ISIC 2019 layout.
    Synth(cli::data::SynthArgs),
    /// Train the seed's recipe (without --data: a short run on embedded synthetic data).
    Train(cli::train::TrainArgs),
    /// What this machine offers for CUDA: driver, GPUs, cuBLAS/cuDNN, the kernels built in; --resources prints
    /// ptxas's per-kernel report, --bandwidth measures copy bandwidth.
    GpuInfo(derma::cuda::cli::GpuInfoArgs),
    /// Score a checkpoint on a labelled dataset: accuracy, balanced accuracy, per-class metrics, ROC AUC, confusion.
    Eval(cli::eval::EvalArgs),
    /// Class probabilities for image files (table, JSON or the ISIC 2019 submission CSV).
    Predict(cli::predict::PredictArgs),
    /// Throughput benchmarks (images/s for inference and a training step).
    #[command(subcommand)]
    Bench(cli::bench::BenchCmd),
    /// Pretrained weights: `derma weights fetch` downloads torchvision's ImageNet weights for `--pretrained
    /// imagenet` ahead of time.
    #[command(subcommand)]
    Weights(cli::weights::WeightsCmd),
    /// Every CUDA kernel, the cuBLASLt GEMM and the cuDNN conv against the CPU reference (f32 and f16, forward and
    /// backward, fresh random inputs) on a GPU or, with --device emu, on the emulated device; exits non-zero on any
    /// mismatch or without a usable device.
    Check(derma::tools::check::CheckArgs),
    /// Record one training step on the emulated device and print its launches, the bytes each reads and writes,
    /// the arena peak and the bytes moved per image (nothing runs).
    Plan(cli::plan::PlanArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Layer table, parameter counts and multiply-adds.
    Summary(SummaryArgs),
    /// Convert weights (.pth, seed checkpoint or .safetensors) to .safetensors with torchvision's names.
    Export(ExportArgs),
}

#[derive(Args)]
struct SummaryArgs {
    #[arg(long, value_enum, default_value = "torchvision")]
    head: HeadKind,
    #[arg(long, default_value_t = 1000)]
    classes: usize,
    #[arg(long, value_enum, default_value = "b0")]
    variant: Variant,
    /// Input resolution for the multiply-add count.
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[arg(long)]
    weights: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ForwardArgs {
    /// Model weights: torch.save .pth (state dict or the seed's checkpoint) or .safetensors.
    #[arg(long)]
    weights: PathBuf,
    /// safetensors with `images` f32 [N,3,H,W], optional `targets` i64 [N] and `alpha` f32 [C].
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "eval")]
    mode: forward::Mode,
    #[arg(long, default_value = "auto", value_parser = cuda::parse_device, help = cuda::DEVICE_HELP)]
    device: DeviceRequest,
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    #[arg(long, value_enum, default_value = "focal")]
    loss: LossArg,
    #[arg(long, default_value_t = 2.0)]
    gamma: f64,
}

/// The model of any weight file: derma's training checkpoints (their optimizer moments set aside), the seed's
/// checkpoints, torchvision state dicts and safetensors, through the one loader `eval` and `predict` use.
fn load_model(path: &std::path::Path) -> Result<EfficientNet<f32>> {
    Ok(derma::train::checkpoint::load(path)?.model)
}

fn run_forward(a: ForwardArgs) -> Result<()> {
    let selected = cuda::select(a.device)?;
    if a.precision == Precision::F16 && selected == cuda::Selected::Cpu {
        bail!("--precision f16 needs a CUDA device (--device cuda or emu); the CPU reference computes in f32");
    }
    let mut model = load_model(&a.weights)?;
    let inputs = io::load_safetensors(&a.input).with_context(|| format!("reading {}", a.input.display()))?.0;
    for (name, count) in forward::non_finite_inputs(inputs.entries()) {
        eprintln!(
            "warning: {}: `{name}` holds {count} NaN or infinite values; they propagate to the outputs as in PyTorch",
            a.input.display()
        );
    }
    let kind = match a.loss {
        LossArg::Focal => LossKind::Focal { gamma: a.gamma },
        LossArg::Ce => LossKind::CrossEntropy,
    };
    let out = match selected {
        cuda::Selected::Cpu => forward::run(&mut model, inputs.entries(), a.mode, &kind),
        device => {
            let gpu = std::sync::Arc::new(cuda::Gpu::open(&device)?);
            let precision = match a.precision {
                Precision::F32 => derma::backend::cuda::Precision::F32,
                Precision::F16 => derma::backend::cuda::Precision::F16,
            };
            forward::run_device(&mut model, inputs.entries(), a.mode, &kind, gpu, precision)
        }
    }
    .with_context(|| format!("running {} on {}", a.weights.display(), a.input.display()))?;
    io::save_safetensors(&a.output, &out.into_iter().collect(), None)
        .with_context(|| format!("writing {}", a.output.display()))
}

fn run_model(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Summary(a) => {
            let cfg = ModelConfig::variant(a.variant, a.classes, a.head);
            check_summary_size(&a, &cfg)?;
            let m = EfficientNet::<f32>::new(cfg, 0);
            let s = summarize(&m, a.size);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", render(&s));
            }
            Ok(())
        }
        ModelCmd::Export(a) => {
            let model = load_model(&a.weights)?;
            let sd = model.state_dict();
            io::save_safetensors(&a.out, &sd, None).with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!("wrote {} tensors to {}", sd.len(), a.out.display());
            Ok(())
        }
    }
}

/// Refuses a summary whose model could not be built in memory, before building it.
fn check_summary_size(a: &SummaryArgs, cfg: &ModelConfig) -> Result<()> {
    if a.classes == 0 {
        bail!("--classes must be at least 1");
    }
    derma::data::check_image_side(a.size, "--size")?;
    let params = derma::nn::summary::parameter_count(cfg);
    let asked = format!("a {:?} model with --classes {} ({params} parameters)", a.variant, a.classes);
    derma::data::memory::check_fits(&derma::data::memory::model_estimate(params, asked), "--classes")
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model(c) => run_model(c),
        Command::Forward(a) => run_forward(a),
        Command::Prepare(a) => cli::data::run_prepare(a),
        Command::Synth(a) => cli::data::run_synth(a),
        Command::Train(a) => cli::train::run_train(a),
        Command::GpuInfo(a) => derma::cuda::cli::run(&a),
        Command::Eval(a) => cli::eval::run_eval(a),
        Command::Predict(a) => cli::predict::run_predict(a),
        Command::Bench(c) => cli::bench::run_bench(c),
        Command::Check(a) => derma::tools::check::run(&a),
        Command::Weights(c) => cli::weights::run_weights(c),
        Command::Plan(a) => cli::plan::run_plan(a),
    };
    if let Err(e) = result {
        // A decode stopped by Ctrl-C is no failure: its work is kept and the same command resumes it.
        if e.downcast_ref::<derma::data::DecodeInterrupted>().is_some() {
            eprintln!("{e:#}");
            std::process::exit(derma::interrupt::EXIT_INTERRUPTED);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
