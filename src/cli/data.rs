//! `derma prepare` and `derma synth`.

use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct PrepareArgs {
    /// Dataset folder: ISIC 2019 layout (ISIC_2019_Training_GroundTruth.csv, ISIC_2019_Training_Input/) or
    /// plain layout (labels.csv with image,label[,lesion_id] and images/).
    #[arg(long)]
    data: PathBuf,
    /// Cache folder [default: <DATA>/.derma-cache-<SIZE>].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Side of the cached square images in pixels.
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// Fraction of each class put in the validation split.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long)]
    json: bool,
    /// No progress bar, and with --json no warnings on stderr (they stay in the report and the JSON).
    #[arg(long)]
    quiet: bool,
    /// Stop decoding after this many images, as on Ctrl-C (for testing resumption).
    #[arg(long, hide = true)]
    stop_after_decodes: Option<usize>,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Number of regular images.
    #[arg(long, default_value_t = 400)]
    n: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Add fault rows (missing, empty, truncated, undecodable files; bad labels; a duplicate id) and unusual
    /// but valid files (PNG named .jpg, grayscale, CMYK, progressive, 8x8).
    #[arg(long)]
    faults: bool,
    /// Image size WxH.
    #[arg(long, default_value = "600x450")]
    size: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_prepare(a: PrepareArgs) -> anyhow::Result<()> {
    derma::interrupt::install()?;
    let opts = derma::data::PrepareOptions {
        data: a.data,
        cache: a.cache,
        size: a.size,
        val_fraction: a.val_fraction,
        seed: a.seed,
        quiet: a.quiet || a.json,
        // The text report lists the warnings itself.
        warn: a.json && !a.quiet,
        stop_after_decodes: a.stop_after_decodes,
    };
    let prepared = derma::data::prepare(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&prepared.summary)?);
    } else {
        print!("{}", prepared.summary.to_text());
    }
    Ok(())
}

pub fn run_synth(a: SynthArgs) -> anyhow::Result<()> {
    let (w, h) = a
        .size
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--size must look like 600x450, got {:?}", a.size))?;
    let opts =
        derma::data::synth::SynthOptions { out: a.out, n: a.n, seed: a.seed, faults: a.faults, width: w, height: h };
    let s = derma::data::synth::synth(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "wrote {} rows to {} ({} usable expected, {} lesions, {} fault rows); per class {:?}",
            s.rows,
            s.out,
            s.expected_usable,
            s.lesions,
            s.faults.len(),
            s.class_counts
        );
    }
    Ok(())
}
