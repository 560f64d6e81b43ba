//! `snapfs commit`: cut a new snapshot from a writable view's upper directory — a delta
//! layer (default) or, with `--full`, a flattened standalone snapshot of the view.
//!
//! With `--image OUT` (the view's input being one image), the delta becomes a new
//! gzip layer of a new OCI image written at OUT: a layout directory, or an OCI archive
//! when OUT ends in `.tar` (see [`crate::image::write`]).
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
    /// The parent archives or image of the view, bottom first (as given to
    /// `snapfs mount`).
    #[arg(required = true)]
    archives: Vec<PathBuf>,
    /// The image of an image input the view was mounted with (`mount --image REF`).
    #[arg(long = "ref", value_name = "REF")]
    reference: Option<String>,
    /// The platform the view was mounted with (`mount --platform`).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Write a new OCI image: the input image plus the delta as a new gzip layer, as a
    /// layout directory, or an OCI archive if OUT ends in .tar (OUT must not exist).
    #[arg(long = "image", value_name = "OUT")]
    image_out: Option<PathBuf>,
    /// The ref name (`org.opencontainers.image.ref.name`) of the new image [default: the
    /// input's when it is a plain tag, else latest].
    #[arg(long, value_name = "TAG", requires = "image_out")]
    tag: Option<String>,
    /// The view's upper directory (as given to `snapfs mount --upper`).
    #[arg(long, value_name = "DIR")]
    upper: PathBuf,
    /// The snapshot to write (.tar, .tar.gz/.tgz or .tar.zst/.tzst); optional with
    /// --image, where it keeps a copy of the new layer (a .tar.gz).
    #[arg(short, long, required_unless_present = "image_out")]
    output: Option<PathBuf>,
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
    #[arg(long, default_value = "1M", value_parser = crate::cli::parse_size)]
    chunk: u64,
}

/// Runs `snapfs commit`.
pub fn run(args: CommitArgs) -> Result<ExitCode> {
    for a in &args.archives {
        super::check_input(a)?;
    }
    let select = super::ImageArgs {
        reference: args.reference.clone(),
        platform: args.platform.clone(),
    }
    .select()?;
    if !args.upper.join("format").exists() {
        return Err(Error::NotA {
            path: args.upper.clone(),
            expected: "snapfs upper dir",
            detail: Some("it has no format file".into()),
        });
    }
    let inputs = crate::view::resolve(&args.archives, &select)?;
    let image = match (&args.image_out, inputs.as_slice()) {
        (None, _) => None,
        (Some(_), [crate::view::Input::Image(img)]) => Some(img),
        (Some(out), _) => {
            return Err(Error::Usage(format!(
                "commit --image {} needs a view of exactly one image (extra archives cannot be carried into an image)",
                out.display()
            )))
        }
    };
    if image.is_some() && args.full {
        return Err(Error::Usage(
            "--full and --image do not go together: an image gets the delta as a new layer".into(),
        ));
    }
    // With --image and no -o, the delta goes to a temporary file beside OUT.
    let tmp = match (&args.output, &args.image_out) {
        (None, Some(out)) => {
            let parent = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            Some(
                tempfile::Builder::new()
                    .prefix(".snapfs-delta-")
                    .tempdir_in(&parent)
                    .map_err(|e| Error::io("cannot create a temporary directory in", &parent, e))?,
            )
        }
        _ => None,
    };
    let output = match (&args.output, &tmp) {
        (Some(o), _) => o.clone(),
        (None, Some(t)) => t.path().join("layer.tar.gz"),
        (None, None) => return Err(Error::Usage("commit needs -o OUTPUT or --image OUT".into())),
    };
    let format = args.format.or_else(|| format_of(&output)).ok_or_else(|| {
        Error::Usage(format!(
            "{}: cannot tell the format from the name; use .tar, .tar.gz, .tgz, .tar.zst, .tzst or --format",
            output.display()
        ))
    })?;
    if image.is_some() && format != Format::Gz {
        return Err(Error::Usage(format!(
            "{}: the new layer of an image is gzip; name it .tar.gz",
            output.display()
        )));
    }
    let comp = compression(format, args.level)?;
    let lower = crate::view::open_inputs(&inputs, &BuildOptions::default(), 256 << 20)?;
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
    let mut writer = SnapshotWriter::create(&output, opts)?;
    if args.full {
        cut::cut_full(view, &mut writer)?;
    } else {
        cut::cut_delta(view, &changes, &mut writer)?;
    }
    let s = writer.finish()?;
    if let (Some(img), Some(out)) = (image, &args.image_out) {
        let created = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok());
        let opts = crate::image::write::Options {
            tag: args.tag.clone(),
            created,
            created_by: format!("snapfs commit --upper {}", args.upper.display()),
            comment: Some(format!("snapfs {} delta layer", env!("CARGO_PKG_VERSION"))),
        };
        let w = crate::image::write::write_image(img, &s.path, out, &opts)?;
        println!(
            "{} ({}): {} layers, tag {}, manifest {}, config {}; new layer {} (diff_id {}, {} entries)",
            w.path.display(),
            if out.is_dir() { "OCI image layout" } else { "OCI archive" },
            w.layers,
            w.tag,
            w.manifest,
            w.config,
            w.layer,
            w.diff_id,
            s.entries,
        );
        drop(tmp);
        return Ok(ExitCode::SUCCESS);
    }
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
