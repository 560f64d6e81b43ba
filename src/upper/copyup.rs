//! Copy-up: makes a lower entry exist in the upper directory (directories and
//! special files recreated, regular files as sparse partial files without data),
//! with the lower entry's metadata, without changing the view.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::layout::{Ranges, X_ORIGIN, X_RANGES};
use super::sys::{chmod, chown, errno, ioerr, mknod, set_times, At};
use super::tree::{State, UpperFile, UpperTree};
use crate::error::Result;
use crate::index::tree::{Attr, SetTime};
use crate::index::ROOT_INO;

impl UpperTree {
    /// Sets owner, mode and mtime of a freshly made upper entry from `a`.
    pub(super) fn apply_meta(&self, at: At<'_>, a: &Attr, is_link: bool) -> Result<()> {
        let p = Path::new("upper entry");
        chown(at, Some(a.uid), Some(a.gid)).map_err(ioerr("cannot chown", p))?;
        chmod(at, a.mode, is_link).map_err(ioerr("cannot chmod", p))?;
        let atime = Some(SetTime::At(a.atime, a.atime_nsec));
        let mtime = Some(SetTime::At(a.mtime, a.mtime_nsec));
        set_times(at, atime, mtime).map_err(ioerr("cannot set times of", p))?;
        Ok(())
    }

    /// Runs `f`, then puts the times of directory `dir` back (an internal change of
    /// the upper layer must not show as a change of the view).
    pub(super) fn keep_times<T>(&self, dir: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let m = std::fs::symlink_metadata(dir).map_err(ioerr("cannot stat", dir))?;
        let r = f();
        let at = Some(SetTime::At(m.atime(), m.atime_nsec() as u32));
        let mt = Some(SetTime::At(m.mtime(), m.mtime_nsec() as u32));
        set_times(At::Path(dir), at, mt).map_err(ioerr("cannot set times of", dir))?;
        r
    }

    /// Makes directory `ino` exist in the upper layer (metadata only).
    pub(super) fn copy_up_dir(&self, st: &mut State, ino: u64) -> Result<()> {
        let n = st.node(ino)?.clone();
        if n.upper {
            return Ok(());
        }
        if n.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let (parent, name) = n.names.first().cloned().ok_or(errno(libc::ENOENT))?;
        self.copy_up_dir(st, parent)?;
        let l = n.lower.ok_or(errno(libc::EIO))?;
        let la = self.lower.attr(l)?;
        let pp = self.upath(st, parent)?;
        let target = pp.join(OsStr::from_bytes(&name));
        let tmp = self.tmp_path();
        self.keep_times(&pp, || {
            std::fs::create_dir(&tmp).map_err(ioerr("cannot create", &tmp))?;
            self.apply_meta(At::Path(&tmp), &la, false)?;
            // A whiteout cannot be here: the directory is visible.
            std::fs::rename(&tmp, &target).map_err(ioerr("cannot copy up", &target))
        })?;
        st.node_mut(ino)?.upper = true;
        Ok(())
    }

    /// Every name the view has for lower-only file `ino` (several if hardlinked).
    pub(super) fn all_names(&self, st: &mut State, ino: u64) -> Result<()> {
        let n = st.node(ino)?;
        let Some(l) = n.lower else { return Ok(()) };
        let nlink = self.lower.attr(l)?.nlink as usize;
        if n.names.len() >= nlink {
            return Ok(());
        }
        // Walk the whole view; lookups add every name they meet to the node.
        let mut stack = vec![ROOT_INO];
        while let Some(d) = stack.pop() {
            let list = self.listing(st, d)?;
            for e in list.iter() {
                if e.kind == libc::S_IFDIR {
                    stack.push(e.ino);
                }
            }
            if st.node(ino)?.names.len() >= nlink {
                break;
            }
        }
        Ok(())
    }

    /// Makes non-directory `ino` exist in the upper layer: a regular file as a sparse
    /// file without data (partial, nothing present), others recreated. All its view
    /// names become hard links of the one upper inode.
    pub(super) fn copy_up_file(&self, st: &mut State, ino: u64) -> Result<()> {
        let n = st.node(ino)?.clone();
        if n.upper {
            return Ok(());
        }
        if n.kind == libc::S_IFDIR {
            return self.copy_up_dir(st, ino);
        }
        let l = n.lower.ok_or(errno(libc::EIO))?;
        let la = self.lower.attr(l)?;
        if la.nlink > 1 {
            self.all_names(st, ino)?;
        }
        let names = st.node(ino)?.names.clone();
        let (p0, n0) = names.first().cloned().ok_or(errno(libc::ENOENT))?;
        for (p, _) in &names {
            self.copy_up_dir(st, *p)?;
        }
        let pp = self.upath(st, p0)?;
        let first = pp.join(OsStr::from_bytes(&n0));
        let tmp = self.tmp_path();
        let mut file = None;
        self.keep_times(&pp, || {
            match n.kind {
                libc::S_IFREG => {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)
                        .map_err(ioerr("cannot create", &tmp))?;
                    f.set_len(la.size).map_err(ioerr("cannot size", &tmp))?;
                    let x = At::Fd(&f);
                    x.set(X_ORIGIN, &n.lower_path, 0)
                        .and_then(|_| x.set(X_RANGES, b"", 0))
                        .map_err(ioerr("cannot set xattr on", &tmp))?;
                    self.apply_meta(At::Fd(&f), &la, false)?;
                    file = Some(f);
                }
                libc::S_IFLNK => {
                    let target = self.lower.read_link(l)?;
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &tmp)
                        .map_err(ioerr("cannot create", &tmp))?;
                    self.apply_meta(At::Path(&tmp), &la, true)?;
                }
                _ => {
                    mknod(&tmp, la.mode, la.rdev).map_err(ioerr("cannot create", &tmp))?;
                    self.apply_meta(At::Path(&tmp), &la, false)?;
                }
            }
            std::fs::rename(&tmp, &first).map_err(ioerr("cannot copy up", &first))
        })?;
        for (p, name) in names.iter().skip(1) {
            let dp = self.upath(st, *p)?;
            let other = dp.join(OsStr::from_bytes(name));
            self.keep_times(&dp, || {
                std::fs::hard_link(&first, &other).map_err(ioerr("cannot link", &other))
            })?;
        }
        let m = std::fs::symlink_metadata(&first).map_err(ioerr("cannot stat", &first))?;
        st.by_lower.remove(&l);
        st.by_upper.insert((m.dev(), m.ino()), ino);
        let node = st.node_mut(ino)?;
        node.upper = true;
        if n.kind == libc::S_IFREG {
            node.file = Some(Arc::new(Mutex::new(UpperFile {
                fd: file.map(Arc::new),
                ranges: Some(Ranges::default()),
                dirty: false,
            })));
        } else {
            node.lower = None;
        }
        Ok(())
    }

    pub(super) fn copy_up(&self, st: &mut State, ino: u64) -> Result<()> {
        if st.node(ino)?.kind == libc::S_IFDIR {
            self.copy_up_dir(st, ino)
        } else {
            self.copy_up_file(st, ino)
        }
    }
}
