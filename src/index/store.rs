//! Where indexes live and how they are loaded or rebuilt: `<archive>.snapfs-idx` beside
//! the archive, or under `$XDG_CACHE_HOME/snapfs/` (default `~/.cache/snapfs/`) when the
//! archive's directory is not writable. An index is used only if it decodes, validates
//! and matches the archive's identity and the build options; otherwise it is rebuilt.
//! Also owns the decompressed cache files of streams that cannot be checkpointed.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::archive::{Archive, Progress, SeekTable};
use crate::error::{Error, Result};
use crate::index::build::{build_index, BuildOptions};
use crate::index::{format, Index};

/// Suffix of an index file placed beside its archive.
pub const SUFFIX: &str = ".snapfs-idx";

/// How an index was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Loaded from this file.
    Loaded(PathBuf),
    /// Built now and saved to this file.
    Built(PathBuf),
    /// Built now; could not be saved anywhere (reason).
    BuiltUnsaved(String),
    /// Read from the index embedded in a snapshot written by snapfs.
    Embedded,
}

/// The snapfs cache directory (`$XDG_CACHE_HOME/snapfs` or `~/.cache/snapfs`).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("snapfs")
}

/// The two places an index for `archive` may live, beside first.
pub fn candidates(archive: &Path) -> [PathBuf; 2] {
    let abs = fs::canonicalize(archive).unwrap_or_else(|_| archive.to_path_buf());
    let mut beside = abs.clone().into_os_string();
    beside.push(SUFFIX);
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = crc32fast::hash(abs.as_os_str().as_encoded_bytes());
    [
        PathBuf::from(beside),
        cache_dir().join(format!("{name}.{key:08x}{SUFFIX}")),
    ]
}

/// Loads the index at `path` if it is valid for `archive` (and was built with
/// `required_span`, when given).
pub fn load(path: &Path, archive: &Archive, required_span: Option<u64>) -> Result<Index> {
    let bytes = fs::read(path).map_err(|e| Error::io("cannot read index", path, e))?;
    let index = format::decode(&bytes).map_err(|message| Error::Index {
        path: path.to_path_buf(),
        message,
    })?;
    if index.id != archive.id {
        return Err(Error::Index {
            path: path.to_path_buf(),
            message: "the archive changed since it was indexed".into(),
        });
    }
    if required_span.is_some_and(|s| s != index.span_bytes) {
        return Err(Error::Index {
            path: path.to_path_buf(),
            message: "built with other options".into(),
        });
    }
    Ok(index)
}

/// The path of a current, intact index of `archive`, checked cheaply (header and
/// checksum only; the full validation happens when it is loaded).
pub fn find_current(archive: &Archive) -> Option<PathBuf> {
    candidates(&archive.path).into_iter().find(|p| {
        fs::read(p)
            .ok()
            .and_then(|b| format::peek(&b).ok())
            .is_some_and(|h| h.id == archive.id)
    })
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    // Readable by whoever can read the archive beside it.
    fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Loads a valid index for `archive` or builds (and saves) a new one with `opts`.
pub fn load_or_build(
    archive: &Archive,
    opts: &BuildOptions,
    required_span: Option<u64>,
    force: bool,
    progress: &Progress,
) -> Result<(Index, Origin)> {
    let places = candidates(&archive.path);
    for p in places.iter().filter(|_| !force) {
        if !p.exists() {
            continue;
        }
        match load(p, archive, required_span) {
            Ok(index) => return Ok((index, Origin::Loaded(p.clone()))),
            Err(e) => log::info!("rebuilding: {e}"),
        }
    }
    let index = build_index(archive, opts, progress)?;
    let bytes = format::encode(&index);
    let mut reasons = Vec::new();
    for p in &places {
        match write_atomic(p, &bytes) {
            Ok(()) => return Ok((index, Origin::Built(p.clone()))),
            Err(e) => reasons.push(format!("{}: {e}", p.display())),
        }
    }
    Ok((index, Origin::BuiltUnsaved(reasons.join("; "))))
}

/// Streams whose spans are longer than this are served from a decompressed cache file.
pub const MAX_SPAN: u64 = 64 << 20;

/// For an archive whose stream cannot be checkpointed finely enough, returns the
/// decompressed cache file (creating it once); otherwise `None`.
pub fn cache_file_for(archive: &Archive, index: &Index) -> Result<Option<File>> {
    if index.table.max_span_len() <= MAX_SPAN {
        return Ok(None);
    }
    let [_, cached] = candidates(&archive.path);
    let id = &archive.id;
    let path = cached.with_extension(format!(
        "{:x}-{:x}.data",
        id.mtime_ns,
        id.head_crc ^ id.tail_crc
    ));
    if let Ok(f) = File::open(&path) {
        if f.metadata().map(|m| m.len()).ok() == Some(index.stream_size) {
            return Ok(Some(f));
        }
    }
    log::warn!(
        "{}: the {} stream has a span of {} MiB without a seek point (a single zstd frame or \
         one huge deflate block), so random access would decompress from far back; \
         decompressing it once into {}",
        archive.path.display(),
        index.table.compression().name(),
        index.table.max_span_len() >> 20,
        path.display()
    );
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io("cannot create cache dir", dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io("cannot create cache file in", dir, e))?;
    let written = {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        let n = match &*index.table {
            SeekTable::Zstd(_) => crate::archive::zstd::decompress_all(&archive.file, &mut w),
            SeekTable::Gzip(_) => decompress_gzip_all(&archive.file, &mut w),
            SeekTable::Plain => Ok(0),
        }
        .map_err(|e| {
            Error::archive(
                &archive.path,
                None,
                None,
                format!("decompression failed: {e}"),
            )
        })?;
        w.flush()
            .map_err(|e| Error::io("writing cache file", &path, e))?;
        n
    };
    if written != index.stream_size {
        return Err(Error::archive(
            &archive.path,
            None,
            None,
            "decompressed size differs from the index",
        ));
    }
    let file = tmp
        .persist(&path)
        .map_err(|e| Error::io("cannot save cache file", &path, e.error))?;
    Ok(Some(file))
}

fn decompress_gzip_all(file: &File, out: &mut dyn Write) -> std::io::Result<u64> {
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    std::io::copy(&mut flate2::read::MultiGzDecoder::new(reader), out)
}
