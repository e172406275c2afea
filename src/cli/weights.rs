//! `derma weights`: fetch pretrained weights ahead of time (for `--pretrained imagenet`).

use anyhow::Result;
use clap::{Args, Subcommand};
use derma::io::fetch::{self, FetchOptions, KNOWN};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum WeightsCmd {
    /// Download named weights into the cache (verified by SHA-256, resumable) and print their path.
    Fetch(FetchArgs),
    /// The named weights, their files and whether each is in the cache.
    List(ListArgs),
}

#[derive(Args)]
pub struct FetchArgs {
    /// `imagenet` (torchvision's efficientnet_b0_rwightman-7f5810bc.pth), or any file name in torchvision's
    /// `name-<sha256 prefix>.pth` form.
    #[arg(default_value = "imagenet")]
    name: String,
    /// Cache folder [default: $DERMA_WEIGHTS_DIR, else ~/.cache/derma/weights].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

fn options(cache_dir: Option<PathBuf>) -> Result<FetchOptions> {
    let mut opts = FetchOptions::from_env()?;
    if let Some(d) = cache_dir {
        opts.cache_dir = d;
    }
    Ok(opts)
}

pub fn run_weights(cmd: WeightsCmd) -> Result<()> {
    match cmd {
        WeightsCmd::Fetch(a) => {
            let mut opts = options(a.cache_dir)?;
            opts.progress = !a.quiet;
            let remote = fetch::lookup(&a.name)?;
            let path = fetch::ensure(&remote, &opts)?;
            eprintln!("{} is in the cache (SHA-256 starts with {})", remote.file, remote.hash_prefix);
            println!("{}", path.display());
            Ok(())
        }
        WeightsCmd::List(a) => {
            let opts = options(a.cache_dir)?;
            for k in KNOWN {
                let cached = opts.cache_dir.join(k.file);
                let state = if cached.is_file() { cached.display().to_string() } else { "not fetched".into() };
                println!("{:<10} {}  {}\n           {}", k.name, k.file, state, k.about);
            }
            Ok(())
        }
    }
}
