//! SIGINT and SIGTERM, handled the same way in every phase: the first signal sets a flag that long-running loops
//! (decoding, training) poll, so they stop at the next safe point and keep what they finished; a second signal
//! exits at once. A process that stopped early exits with [`EXIT_INTERRUPTED`] (130, as a shell reports Ctrl-C).

use anyhow::{Context, Result};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

/// Exit status after an interruption (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Installs the handler for SIGINT and SIGTERM (idempotent).
pub fn install() -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = ctrlc::set_handler(|| {
            if REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted twice: exiting without saving");
                std::process::exit(EXIT_INTERRUPTED);
            }
            eprintln!("\ninterrupt: stopping at the next safe point and saving (interrupt again to abort)");
        })
        .context("cannot install the SIGINT/SIGTERM handler");
    });
    result
}

/// Whether an interruption was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks every loop that polls [`requested`] to stop, as a signal would (tests, `--stop-after-steps`).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}
