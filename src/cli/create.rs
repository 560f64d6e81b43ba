//! `snapfs create <dir> -o <snapshot>`: captures a plain directory into a new
//! seekable, self-indexed snapshot (tar, tar.gz or tar.zst) and prints one line.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use crate::error::{Error, Result};
use crate::snapshot::dir;
use crate::snapshot::write::{OutputCompression, SnapshotWriter, WriterOptions};

/// Output container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Plain tar.
    Tar,
    /// tar.gz (independent gzip members).
    Gz,
    /// tar.zst (independent zstd frames).
    Zst,
}

/// Arguments of `snapfs create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The directory to capture.
    dir: PathBuf,
    /// The snapshot to write (.tar, .tar.gz/.tgz or .tar.zst/.tzst).
    #[arg(short, long)]
    output: PathBuf,
    /// Output format (default: from the output's extension).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Compression level (gzip 0-9, default 6; zstd 1-22, default 3).
    #[arg(long)]
    level: Option<i32>,
    /// Uncompressed bytes per independently compressed chunk (seek point spacing).
    #[arg(long, default_value = "1M", value_parser = crate::cli::parse_size)]
    chunk: u64,
}

/// The format an output name implies.
pub(super) fn format_of(out: &Path) -> Option<Format> {
    let name = out.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".tar") {
        Some(Format::Tar)
    } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(Format::Gz)
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        Some(Format::Zst)
    } else {
        None
    }
}

pub(super) fn compression(format: Format, level: Option<i32>) -> Result<OutputCompression> {
    Ok(match format {
        Format::Tar => {
            if level.is_some() {
                return Err(Error::Usage("--level needs a compressed format".into()));
            }
            OutputCompression::None
        }
        Format::Gz => {
            let level = level.unwrap_or(6);
            let level = u32::try_from(level)
                .ok()
                .filter(|l| *l <= 9)
                .ok_or_else(|| Error::Usage(format!("gzip level {level} is not in 0..=9")))?;
            OutputCompression::Gzip { level }
        }
        Format::Zst => {
            let level = level.unwrap_or(3);
            if !(1..=22).contains(&level) {
                return Err(Error::Usage(format!("zstd level {level} is not in 1..=22")));
            }
            OutputCompression::Zstd { level }
        }
    })
}

/// Runs `snapfs create`.
pub fn run(args: CreateArgs) -> Result<ExitCode> {
    let format = match args.format.or_else(|| format_of(&args.output)) {
        Some(f) => f,
        None => {
            return Err(Error::Usage(format!(
                "{}: cannot tell the format from the name; use .tar, .tar.gz, .tgz, .tar.zst, \
                 .tzst or --format",
                args.output.display()
            )))
        }
    };
    let comp = compression(format, args.level)?;
    let scan = dir::scan(&args.dir)?;
    let opts = WriterOptions {
        compression: comp,
        chunk_bytes: args.chunk,
        progress: true,
        expected_bytes: Some(scan.totals.file_bytes),
    };
    let mut writer = SnapshotWriter::create(&args.output, opts)?;
    // Leave the snapshot itself out when it is written inside the directory.
    let mut exclude = Vec::new();
    for p in [writer.temp_path(), args.output.as_path()] {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            exclude.push((m.dev(), m.ino()));
        }
    }
    scan.write_to(&mut writer, &exclude)?;
    let s = writer.finish()?;
    let mb_s = if s.seconds > 0.0 {
        s.stream_bytes as f64 / 1e6 / s.seconds
    } else {
        0.0
    };
    println!(
        "{}  sha256:{}  {} entries  {} bytes ({:.1} MiB, {:.1} MiB uncompressed)  {:.2} s  {:.1} MB/s",
        s.path.display(),
        s.sha256,
        s.entries,
        s.bytes,
        s.bytes as f64 / (1 << 20) as f64,
        s.stream_bytes as f64 / (1 << 20) as f64,
        s.seconds,
        mb_s
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_names() {
        assert_eq!(format_of(Path::new("a/x.tar")), Some(Format::Tar));
        assert_eq!(format_of(Path::new("x.TAR.GZ")), Some(Format::Gz));
        assert_eq!(format_of(Path::new("x.tgz")), Some(Format::Gz));
        assert_eq!(format_of(Path::new("x.tar.zst")), Some(Format::Zst));
        assert_eq!(format_of(Path::new("x.tzst")), Some(Format::Zst));
        assert_eq!(format_of(Path::new("x.zip")), None);
        assert!(compression(Format::Gz, Some(10)).is_err());
        assert!(compression(Format::Tar, Some(1)).is_err());
        assert_eq!(
            compression(Format::Zst, None).unwrap(),
            OutputCompression::Zstd { level: 3 }
        );
    }
}
