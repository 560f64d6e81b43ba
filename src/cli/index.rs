//! `snapfs index`: build or refresh an archive's index (or every layer's index of an
//! image, under one progress bar) and print a summary.

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
    /// The archive (tar, tar.gz, tar.zst, tar.xz or tar.bz2) or image (OCI layout, OCI
    /// archive, docker save); detected from its content.
    archive: PathBuf,
    #[command(flatten)]
    select: super::ImageArgs,
    /// Uncompressed bytes between seek points of compressed archives.
    #[arg(long, value_parser = super::parse_size, default_value = "1M")]
    span: u64,
    /// Rebuild even if a valid index exists.
    #[arg(long)]
    force: bool,
    /// For a remote archive (s3://, http(s)://): upload the index as the sidecar
    /// object KEY.snapfs-idx, which other hosts use (after checking it against the
    /// object's ETag and size) instead of indexing it themselves.
    #[arg(long)]
    publish: bool,
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

/// Loads or builds the indexes of `archives` one after the other under one progress
/// bar (a terminal only), calling `each` with every index as it is ready.
pub fn obtain_each(
    archives: &[&Archive],
    labels: &[String],
    opts: &BuildOptions,
    required_span: Option<u64>,
    force: bool,
    mut each: impl FnMut(usize, &Index, &Origin) -> Result<()>,
) -> Result<()> {
    let total: u64 = archives.iter().map(|a| a.id.size).sum();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "indexing {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let mut done = 0u64;
    for (i, archive) in archives.iter().enumerate() {
        if let Some(bar) = &bar {
            let label = labels.get(i).cloned().unwrap_or_default();
            bar.set_message(format!("layer {}/{} {label}", i + 1, archives.len()));
        }
        let progress = Progress::default();
        let result = std::thread::scope(|s| {
            let worker =
                s.spawn(|| crate::view::load_index(archive, opts, required_span, force, &progress));
            if let Some(bar) = &bar {
                while !worker.is_finished() {
                    bar.set_position(done + progress.load(Ordering::Relaxed));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            worker.join()
        });
        let (index, origin) = result.unwrap_or_else(|_| {
            Err(crate::error::Error::Internal(
                "indexing thread panicked".into(),
            ))
        })?;
        done += archive.id.size;
        each(i, &index, &origin)?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

fn describe(origin: &Origin) -> (&'static str, String, u64) {
    let (verb, where_) = match origin {
        Origin::Loaded(p) => ("index is up to date", p.display().to_string()),
        Origin::Built(p) => ("indexed", p.display().to_string()),
        Origin::BuiltUnsaved(why) => ("indexed (not saved)", why.clone()),
        Origin::Embedded => ("embedded index is valid", "inside the archive".to_string()),
    };
    let index_bytes = match origin {
        Origin::Loaded(p) | Origin::Built(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        Origin::BuiltUnsaved(_) | Origin::Embedded => 0,
    };
    (verb, where_, index_bytes)
}

/// `snapfs index` of an image: every layer, one bar, one line per layer.
fn run_image(img: &crate::image::Image, args: &IndexArgs, opts: &BuildOptions) -> Result<ExitCode> {
    let start = Instant::now();
    let archives = img
        .layers
        .iter()
        .map(|l| Archive::from_source(l.source.clone()))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Archive> = archives.iter().collect();
    let labels: Vec<String> = img.layers.iter().map(|l| l.label.clone()).collect();
    let n = archives.len();
    let mut stream = 0u64;
    obtain_each(
        &refs,
        &labels,
        opts,
        Some(opts.span_bytes),
        args.force,
        |i, index, origin| {
            let (verb, where_, bytes) = describe(origin);
            stream += index.stream_size;
            println!(
            "layer {}/{n} {}: {verb} ({}, {:.1} MiB stream): {} entries, {} seek points; index {:.1} KiB at {where_}",
            i + 1,
            labels[i],
            archives[i].compression.name(),
            index.stream_size as f64 / 1048576.0,
            index.inodes.len().saturating_sub(1),
            index.table.span_count(),
            bytes as f64 / 1024.0,
        );
            Ok(())
        },
    )?;
    println!(
        "image {}: {n} layers ({:.1} MiB uncompressed) in {:.3} s",
        img.display_name(),
        stream as f64 / 1048576.0,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `snapfs index`.
pub fn run(args: IndexArgs) -> Result<ExitCode> {
    super::check_input(&args.archive)?;
    let opts = BuildOptions {
        span_bytes: args.span.max(64 << 10),
    };
    let remote = crate::source::is_remote(&args.archive);
    if args.publish && !remote {
        return Err(crate::error::Error::Usage(format!(
            "--publish is for remote archives (s3://, http(s)://); {} is local",
            args.archive.display()
        )));
    }
    // A remote object is opened once, for the image probe and as the archive.
    let source = match remote {
        true => Some(crate::source::open(&args.archive)?),
        false => None,
    };
    if !args.publish {
        let select = args.select.select()?;
        let img = match &source {
            Some(s) => crate::image::Image::open_source(&args.archive, s.clone(), &select)?,
            None => crate::image::Image::open(&args.archive, &select)?,
        };
        if let Some(img) = img {
            return run_image(&img, &args, &opts);
        }
    }
    let archive = match source {
        Some(s) => Archive::from_source(s)?,
        None => Archive::open(&args.archive)?,
    };
    let start = Instant::now();
    let (index, origin) = obtain(&archive, &opts, Some(opts.span_bytes), args.force)?;
    let secs = start.elapsed().as_secs_f64();
    let entries = index.inodes.len() - 1;
    let (verb, where_, index_bytes) = describe(&origin);
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
    if args.publish {
        let bytes = crate::index::format::encode(&index);
        archive
            .source
            .publish_index(&bytes)
            .map_err(|message| crate::error::Error::Remote {
                url: archive.path.display().to_string(),
                message,
            })?;
        println!(
            "published: {}{} ({:.1} KiB)",
            archive.path.display(),
            crate::index::store::SUFFIX,
            bytes.len() as f64 / 1024.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
