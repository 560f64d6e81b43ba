//! A local file as a [`Source`]: positional reads of the descriptor opened once, and
//! a check on every read that the descriptor is unchanged (size, mtime, ctime) and
//! that the path still names it.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{Identity, IndexHome, Source};
use crate::error::{Error, Result};

/// What the held descriptor looked like when it was opened: a change of any field
/// (written in place, truncated, touched) means its bytes may no longer be the ones
/// the index describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    /// Why `now` is not this file any more (`None` if it is unchanged).
    fn change(&self, now: &Stamp) -> Option<String> {
        if now.size != self.size {
            Some(format!(
                "changed since it was mounted (size {} -> {})",
                self.size, now.size
            ))
        } else if now != self {
            Some("changed since it was mounted (modified in place)".into())
        } else {
            None
        }
    }
}

/// A local regular file.
pub struct FileSource {
    file: File,
    path: PathBuf,
    stamp: Stamp,
}

impl FileSource {
    /// Opens the regular file at `path`.
    pub fn open(path: &Path) -> Result<FileSource> {
        let file = File::open(path).map_err(|e| Error::io("cannot open archive", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat archive", path, e))?;
        if !meta.is_file() {
            return Err(Error::archive(path, None, None, "not a regular file"));
        }
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            stamp: Stamp::of(&meta),
        })
    }

    /// A source over the already open `file`, known as `path` (which must name it:
    /// every read checks that it still does).
    pub fn from_file(file: File, path: PathBuf) -> Result<FileSource> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat archive", &path, e))?;
        Ok(FileSource {
            file,
            path,
            stamp: Stamp::of(&meta),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for FileSource {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(&self.file, buf, off)
    }

    fn local(&self) -> bool {
        true
    }

    fn identity(&self) -> Identity {
        Identity {
            size: self.stamp.size,
            version: self.stamp.mtime_ns,
        }
    }

    fn check_unchanged(&self) -> std::result::Result<(), String> {
        let now = self
            .file
            .metadata()
            .map_err(|e| format!("cannot stat the held archive: {e}"))?;
        if let Some(why) = self.stamp.change(&Stamp::of(&now)) {
            return Err(why);
        }
        match std::fs::metadata(&self.path) {
            Ok(p) if p.dev() == self.stamp.dev && p.ino() == self.stamp.ino => Ok(()),
            Ok(_) => Err("replaced since it was mounted (another file has its path)".into()),
            Err(e) => Err(format!("replaced since it was mounted ({e})")),
        }
    }

    fn name(&self) -> PathBuf {
        self.path.clone()
    }

    fn index_home(&self) -> IndexHome {
        IndexHome::Beside(self.path.clone())
    }
}

/// An open file without a path of its own (a temporary file, a test fixture, a fuzz
/// input): read as it is, never checked for changes. Archives that users name are
/// opened as [`FileSource`], which is.
impl Source for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, off)
    }

    fn local(&self) -> bool {
        true
    }

    fn identity(&self) -> Identity {
        let (size, version) = self
            .metadata()
            .map(|m| (m.len(), Stamp::of(&m).mtime_ns))
            .unwrap_or((0, 0));
        Identity { size, version }
    }

    fn check_unchanged(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn name(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.as_raw_fd()))
    }

    fn index_home(&self) -> IndexHome {
        let ino = self.metadata().map(|m| m.ino()).unwrap_or(0);
        IndexHome::Keyed(format!("anonymous-{ino}"))
    }
}
