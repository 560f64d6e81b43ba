//! The on-disk layout of an upper directory: its format, the control xattrs, the byte
//! ranges of partial files, and the change list that `snapfs commit` reads.
//!
//! # Layout of the upper directory `DIR`
//!
//! ```text
//! DIR/format      "snapfs-upper 1"; locked (flock) by the daemon serving DIR
//! DIR/work/       scratch: entries are built here, then renamed into tree/
//! DIR/tree/       the changed paths of the view, at their view paths
//! ```
//!
//! Every entry of `tree/` carries the view's type, mode, owner, mtime and (devices)
//! rdev. Control data lives in `user.snapfs.*` extended attributes, which users of the
//! view can neither see nor set:
//!
//! - **whiteout**: an empty regular file with `user.snapfs.whiteout`: the path is
//!   deleted in the view.
//! - **directory**: merges with the lower directory at the same path, unless it has
//!   `user.snapfs.opaque` (lower hidden) or `user.snapfs.origin=<lower path>` (a
//!   renamed directory: merges with that lower directory instead).
//! - **regular file**: its content is whole, unless it has
//!   `user.snapfs.origin=<lower path>`: then it is a *partial* file whose size is the
//!   view's size and whose `user.snapfs.ranges` (decimal `start-end` pairs, comma
//!   separated, sorted, half-open) lists the byte ranges present in the (sparse)
//!   upper file; every other byte comes from the lower file at `origin`. An empty
//!   list means a metadata-only copy-up (chmod, chown, touch, setxattr).
//! - **symlink, device, fifo, socket**: whole (copy-up recreates them).
//! - **xattrs of the view**: `user.snapfs.x.<name>` on the upper entry, authoritative
//!   when `user.snapfs.xattrs` is present; otherwise the view shows the lower entry's
//!   xattrs (the origin, or the lower entry at the same path). Symlinks and special
//!   files cannot carry user xattrs on ext4, so their view xattrs cannot change.
//! - **hard links** are real hard links in `tree/` (the xattrs travel with the inode).
//!   Changing a lower file that has several names copies it up once and links every
//!   name of it in the view.
//!
//! Paths in `origin` are relative to the root of the lower tree, without a leading
//! `/`. Parent directories in `tree/` exist for every entry (copied up with the
//! lower directory's metadata). [`changes`] walks the layout for `snapfs commit`.
//!
//! Durability: every change is a completed syscall on `tree/` before the reply, so it
//! survives a killed daemon; the ranges of a partial file are written on close
//! (flush), fsync, truncate and rename. fsync syncs the upper file and its directory.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::sys::{classify, ioerr, lstat, At, UpperEntry};
use crate::error::Result;

/// Prefix of the control xattrs (refused to users of the view).
pub const CONTROL_PREFIX: &[u8] = b"user.snapfs.";
/// Marks a whiteout.
pub const X_WHITEOUT: &[u8] = b"user.snapfs.whiteout";
/// Marks an opaque directory.
pub const X_OPAQUE: &[u8] = b"user.snapfs.opaque";
/// Lower path a partial file or renamed directory comes from.
pub const X_ORIGIN: &[u8] = b"user.snapfs.origin";
/// Ranges present in a partial file.
pub const X_RANGES: &[u8] = b"user.snapfs.ranges";
/// The `user.snapfs.x.*` set is the view's xattrs.
pub const X_OWN: &[u8] = b"user.snapfs.xattrs";
/// Prefix of the view's own xattrs.
pub const X_VIEW: &[u8] = b"user.snapfs.x.";
/// POSIX ACL xattrs: kept as real ACLs on the upper entry.
pub(super) const ACL_PREFIX: &[u8] = b"system.posix_acl_";
pub(super) const FORMAT: &[u8] = b"snapfs-upper 1\n";

pub(super) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = dir.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

// ---------------------------------------------------------------- ranges

/// Sorted, disjoint, non-touching half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(pub Vec<(u64, u64)>);

impl Ranges {
    /// Parses the `user.snapfs.ranges` encoding (`"0-4096,8192-9000"`, or empty).
    pub fn decode(b: &[u8]) -> Option<Ranges> {
        let s = std::str::from_utf8(b).ok()?;
        let mut r = Ranges::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-')?;
            let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
            if a > b {
                return None;
            }
            r.insert(a, b);
        }
        Some(r)
    }

    /// The `user.snapfs.ranges` encoding.
    pub fn encode(&self) -> Vec<u8> {
        let v: Vec<String> = self.0.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        v.join(",").into_bytes()
    }

    /// Adds `[a, b)`, merging with neighbours.
    pub fn insert(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let (mut a, mut b) = (a, b);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(x, y) in &self.0 {
            if y < a {
                out.push((x, y));
            } else if x > b {
                if !placed {
                    out.push((a, b));
                    placed = true;
                }
                out.push((x, y));
            } else {
                a = a.min(x);
                b = b.max(y);
            }
        }
        if !placed {
            out.push((a, b));
        }
        self.0 = out;
    }

    /// Drops everything at or past `len`.
    pub fn truncate(&mut self, len: u64) {
        self.0.retain(|&(a, _)| a < len);
        if let Some(last) = self.0.last_mut() {
            last.1 = last.1.min(len);
        }
    }

    /// Whether `[0, len)` is covered.
    pub fn covers(&self, len: u64) -> bool {
        len == 0 || matches!(self.0.first(), Some(&(0, b)) if b >= len)
    }
}

impl Ranges {
    /// From `pos` (before `end`): whether it is present, and where that run ends.
    pub(super) fn segment(&self, pos: u64, end: u64) -> (bool, u64) {
        for &(a, b) in &self.0 {
            if a <= pos && pos < b {
                return (true, b.min(end));
            }
            if a > pos {
                return (false, a.min(end));
            }
        }
        (false, end)
    }
}

// ---------------------------------------------------------------- changes

/// One changed path of the view, as an upper directory records it (for `snapfs
/// commit`). Parents come before their children; names are sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Path in the view: relative, `/`-separated, no leading `/`.
    pub path: Vec<u8>,
    /// The entry in `DIR/tree/`: `lstat` it for type, mode, owner, mtime, size and
    /// rdev, and for hard-link identity (dev, ino); read it for content or target.
    pub upper: PathBuf,
    /// What changed.
    pub kind: ChangeKind,
    /// The view's xattrs when the upper entry owns them; `None` means those of the
    /// lower entry (the origin, or the lower entry at `path`; none for a new entry).
    pub xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// The kind of a [`Change`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// The path is deleted (an OCI whiteout `.wh.NAME`).
    Deleted,
    /// A directory with the upper entry's metadata. `opaque`: nothing of the lower
    /// directory at this path shows (OCI `.wh..wh..opq`). `origin`: a renamed
    /// directory whose lower entries come from this lower path (an OCI writer
    /// emits them under `path`, and the directory is opaque there). Neither: merges
    /// with the lower directory at `path`.
    Dir {
        /// Lower directory at `path` hidden.
        opaque: bool,
        /// Lower directory merged instead (renames).
        origin: Option<Vec<u8>>,
    },
    /// A regular file whose whole content is the upper file.
    File,
    /// A regular file of the upper file's size: bytes in `ranges` come from the upper
    /// file, all others from the lower file at `origin`. Empty `ranges`: only
    /// metadata changed.
    Partial {
        /// Lower file path.
        origin: Vec<u8>,
        /// Ranges present in the upper file.
        ranges: Ranges,
    },
    /// A symlink, device, fifo or socket, whole.
    Other,
}

/// Lists the changes recorded in upper directory `upper_dir` (see the module doc).
pub fn changes(upper_dir: &Path) -> Result<Vec<Change>> {
    let root = upper_dir.join("tree");
    let mut out = Vec::new();
    if lstat(&root).map_err(ioerr("cannot stat", &root))?.is_none() {
        return Ok(out);
    }
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(OsStr::from_bytes(&rel));
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .map_err(ioerr("cannot list", &dir))?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<io::Result<_>>()
            .map_err(ioerr("cannot list", &dir))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = join(&rel, &name);
            let upper = root.join(OsStr::from_bytes(&path));
            let x = At::Path(&upper);
            let xa = |n: &[u8]| x.get(n).map_err(ioerr("cannot read xattr of", &upper));
            let (kind, owns) = match classify(&upper).map_err(ioerr("cannot stat", &upper))? {
                UpperEntry::Absent => continue,
                UpperEntry::Whiteout => (ChangeKind::Deleted, false),
                UpperEntry::Present(m) if m.is_dir() => {
                    subdirs.push(path.clone());
                    let kind = ChangeKind::Dir {
                        opaque: xa(X_OPAQUE)?.is_some(),
                        origin: xa(X_ORIGIN)?,
                    };
                    (kind, true)
                }
                UpperEntry::Present(m) if m.is_file() => {
                    let kind = match xa(X_ORIGIN)? {
                        Some(origin) => ChangeKind::Partial {
                            origin,
                            ranges: xa(X_RANGES)?
                                .and_then(|r| Ranges::decode(&r))
                                .unwrap_or_default(),
                        },
                        None => ChangeKind::File,
                    };
                    (kind, true)
                }
                UpperEntry::Present(_) => (ChangeKind::Other, false),
            };
            let xattrs = if owns && xa(X_OWN)?.is_some() {
                let mut v = Vec::new();
                for n in x.list().map_err(ioerr("cannot list xattrs of", &upper))? {
                    if let Some(name) = n.strip_prefix(X_VIEW) {
                        v.push((name.to_vec(), xa(&n)?.unwrap_or_default()));
                    }
                }
                Some(v)
            } else {
                None
            };
            out.push(Change {
                path,
                upper,
                kind,
                xattrs,
            });
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_truncate_and_cover() {
        let mut r = Ranges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25); // touches: merges
        assert_eq!(r.0, vec![(10, 25), (30, 40)]);
        r.insert(5, 35);
        assert_eq!(r.0, vec![(5, 40)]);
        r.insert(7, 7);
        assert_eq!(r.0, vec![(5, 40)]);
        r.insert(0, 5);
        assert!(r.covers(40) && !r.covers(41));
        r.truncate(12);
        assert_eq!(r.0, vec![(0, 12)]);
        assert!(Ranges::default().covers(0));
    }

    #[test]
    fn ranges_xattr_encoding_round_trips() {
        let r = Ranges(vec![(0, 4096), (8192, 9000)]);
        assert_eq!(r.encode(), b"0-4096,8192-9000");
        assert_eq!(Ranges::decode(&r.encode()), Some(r));
        assert_eq!(Ranges::decode(b""), Some(Ranges::default()));
        assert_eq!(Ranges::decode(b"5-1"), None);
        assert_eq!(Ranges::decode(b"x"), None);
    }
}
