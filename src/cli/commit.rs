//! `snapfs commit`: cut a new snapshot from a writable view's upper directory — a delta
//! layer (default) or, with `--full`, a flattened standalone snapshot of the view.
//!
//! Consistency: the cut reads the upper directory while holding its lock, the same
//! lock a mounted view's daemon holds for as long as it serves it. A cut of a view
//! that is mounted is therefore refused with a clear message (unmount first, then
//! cut): it never mixes states of a view that is being written.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::error::{Error, Result};
use crate::index::build::BuildOptions;
use crate::index::tree::Tree;
use crate::snapshot::cut;
use crate::snapshot::write::{SnapshotWriter, WriterOptions};
use crate::upper::UpperTree;

use super::create::{compression, format_of, Format};

/// Arguments of `snapfs commit`.
#[derive(Args, Debug)]
pub struct CommitArgs {
    /// The parent archives of the view, bottom first (as given to `snapfs mount`).
    #[arg(required = true)]
    archives: Vec<PathBuf>,
    /// The view's upper directory (as given to `snapfs mount --upper`).
    #[arg(long, value_name = "DIR")]
    upper: PathBuf,
    /// The snapshot to write (.tar, .tar.gz/.tgz or .tar.zst/.tzst).
    #[arg(short, long)]
    output: PathBuf,
    /// Write the whole view as one standalone snapshot instead of a delta layer.
    #[arg(long)]
    full: bool,
    /// Output format (default: from the output's extension).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Compression level (gzip 0-9, default 6; zstd 1-22, default 3).
    #[arg(long)]
    level: Option<i32>,
    /// Uncompressed bytes per independently compressed chunk (seek point spacing).
    #[arg(long, default_value = "4M", value_parser = crate::cli::parse_size)]
    chunk: u64,
}

/// Runs `snapfs commit`.
pub fn run(args: CommitArgs) -> Result<ExitCode> {
    for a in &args.archives {
        super::check_archive(a)?;
    }
    if !args.upper.join("format").exists() {
        return Err(Error::NotA {
            path: args.upper.clone(),
            expected: "snapfs upper dir",
            detail: Some("it has no format file".into()),
        });
    }
    let format = args.format.or_else(|| format_of(&args.output)).ok_or_else(|| {
        Error::Usage(format!(
            "{}: cannot tell the format from the name; use .tar, .tar.gz, .tgz, .tar.zst, .tzst or --format",
            args.output.display()
        ))
    })?;
    let comp = compression(format, args.level)?;
    let lower = crate::view::open_stack(&args.archives, &BuildOptions::default(), 256 << 20)?;
    let view = UpperTree::new(lower, &args.upper).map_err(|e| match e {
        Error::InUse { path, .. } => Error::InUse {
            path,
            holder: "a mounted view; unmount it first (a cut never reads a view while it is being written)".into(),
        },
        other => other,
    })?;
    let changes = crate::upper::changes(&args.upper)?;
    let view: Arc<dyn Tree> = Arc::new(view);
    let opts = WriterOptions {
        compression: comp,
        chunk_bytes: args.chunk,
        progress: true,
        expected_bytes: None,
    };
    let mut writer = SnapshotWriter::create(&args.output, opts)?;
    if args.full {
        cut::cut_full(view, &mut writer)?;
    } else {
        cut::cut_delta(view, &changes, &mut writer)?;
    }
    let s = writer.finish()?;
    println!(
        "{} ({}): sha256:{}  {} entries  {} bytes ({:.1} MiB uncompressed)  {:.2} s",
        s.path.display(),
        if args.full {
            "full snapshot"
        } else {
            "delta layer"
        },
        s.sha256,
        s.entries,
        s.bytes,
        s.stream_bytes as f64 / (1 << 20) as f64,
        s.seconds,
    );
    Ok(ExitCode::SUCCESS)
}
