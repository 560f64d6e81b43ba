//! Where indexes live and how they are loaded or rebuilt: `<archive>.snapfs-idx` beside
//! a local archive, or under `$XDG_CACHE_HOME/snapfs/` (default `~/.cache/snapfs/`)
//! when the archive's directory is not writable or the archive has no directory of its
//! own (a layer blob, keyed by its digest). An index is used only if it decodes,
//! validates and matches the archive's identity and the build options; otherwise it is
//! rebuilt. Also owns the decompressed cache files of streams that cannot be
//! checkpointed.
//!
//! An index file is a trust boundary: it decides what a mount shows. A sidecar beside
//! the archive is used only if it, and its directory, are owned by the mounting user
//! or root and writable by nobody else (as git's `safe.directory` and ssh's key checks
//! do); any other is ignored with a log line and the index is built in the user's
//! cache dir instead.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::archive::{Archive, Progress, SeekTable};
use crate::error::{Error, Result};
use crate::index::build::{build_index, BuildOptions};
use crate::index::{format, Index};
use crate::source::IndexHome;

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

/// The places an index for `archive` may live, in the order they are tried: beside a
/// local archive (if that place can be trusted, see the module doc), then the cache
/// dir.
pub fn candidates(archive: &Archive) -> Vec<PathBuf> {
    let mut out = Vec::with_capacity(2);
    match archive.source.index_home() {
        IndexHome::Beside(path) => {
            let abs = fs::canonicalize(&path).unwrap_or(path);
            let mut beside = abs.clone().into_os_string();
            beside.push(SUFFIX);
            let beside = PathBuf::from(beside);
            match untrusted(&beside) {
                None => out.push(beside),
                Some(why) => say_ignored(&beside, &why),
            }
            let name = abs
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let key = crc32fast::hash(abs.as_os_str().as_encoded_bytes());
            out.push(cache_dir().join(format!("{name}.{key:08x}{SUFFIX}")));
        }
        IndexHome::Keyed(key) => out.push(cache_dir().join(format!("{key}{SUFFIX}"))),
    }
    out
}

/// Logs, once per process and place, that an index place is not used: a warning if
/// an index file is there (someone may have meant it to be used).
fn say_ignored(place: &Path, why: &str) {
    static SAID: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.iter().any(|p| p == place) {
        return;
    }
    said.push(place.to_path_buf());
    if place.exists() {
        log::warn!(
            "ignoring the index {}: {why}; indexing into the cache dir instead",
            place.display()
        );
    } else {
        log::debug!("not keeping an index at {}: {why}", place.display());
    }
}

/// Why an index at `path` (existing or to be written) cannot be trusted: the file or
/// its directory is owned by another user than this one or root, or writable by group
/// or others. `None` if it can be.
pub fn untrusted(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let check = |p: &Path, what: &str| -> Option<String> {
        let m = fs::symlink_metadata(p).ok()?;
        if m.file_type().is_symlink() {
            return Some(format!("the {what} is a symlink"));
        }
        if m.uid() != euid && m.uid() != 0 {
            return Some(format!("the {what} is owned by uid {}", m.uid()));
        }
        // A sticky directory (like /tmp) protects entries from other users.
        let sticky_dir = m.is_dir() && m.mode() & libc::S_ISVTX != 0;
        if m.mode() & 0o022 != 0 && !sticky_dir {
            return Some(format!(
                "the {what} is writable by {} (mode {:o})",
                if m.mode() & 0o002 != 0 {
                    "others"
                } else {
                    "its group"
                },
                m.mode() & 0o7777
            ));
        }
        None
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check(path, "index file").or_else(|| check(dir, "directory"))
}

/// Loads the index at `path` if it is valid for `archive` (and was built with
/// `required_span`, when given).
pub fn load(path: &Path, archive: &Archive, required_span: Option<u64>) -> Result<Index> {
    let bytes = IndexBytes::open(path).map_err(|e| Error::io("cannot read index", path, e))?;
    let index = match &bytes {
        IndexBytes::Mapped(map, dev, ino) => format::decode_mapped(map, path).inspect(|i| {
            // Opened: tree walks read ahead again.
            let _ = map.advise(memmap2::Advice::Normal);
            if let Some(l) = &i.lazy {
                l.set_file_id(*dev, *ino);
            }
        }),
        IndexBytes::Read(v) => format::decode(v),
    }
    .map_err(|message| Error::Index {
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

/// The bytes of an index file: mapped when nobody but this user (or root) can write
/// the file, read into memory otherwise.
///
/// A mapped index is served in place for as long as the mount lives (its records are
/// not copied, see `records`), but a mapped file that another process truncates
/// kills the reader with SIGBUS. snapfs itself only ever replaces index files by
/// rename, which leaves a mapping intact; so a file only this user and root can
/// write is safe to map, and any other is read.
enum IndexBytes {
    /// The mapping, and the file's `st_dev` and `st_ino`.
    Mapped(std::sync::Arc<memmap2::Mmap>, u64, u64),
    Read(Vec<u8>),
}

impl IndexBytes {
    fn open(path: &Path) -> std::io::Result<IndexBytes> {
        use std::os::unix::fs::MetadataExt;
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let private = (meta.uid() == euid || meta.uid() == 0) && meta.mode() & 0o022 == 0;
        if private && meta.is_file() && meta.len() > 0 {
            // SAFETY: only this user and root can change the file, and snapfs replaces
            // it only by rename (see the type's doc).
            let map = unsafe { memmap2::Mmap::map(&file) }?;
            // Not read ahead while it is opened: the open reads the header, the block
            // checksums, the root's records and the seek table's head, a few dozen
            // KiB at both ends. Read ahead, each of those faults would read up to
            // MiBs around it (the whole 12 MiB index of 100k entries, at 6-10 ms of
            // a warm mount with caches dropped). [`load`] turns read-ahead back on
            // for the tree walks that follow.
            let _ = map.advise(memmap2::Advice::Random);
            let map = std::sync::Arc::new(map);
            return Ok(IndexBytes::Mapped(map, meta.dev(), meta.ino()));
        }
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut v)?;
        Ok(IndexBytes::Read(v))
    }
}

impl std::ops::Deref for IndexBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            IndexBytes::Mapped(m, ..) => m,
            IndexBytes::Read(v) => v,
        }
    }
}

/// The path of an index built for `archive` as it is now, checked cheaply: only the
/// header is read (a 10 MiB index is not read twice on every mount). The checksum and
/// every record are checked when it is loaded, and a bad one is rebuilt then.
pub fn find_current(archive: &Archive) -> Option<PathBuf> {
    candidates(archive).into_iter().find(|p| {
        let mut prefix = [0u8; format::PREFIX_BYTES];
        File::open(p)
            .and_then(|f| std::io::Read::read_exact(&mut &f, &mut prefix))
            .ok()
            .and_then(|()| format::peek_prefix(&prefix).ok())
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
    let places = candidates(archive);
    for p in places.iter().filter(|_| !force) {
        if !p.exists() {
            continue;
        }
        match load(p, archive, required_span) {
            Ok(index) => return Ok((index, Origin::Loaded(p.clone()))),
            Err(e) => log::info!("rebuilding: {e}"),
        }
    }
    if !force {
        if let Some(found) = published(archive, &places, required_span) {
            return Ok(found);
        }
    }
    let index = build_index(archive, opts, progress)?;
    let bytes = format::encode(&index);
    let mut reasons = Vec::new();
    for p in &places {
        match write_atomic(p, &bytes) {
            Ok(()) => {
                // Served from the saved file in place: the built records leave the
                // heap (a mounted daemon keeps only the index pages it touches).
                drop(bytes);
                let index = match load(p, archive, None) {
                    Ok(mapped) if mapped.inodes.is_mapped() => mapped,
                    _ => index,
                };
                return Ok((index, Origin::Built(p.clone())));
            }
            Err(e) => reasons.push(format!("{}: {e}", p.display())),
        }
    }
    Ok((index, Origin::BuiltUnsaved(reasons.join("; "))))
}

/// The index published beside a remote archive (`KEY.snapfs-idx`), if there is one
/// that decodes, validates and matches the archive's identity (size, ETag, edge CRCs)
/// and options; kept in the first of `places` so the next mount finds it locally.
fn published(
    archive: &Archive,
    places: &[PathBuf],
    required_span: Option<u64>,
) -> Option<(Index, Origin)> {
    let bytes = archive.source.published_index()?;
    let mut name = archive.path.clone().into_os_string();
    name.push(SUFFIX);
    let name = PathBuf::from(name);
    let index = match format::decode(&bytes) {
        Ok(i) if i.id != archive.id => {
            log::warn!(
                "ignoring {}: made for another version of the object",
                name.display()
            );
            return None;
        }
        Ok(i) if required_span.is_some_and(|s| s != i.span_bytes) => return None,
        Ok(i) => i,
        Err(e) => {
            log::warn!("ignoring {}: {e}", name.display());
            return None;
        }
    };
    for p in places {
        if write_atomic(p, &bytes).is_ok() {
            return Some((index, Origin::Loaded(p.clone())));
        }
    }
    Some((index, Origin::Loaded(name)))
}

/// Streams whose spans are longer than this are served from a decompressed cache file.
pub const MAX_SPAN: u64 = 64 << 20;

/// For an archive whose stream cannot be checkpointed finely enough, returns the
/// decompressed cache file (creating it once); otherwise `None`.
pub fn cache_file_for(archive: &Archive, index: &Index) -> Result<Option<File>> {
    if index.table.max_span_len() <= MAX_SPAN {
        return Ok(None);
    }
    let Some(cached) = candidates(archive).pop() else {
        return Ok(None);
    };
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
        "{}: the {} stream has a span of {} MiB without a seek point (a single zstd frame, \
         a single xz block (xz without -T) or one huge deflate block), so random access would decompress from far back; \
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
            SeekTable::Zstd(_) => crate::archive::zstd::decompress_all(&*archive.source, &mut w),
            SeekTable::Gzip(_) => decompress_gzip_all(archive, &mut w),
            SeekTable::Xz(t) => crate::archive::xz::decompress_all(&*archive.source, t, &mut w),
            SeekTable::Bzip2(t) => {
                crate::archive::bzip2::decompress_all(&*archive.source, t, &mut w)
            }
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

fn decompress_gzip_all(archive: &Archive, out: &mut dyn Write) -> std::io::Result<u64> {
    let source = crate::source::SourceReader::new(archive.source.clone());
    let reader = std::io::BufReader::with_capacity(1 << 20, source);
    std::io::copy(&mut flate2::read::MultiGzDecoder::new(reader), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn index_bytes_maps_private_files_and_reads_shared_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.snapfs-idx");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let b = IndexBytes::open(&p).unwrap();
        assert!(matches!(b, IndexBytes::Mapped(..)));
        assert_eq!(&*b, &data[..]);
        // Group-writable: another user could truncate it under a mapping.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o664)).unwrap();
        let b = IndexBytes::open(&p).unwrap();
        assert!(matches!(b, IndexBytes::Read(_)));
        assert_eq!(&*b, &data[..]);
        // Empty files cannot be mapped; they read as empty (and then fail to decode).
        fs::write(&p, b"").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(IndexBytes::open(&p).unwrap().is_empty());
    }

    #[test]
    fn find_current_reads_only_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("a.tar");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"abc"[..]).unwrap();
        fs::write(&tar, b.into_inner().unwrap()).unwrap();
        let archive = Archive::open(&tar).unwrap();
        let build = || {
            load_or_build(
                &archive,
                &BuildOptions::default(),
                None,
                false,
                &Progress::default(),
            )
            .unwrap()
            .1
        };
        assert_eq!(find_current(&archive), None);
        let origin = build();
        let Origin::Built(idx) = origin else {
            panic!("not saved: {origin:?}")
        };
        assert_eq!(find_current(&archive).as_deref(), Some(idx.as_path()));
        // A damaged body is not caught by the cheap check; loading catches it and rebuilds.
        let mut bytes = fs::read(&idx).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0xff;
        fs::write(&idx, &bytes).unwrap();
        assert_eq!(find_current(&archive).as_deref(), Some(idx.as_path()));
        assert!(load(&idx, &archive, None).is_err());
        let origin = build();
        assert!(matches!(origin, Origin::Built(_)), "{origin:?}");
        assert!(load(&idx, &archive, None).is_ok());
        // A changed archive (same size, other bytes) is told apart from the header alone.
        let mut bytes = fs::read(&tar).unwrap();
        bytes[512] = b'x';
        fs::write(&tar, &bytes).unwrap();
        let changed = Archive::open(&tar).unwrap();
        assert_ne!(changed.id, archive.id);
        assert_eq!(find_current(&changed), None);
    }

    #[test]
    fn a_private_index_is_served_in_place_and_equals_the_decoded_one() {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("a.tar");
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..50 {
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("d{}/f{i}", i % 7), &b"abc"[..])
                .unwrap();
        }
        fs::write(&tar, b.into_inner().unwrap()).unwrap();
        let archive = Archive::open(&tar).unwrap();
        let (built, origin) = load_or_build(
            &archive,
            &BuildOptions::default(),
            None,
            false,
            &Progress::default(),
        )
        .unwrap();
        let Origin::Built(idx) = origin else {
            panic!("not saved: {origin:?}")
        };
        fs::set_permissions(&idx, fs::Permissions::from_mode(0o644)).unwrap();
        let mapped = load(&idx, &archive, None).unwrap();
        assert!(mapped.inodes.is_mapped() && mapped.dirents.is_mapped());
        assert!(mapped.names.is_mapped());
        assert_eq!(mapped.memory_bytes(), 0);
        assert_eq!(mapped.inodes, built.inodes);
        assert_eq!(mapped.dirents, built.dirents);
        assert_eq!(mapped.names, built.names);
        // One that others may write is read and parsed instead; same records.
        fs::set_permissions(&idx, fs::Permissions::from_mode(0o666)).unwrap();
        let read = load(&idx, &archive, None).unwrap();
        assert!(!read.inodes.is_mapped());
        assert_eq!(read.inodes, built.inodes);
        assert_eq!(read.names, built.names);
    }
}
