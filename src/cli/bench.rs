//! `derma bench`: throughput of the model on one backend, comparable with scripts/bench_torch_cpu.py.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use derma::autograd::Tape;
use derma::nn::{Ctx, EfficientNet, HeadKind, ModelConfig};
use derma::ops::loss::{self, LossKind};
use derma::tensor::Array;
use derma::train::adamw::{AdamW, AdamWConfig};
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;
use serde::Serialize;
use std::time::Instant;

/// Benchmarks, one per backend.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// EfficientNet-B0 on the CPU reference backend: forward (eval) and a full training step.
    Cpu(CpuArgs),
    /// The fused augmentation kernel on a device (cuda or emu): images/s and bytes per image against the copy
    /// bandwidth.
    Data(super::bench_data::DataArgs),
    /// The GPU trainer on a device (cuda or emu): images/s of the captured training step, time per phase, peak
    /// device memory, and the memory-traffic floor of the step program.
    Train(super::bench_train::TrainArgs),
}

/// Options of `derma bench cpu`.
#[derive(Args)]
pub struct CpuArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Input resolution (square).
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Timed runs of each measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The machine a benchmark ran on.
#[derive(Serialize)]
struct Machine {
    cores: usize,
    cpu: String,
}

/// One measurement: every timed run and its median.
#[derive(Serialize)]
struct Timing {
    runs_ms: Vec<f64>,
    median_ms: f64,
    images_per_s: f64,
}

#[derive(Serialize)]
struct CpuReport {
    backend: &'static str,
    model: &'static str,
    batch: usize,
    size: usize,
    steps: usize,
    machine: Machine,
    forward_eval: Timing,
    train_step: Timing,
}

/// Runs a `derma bench` subcommand.
pub fn run_bench(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Cpu(a) => run_cpu(a),
        BenchCmd::Data(a) => super::bench_data::run(a),
        BenchCmd::Train(a) => super::bench_train::run(a),
    }
}

fn machine() -> Machine {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // The first "model name" line of /proc/cpuinfo (Linux); other systems just report the architecture.
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    Machine { cores, cpu }
}

/// One warm-up call, then `steps` timed calls.
fn time(steps: usize, batch: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    f()?;
    let mut runs_ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        runs_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = runs_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    // Same median as Python's statistics.median: the mean of the two middle values for an even count.
    let median_ms = if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 };
    Ok(Timing { runs_ms, median_ms, images_per_s: batch as f64 / (median_ms / 1e3) })
}

fn run_cpu(a: CpuArgs) -> Result<()> {
    if a.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    if a.size < 32 {
        bail!("--size {} is too small for EfficientNet-B0's five stride-2 stages; use 32 or more", a.size);
    }
    let classes = 1000;
    let mut model = EfficientNet::<f32>::new(ModelConfig::b0(classes, HeadKind::Torchvision), 0);
    let mut data_rng = Pcg64::seed_from_u64(0);
    let n = a.batch * a.size * a.size * 3;
    let x = Array::new(&[a.batch, a.size, a.size, 3], (0..n).map(|_| data_rng.random_range(-1.0f32..1.0)).collect())?;
    let targets: Vec<usize> = (0..a.batch).map(|_| data_rng.random_range(0..classes)).collect();
    // The reference script's optimizer: lr 5e-5, weight decay 1e-5.
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 1e-5, ..AdamWConfig::default() })?;
    let lr = 5e-5;
    let mut rng = Pcg64::seed_from_u64(1);

    let forward_eval = time(a.steps, a.batch, || {
        let mut tape = Tape::inference();
        let xv = tape.constant(x.clone());
        let mut ctx = Ctx::eval(&mut rng);
        model.forward(&mut tape, xv, &mut ctx)?;
        Ok(())
    })?;
    let train_step = time(a.steps, a.batch, || {
        let mut tape = Tape::new();
        let xv = tape.constant(x.clone());
        let mut ctx = Ctx::train(&mut rng);
        let logits = model.forward(&mut tape, xv, &mut ctx)?;
        let l = loss::loss(&mut tape, logits, &targets, None, &LossKind::CrossEntropy)?;
        model.params.zero_grad();
        tape.backward(l, &mut model.params)?;
        // The tape shares the parameters' storage: gone, the step writes them in place.
        drop(tape);
        for (p, g) in model.params.params_and_grads_mut() {
            opt.step_one(&p.name, &mut std::sync::Arc::make_mut(&mut p.value).data, g, lr)?;
        }
        Ok(())
    })?;

    let report = CpuReport {
        backend: "cpu-reference",
        model: "efficientnet_b0 (torchvision head, 1000 classes)",
        batch: a.batch,
        size: a.size,
        steps: a.steps,
        machine: machine(),
        forward_eval,
        train_step,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let m = &report.machine;
        println!(
            "derma CPU reference on {} ({} cores), EfficientNet-B0, batch {}, {}x{}, fp32, median of {}:",
            m.cpu, m.cores, a.batch, a.size, a.size, a.steps
        );
        for (name, t) in [("forward (eval)", &report.forward_eval), ("training step", &report.train_step)] {
            println!("  {name:<15} {:8.2} images/s  {:9.1} ms/step", t.images_per_s, t.median_ms);
        }
    }
    Ok(())
}
