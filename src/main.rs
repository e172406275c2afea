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
}

fn main() {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {};
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
