//! STUB: `snapfs create <dir> -o <snapshot>` (being written).
#![allow(missing_docs)]
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::error::{Error, Result};

/// Arguments of `snapfs create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The directory to capture.
    dir: PathBuf,
    /// The snapshot to write (.tar, .tar.gz/.tgz or .tar.zst).
    #[arg(short, long)]
    output: PathBuf,
}

/// Runs `snapfs create`.
pub fn run(_args: CreateArgs) -> Result<ExitCode> {
    Err(Error::Usage("snapfs create is not implemented yet".into()))
}
