//! Copy-up: makes a lower entry exist in the upper directory without changing the
//! view. Directories and special files are recreated, a regular file becomes a sparse
//! partial file without data (its bytes keep coming from the lower file), all with
//! the lower entry's owner, mode, atime, mtime and (as `user.snapfs.ctime`) ctime.
//! Entries are built in `work/` and renamed into place; the directory they land in
//! keeps its times in the view.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::layout::{encode_time, X_CTIME, X_ORIGIN};
use super::sys::{self, errno, ioerr, Obj};
use super::tree::{Partial, State, UpperFile, UpperTree};
use crate::error::Result;
use crate::index::tree::{Attr, SetTime};
use crate::index::ROOT_INO;

impl UpperTree {
    /// Sets owner, mode, times and (directories, regular files) the view's ctime of a
    /// freshly made upper entry from `a`.
    pub(super) fn apply_meta(&self, x: Obj<'_>, a: &Attr, what: &std::path::Path) -> Result<()> {
        x.chown(Some(a.uid), Some(a.gid))
            .map_err(ioerr("cannot chown", what))?;
        x.chmod(a.mode).map_err(ioerr("cannot chmod", what))?;
        if matches!(a.mode & libc::S_IFMT, libc::S_IFDIR | libc::S_IFREG) {
            x.set(X_CTIME, &encode_time((a.ctime, a.ctime_nsec)), 0)
                .map_err(ioerr("cannot set xattr on", what))?;
        }
        let atime = Some(SetTime::At(a.atime, a.atime_nsec));
        let mtime = Some(SetTime::At(a.mtime, a.mtime_nsec));
        x.set_times(atime, mtime)
            .map_err(ioerr("cannot set times of", what))
    }

    /// Runs `f`, an internal change of upper directory `dir`, so that the view does
    /// not see it: its atime and mtime are put back, and its ctime is held in
    /// `user.snapfs.ctime` (see [`UpperTree::freeze`]).
    pub(super) fn keep_times<T>(
        &self,
        st: &mut State,
        dir: u64,
        f: impl FnOnce(&OwnedFd) -> Result<T>,
    ) -> Result<T> {
        let dfd = self.dir_fd(st, dir)?;
        let what = self.shown(st, dir);
        let s = sys::stat_fd(dfd.as_fd()).map_err(ioerr("cannot stat", &what))?;
        self.freeze(st, dir, s.ctime(), &dfd)?;
        let r = f(&dfd);
        let (a, m) = (s.atime(), s.mtime());
        Obj::Path(dfd.as_fd())
            .set_times(Some(SetTime::At(a.0, a.1)), Some(SetTime::At(m.0, m.1)))
            .map_err(ioerr("cannot set times of", &what))?;
        r
    }

    /// Makes directory `ino` exist in the upper layer (metadata only).
    pub(super) fn copy_up_dir(&self, st: &mut State, ino: u64) -> Result<()> {
        let n = st.node(ino)?;
        if n.upper {
            return Ok(());
        }
        if n.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let (parent, name) = n.names.first().cloned().ok_or(errno(libc::ENOENT))?;
        let l = n.lower.ok_or(errno(libc::EIO))?;
        self.copy_up_dir(st, parent)?;
        let la = self.lower.attr(l)?;
        let tmp = self.tmp_name();
        let shown_tmp = self.shown_work(&tmp);
        let target = self.shown_child(st, parent, &name);
        let fd = self.keep_times(st, parent, |pfd| {
            let w = self.workfd.as_fd();
            sys::mkdir_at(w, &tmp, 0o700).map_err(ioerr("cannot create", &shown_tmp))?;
            let fd = sys::open_dir(w, &tmp).map_err(ioerr("cannot open", &shown_tmp))?;
            self.apply_meta(Obj::Path(fd.as_fd()), &la, &shown_tmp)?;
            // A whiteout cannot be there: the directory is visible.
            sys::rename_at(w, &tmp, pfd.as_fd(), &name, libc::RENAME_NOREPLACE)
                .map_err(ioerr("cannot copy up", &target))?;
            Ok(fd)
        })?;
        let node = st.node_mut(ino)?;
        node.upper = true;
        node.frozen = Some((la.ctime, la.ctime_nsec));
        self.cache_dir_fd(ino, fd);
        Ok(())
    }

    /// Every name the view has for lower-only file `ino` (several if hardlinked).
    fn all_names(&self, st: &mut State, ino: u64) -> Result<()> {
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
        let tmp = self.tmp_name();
        let shown_tmp = self.shown_work(&tmp);
        let first = self.shown_child(st, p0, &n0);
        let w = self.workfd.as_fd();
        let (file, key) = self.keep_times(st, p0, |pfd| {
            let mut file = None;
            match n.kind {
                libc::S_IFREG => {
                    let f = sys::create_file(w, &tmp, 0o600)
                        .map_err(ioerr("cannot create", &shown_tmp))?;
                    f.set_len(la.size)
                        .map_err(ioerr("cannot size", &shown_tmp))?;
                    Obj::File(&f)
                        .set(X_ORIGIN, &n.lower_path, 0)
                        .map_err(ioerr("cannot set xattr on", &shown_tmp))?;
                    self.apply_meta(Obj::File(&f), &la, &shown_tmp)?;
                    file = Some(f);
                }
                libc::S_IFLNK => {
                    let target = self.lower.read_link(l)?;
                    sys::symlink_at(&target, w, &tmp)
                        .map_err(ioerr("cannot create", &shown_tmp))?;
                }
                _ => sys::mknod_at(w, &tmp, la.mode, la.rdev)
                    .map_err(ioerr("cannot create", &shown_tmp))?,
            }
            if file.is_none() {
                let fd = sys::open_path(w, &tmp).map_err(ioerr("cannot open", &shown_tmp))?;
                self.apply_meta(Obj::Path(fd.as_fd()), &la, &shown_tmp)?;
            }
            sys::rename_at(w, &tmp, pfd.as_fd(), &n0, libc::RENAME_NOREPLACE)
                .map_err(ioerr("cannot copy up", &first))?;
            let s = sys::stat_at(pfd.as_fd(), &n0)
                .map_err(ioerr("cannot stat", &first))?
                .ok_or(errno(libc::ENOENT))?;
            Ok((file, s.key()))
        })?;
        let first_dir = self.dir_fd(st, p0)?;
        for (p, name) in names.iter().skip(1) {
            let other = self.shown_child(st, *p, name);
            self.keep_times(st, *p, |dfd| {
                sys::link_at(first_dir.as_fd(), &n0, dfd.as_fd(), name)
                    .map_err(ioerr("cannot link", &other))
            })?;
        }
        st.by_lower.remove(&l);
        st.by_upper.insert(key, ino);
        let node = st.node_mut(ino)?;
        node.upper = true;
        node.ukey = Some(key);
        if n.kind == libc::S_IFREG {
            node.frozen = Some((la.ctime, la.ctime_nsec));
            node.file = Some(Arc::new(Mutex::new(UpperFile {
                fd: file.map(Arc::new),
                part: Some(Partial::fresh()),
            })));
        } else {
            node.lower = None;
        }
        Ok(())
    }

    /// Makes `ino` exist in the upper layer.
    pub(super) fn copy_up(&self, st: &mut State, ino: u64) -> Result<()> {
        if st.node(ino)?.kind == libc::S_IFDIR {
            self.copy_up_dir(st, ino)
        } else {
            self.copy_up_file(st, ino)
        }
    }
}
