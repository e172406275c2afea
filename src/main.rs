//! The `derma` command line.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "derma", version, about = "EfficientNet-B0 training for skin-lesion classification (ISIC 2019)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    // Subcommands are added by each module (data: prepare, synth; train: train, eval, predict; ...).
    /// What this machine offers for CUDA: driver, GPUs, cuBLAS/cuDNN, the kernels built in; --resources prints
    /// ptxas's per-kernel report, --bandwidth measures copy bandwidth.
    GpuInfo(derma::cuda::cli::GpuInfoArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::GpuInfo(args) => derma::cuda::cli::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
