//! `snapfs index`: build or refresh an archive's index and print a summary.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use crate::archive::{Archive, Progress};
use crate::error::Result;
use crate::index::build::BuildOptions;
use crate::index::store::Origin;
use crate::index::Index;

/// Arguments of `snapfs index`.
#[derive(Args, Debug)]
pub struct IndexArgs {
    /// The archive (tar, tar.gz, tar.zst, tar.xz or tar.bz2; detected from its bytes).
    archive: PathBuf,
    /// Uncompressed bytes between seek points of compressed archives.
    #[arg(long, value_parser = super::parse_size, default_value = "4M")]
    span: u64,
    /// Rebuild even if a valid index exists.
    #[arg(long)]
    force: bool,
}

/// Loads or builds the index of `archive`, with a progress bar on a terminal.
pub fn obtain(
    archive: &Archive,
    opts: &BuildOptions,
    required_span: Option<u64>,
    force: bool,
) -> Result<(Index, Origin)> {
    let progress = Progress::default();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(archive.id.size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "indexing {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(archive.path.display().to_string());
        bar
    });
    let result = std::thread::scope(|s| {
        let worker =
            s.spawn(|| crate::view::load_index(archive, opts, required_span, force, &progress));
        if let Some(bar) = &bar {
            while !worker.is_finished() {
                bar.set_position(progress.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        worker.join()
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result.unwrap_or_else(|_| {
        Err(crate::error::Error::Internal(
            "indexing thread panicked".into(),
        ))
    })
}

/// Runs `snapfs index`.
pub fn run(args: IndexArgs) -> Result<ExitCode> {
    super::check_archive(&args.archive)?;
    let archive = Archive::open(&args.archive)?;
    let opts = BuildOptions {
        span_bytes: args.span.max(64 << 10),
    };
    let start = Instant::now();
    let (index, origin) = obtain(&archive, &opts, Some(opts.span_bytes), args.force)?;
    let secs = start.elapsed().as_secs_f64();
    let entries = index.inodes.len() - 1;
    let (verb, where_) = match &origin {
        Origin::Loaded(p) => ("index is up to date", p.display().to_string()),
        Origin::Built(p) => ("indexed", p.display().to_string()),
        Origin::BuiltUnsaved(why) => ("indexed (not saved)", why.clone()),
        Origin::Embedded => ("embedded index is valid", "inside the archive".to_string()),
    };
    let index_bytes = match &origin {
        Origin::Loaded(p) | Origin::Built(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        Origin::BuiltUnsaved(_) | Origin::Embedded => 0,
    };
    println!(
        "{verb}: {} ({}, {:.1} MiB stream): {entries} entries, {} skipped, {} seek points, in {secs:.3} s ({:.0} MB/s); index {:.1} KiB at {where_}; {:.0} bytes/entry in memory",
        archive.path.display(),
        archive.compression.name(),
        index.stream_size as f64 / 1048576.0,
        index.skipped,
        index.table.span_count(),
        archive.id.size as f64 / 1e6 / secs.max(1e-9),
        index_bytes as f64 / 1024.0,
        index.memory_bytes() as f64 / (entries.max(1)) as f64,
    );
    Ok(ExitCode::SUCCESS)
}
