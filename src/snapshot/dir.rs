//! Capturing a plain directory: a deterministic walk (names sorted by bytes, depth
//! first, symlinks not followed, one filesystem) that feeds a [`SnapshotWriter`].
//!
//! Members are named relative to the directory without a `./` prefix; the directory
//! itself is the first member, `./` (as `tar -C dir -c .` writes it), so a mount shows
//! its mode, owner, mtime and xattrs at the root. Files that share an inode become hard
//! links to the first path met; sockets are skipped with a warning; mount points of
//! other filesystems are archived as empty directories.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::snapshot::write::{EntryKind, SnapshotEntry, SnapshotWriter};

/// One path found by the walk.
struct Item {
    rel: Vec<u8>,
    meta: Metadata,
}

/// What a walk found.
#[derive(Debug, Clone, Copy, Default)]
pub struct WalkTotals {
    /// Entries (root included).
    pub entries: u64,
    /// Bytes of regular-file data (hard links counted once).
    pub file_bytes: u64,
}

/// A scanned directory, ready to be written.
pub struct DirScan {
    root: PathBuf,
    items: Vec<Item>,
    /// Totals of the scan.
    pub totals: WalkTotals,
}

/// Lists `root` recursively (metadata only; nothing is opened yet).
pub fn scan(root: &Path) -> Result<DirScan> {
    let root_meta =
        fs::symlink_metadata(root).map_err(|e| Error::io("cannot read directory", root, e))?;
    if !root_meta.is_dir() {
        return Err(Error::Usage(format!("{}: not a directory", root.display())));
    }
    let dev = root_meta.dev();
    let mut items = vec![Item {
        rel: Vec::new(),
        meta: root_meta,
    }];
    let mut stack: Vec<(Vec<u8>, std::vec::IntoIter<Vec<u8>>)> =
        vec![(Vec::new(), list(root)?.into_iter())];
    while let Some((dir_rel, names)) = stack.last_mut() {
        let Some(name) = names.next() else {
            stack.pop();
            continue;
        };
        let mut rel = dir_rel.clone();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let full = root.join(OsStr::from_bytes(&rel));
        let meta = match fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::warn!("{}: vanished while scanning; skipped", full.display());
                continue;
            }
            Err(e) => return Err(Error::io("cannot stat", &full, e)),
        };
        let ft = meta.file_type();
        if ft.is_socket() {
            log::warn!("{}: socket ignored", full.display());
            continue;
        }
        let descend = ft.is_dir() && meta.dev() == dev;
        if ft.is_dir() && !descend {
            log::info!(
                "{}: on another filesystem; archived as an empty directory",
                full.display()
            );
        }
        items.push(Item {
            rel: rel.clone(),
            meta,
        });
        if descend {
            let names = list(&full)?;
            stack.push((rel, names.into_iter()));
        }
    }
    let mut totals = WalkTotals::default();
    let mut seen = HashSet::new();
    for it in &items {
        totals.entries += 1;
        if it.meta.is_file() && (it.meta.nlink() < 2 || seen.insert((it.meta.dev(), it.meta.ino())))
        {
            totals.file_bytes += it.meta.len();
        }
    }
    Ok(DirScan {
        root: root.to_path_buf(),
        items,
        totals,
    })
}

/// Names in `dir`, sorted by bytes.
fn list(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let rd = fs::read_dir(dir).map_err(|e| Error::io("cannot read directory", dir, e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io("cannot read directory", dir, e))?;
        names.push(e.file_name().as_bytes().to_vec());
    }
    names.sort_unstable();
    Ok(names)
}

impl DirScan {
    /// Feeds every scanned path to `writer`, skipping the inodes in `exclude`
    /// (dev, ino) — the snapshot being written, when it lies inside the directory.
    /// Returns the number of entries written.
    pub fn write_to(&self, writer: &mut SnapshotWriter, exclude: &[(u64, u64)]) -> Result<u64> {
        let mut first_path: HashMap<(u64, u64), &[u8]> = HashMap::new();
        let mut n = 0u64;
        for it in &self.items {
            let m = &it.meta;
            let key = (m.dev(), m.ino());
            if exclude.contains(&key) {
                log::info!(
                    "{}: is the snapshot being written; not archived",
                    self.root.join(OsStr::from_bytes(&it.rel)).display()
                );
                continue;
            }
            let full = self.root.join(OsStr::from_bytes(&it.rel));
            let ft = m.file_type();
            let mut e = SnapshotEntry::new(it.rel.clone(), EntryKind::File);
            e.mode = m.mode() & 0o7777;
            e.uid = u64::from(m.uid());
            e.gid = u64::from(m.gid());
            e.mtime = m.mtime();
            e.mtime_nsec = u32::try_from(m.mtime_nsec()).unwrap_or(0).min(999_999_999);
            if !ft.is_dir() && m.nlink() > 1 {
                if let Some(first) = first_path.get(&key) {
                    e.kind = EntryKind::Hardlink;
                    e.link = first.to_vec();
                    writer.add(e)?;
                    n += 1;
                    continue;
                }
                first_path.insert(key, &it.rel);
            }
            e.xattrs =
                xattrs(&full).map_err(|err| Error::io("cannot read xattrs of", &full, err))?;
            if ft.is_dir() {
                e.kind = EntryKind::Dir;
            } else if ft.is_file() {
                let f = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(|err| Error::io("cannot open", &full, err))?;
                e.size = m.len();
                e.data = Some(Box::new(f));
            } else if ft.is_symlink() {
                e.kind = EntryKind::Symlink;
                e.link = fs::read_link(&full)
                    .map_err(|err| Error::io("cannot read symlink", &full, err))?
                    .into_os_string()
                    .into_vec();
            } else if ft.is_char_device() || ft.is_block_device() {
                e.kind = if ft.is_char_device() {
                    EntryKind::Char
                } else {
                    EntryKind::Block
                };
                let rdev = m.rdev();
                e.dev_major = libc::major(rdev);
                e.dev_minor = libc::minor(rdev);
            } else if ft.is_fifo() {
                e.kind = EntryKind::Fifo;
            } else {
                log::warn!("{}: unsupported file type; skipped", full.display());
                continue;
            }
            writer.add(e).map_err(|err| match err {
                // Name the file on disk, not just the member (a write error names
                // the snapshot being written: keep it).
                Error::Io {
                    what: "reading",
                    source,
                    ..
                } => Error::Io {
                    what: "reading",
                    path: full.clone(),
                    source,
                },
                other => other,
            })?;
            n += 1;
        }
        Ok(n)
    }
}

/// The extended attributes of `path` (not following symlinks), sorted by name.
pub fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY (both closures): `c` is a valid C string; the buffer pointer and length
    // describe writable memory (or are null/0 to query the size).
    let names = read_sized(|buf, len| unsafe { libc::llistxattr(c.as_ptr(), buf.cast(), len) })?;
    let Some(names) = names else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).map_err(|_| io::Error::other("bad xattr name"))?;
        let value = read_sized(|buf, len| unsafe {
            libc::lgetxattr(c.as_ptr(), cn.as_ptr(), buf.cast(), len)
        })?;
        if let Some(v) = value {
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

/// Calls a size-returning xattr function with a growing buffer. `None` when the
/// filesystem does not support xattrs or the attribute vanished.
fn read_sized(f: impl Fn(*mut u8, usize) -> isize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    for _ in 0..16 {
        let n = f(buf.as_mut_ptr(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => {
                let need = f(std::ptr::null_mut(), 0);
                if need < 0 {
                    return Err(io::Error::last_os_error());
                }
                buf.resize((need as usize).max(buf.len() * 2), 0);
            }
            Some(libc::ENOTSUP) | Some(libc::ENODATA) => return Ok(None),
            _ => return Err(e),
        }
    }
    Err(io::Error::other("extended attributes keep changing"))
}
