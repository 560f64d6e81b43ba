//! [`UpperTree`]: the view's inodes (names, lower and upper identity), lookups that
//! merge the upper directory with the lower tree, listings, and every [`Tree`] call.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::layout::*;
use super::sys::*;
use crate::error::{Error, Result};
use crate::index::tree::{Attr, DirSink, FreeSpace, FsStats, Owner, SetAttr, Tree};
use crate::index::ROOT_INO;

// ---------------------------------------------------------------- state

/// An upper regular file: its open descriptor and, if partial, its ranges.
pub(super) struct UpperFile {
    pub(super) fd: Option<Arc<File>>,
    /// `Some` while the file is partial (bytes outside come from `origin`).
    pub(super) ranges: Option<Ranges>,
    pub(super) dirty: bool,
}

#[derive(Clone)]
pub(super) struct Node {
    pub(super) kind: u32,
    /// Names (parent, name); the first one is used to reach the upper entry. A
    /// directory has exactly one; empty once unlinked.
    pub(super) names: Vec<(u64, Vec<u8>)>,
    /// Lower inode: content of a lower or partial file, merged lower directory.
    pub(super) lower: Option<u64>,
    /// Path of `lower` in the lower tree.
    pub(super) lower_path: Vec<u8>,
    pub(super) upper: bool,
    pub(super) file: Option<Arc<Mutex<UpperFile>>>,
    pub(super) opens: u32,
}

pub(super) struct Listed {
    pub(super) name: Vec<u8>,
    pub(super) ino: u64,
    pub(super) kind: u32,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) nodes: HashMap<u64, Node>,
    pub(super) next: u64,
    pub(super) by_lower: HashMap<u64, u64>,
    pub(super) by_upper: HashMap<(u64, u64), u64>,
    pub(super) dirs: HashMap<(u64, Vec<u8>), u64>,
    pub(super) listings: HashMap<u64, Arc<Vec<Listed>>>,
    pub(super) handles: HashMap<u64, Arc<Vec<Listed>>>,
    pub(super) next_fh: u64,
}

impl State {
    pub(super) fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(errno(libc::ENOENT))
    }
    pub(super) fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(errno(libc::ENOENT))
    }
    pub(super) fn add(&mut self, n: Node) -> u64 {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, n);
        ino
    }
    pub(super) fn changed(&mut self, dir: u64) {
        self.listings.remove(&dir);
    }
}

pub(super) fn lock(m: &Mutex<UpperFile>) -> MutexGuard<'_, UpperFile> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A read-only tree made writable by an upper directory (see the module doc).
pub struct UpperTree {
    pub(super) lower: Box<dyn Tree>,
    pub(super) dir: PathBuf,
    pub(super) root: PathBuf,
    pub(super) work: PathBuf,
    pub(super) state: RwLock<State>,
    pub(super) tmp: AtomicU64,
    pub(super) _lock: File,
}

impl UpperTree {
    /// Opens (creating if needed) upper directory `dir` over `lower`.
    pub fn new(lower: Box<dyn Tree>, dir: &Path) -> Result<UpperTree> {
        std::fs::create_dir_all(dir).map_err(ioerr("cannot create upper dir", dir))?;
        let fpath = dir.join("format");
        let lockf = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&fpath)
            .map_err(ioerr("cannot open", &fpath))?;
        if !lock_exclusive(&lockf, UPPER_LOCK_PATIENCE) {
            return Err(Error::InUse {
                path: dir.to_path_buf(),
                holder: "another snapfs mount".into(),
            });
        }
        let have = std::fs::read(&fpath).map_err(ioerr("cannot read", &fpath))?;
        if have.is_empty() {
            lockf
                .write_all_at(FORMAT, 0)
                .and_then(|_| lockf.sync_all())
                .map_err(ioerr("cannot write", &fpath))?;
        } else if have != FORMAT {
            return Err(Error::NotA {
                path: dir.to_path_buf(),
                expected: "snapfs upper dir",
                detail: Some(format!(
                    "its format file says {:?}",
                    String::from_utf8_lossy(&have).trim()
                )),
            });
        }
        let work = dir.join("work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).map_err(ioerr("cannot create", &work))?;
        At::Path(&work)
            .set(b"user.snapfs.probe", b"1", 0)
            .and_then(|_| At::Path(&work).remove(b"user.snapfs.probe").map(|_| ()))
            .map_err(ioerr(
                "upper dir needs user xattrs; cannot set one on",
                &work,
            ))?;
        let root = dir.join("tree");
        let t = UpperTree {
            lower,
            dir: dir.to_path_buf(),
            root: root.clone(),
            work,
            state: RwLock::new(State {
                next: ROOT_INO + 1,
                next_fh: 1,
                ..Default::default()
            }),
            tmp: AtomicU64::new(0),
            _lock: lockf,
        };
        if lstat(&root).map_err(ioerr("cannot stat", &root))?.is_none() {
            let la = t.lower.attr(ROOT_INO)?;
            let tmp = t.tmp_path();
            std::fs::create_dir(&tmp).map_err(ioerr("cannot create", &tmp))?;
            t.apply_meta(At::Path(&tmp), &la, false)?;
            std::fs::rename(&tmp, &root).map_err(ioerr("cannot create", &root))?;
            sync_dir(dir).map_err(ioerr("cannot sync", dir))?;
        }
        {
            let mut st = t.write();
            st.nodes.insert(
                ROOT_INO,
                Node {
                    kind: libc::S_IFDIR,
                    names: vec![(ROOT_INO, Vec::new())],
                    lower: Some(ROOT_INO),
                    lower_path: Vec::new(),
                    upper: true,
                    file: None,
                    opens: 0,
                },
            );
        }
        Ok(t)
    }

    /// The upper directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn tmp_path(&self) -> PathBuf {
        let n = self.tmp.fetch_add(1, Ordering::Relaxed);
        self.work.join(format!("t{n}"))
    }

    /// Upper path of `ino` (through its first name).
    pub(super) fn upath(&self, st: &State, ino: u64) -> Result<PathBuf> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        let mut guard = 0;
        while cur != ROOT_INO {
            let n = st.node(cur)?;
            let (p, name) = n.names.first().ok_or(errno(libc::ENOENT))?;
            parts.push(name);
            cur = *p;
            guard += 1;
            if guard > 4096 {
                return Err(errno(libc::ELOOP));
            }
        }
        let mut path = self.root.clone();
        for p in parts.iter().rev() {
            path.push(OsStr::from_bytes(p));
        }
        Ok(path)
    }

    pub(super) fn child_path(&self, st: &State, parent: u64, name: &[u8]) -> Result<PathBuf> {
        Ok(self.upath(st, parent)?.join(OsStr::from_bytes(name)))
    }

    /// The lower entry named `name` in the lower directory merged into `parent`.
    pub(super) fn lower_child(&self, st: &State, parent: u64, name: &[u8]) -> Option<u64> {
        let l = st.nodes.get(&parent)?.lower?;
        self.lower.lookup(l, name).ok()
    }

    pub(super) fn lower_resolve(&self, path: &[u8]) -> Option<u64> {
        let mut ino = ROOT_INO;
        for c in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            ino = self.lower.lookup(ino, c).ok()?;
        }
        Some(ino)
    }

    pub(super) fn lower_dir(&self, ino: Option<u64>) -> Option<u64> {
        let i = ino?;
        match self.lower.attr(i) {
            Ok(a) if a.mode & libc::S_IFMT == libc::S_IFDIR => Some(i),
            _ => None,
        }
    }

    // ------------------------------------------------------------ lookup

    pub(super) fn lookup_locked(&self, st: &mut State, parent: u64, name: &[u8]) -> Result<u64> {
        let pn = st.node(parent)?;
        if pn.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        if pn.names.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        if name == b"." {
            return Ok(parent);
        }
        if name == b".." {
            return Ok(pn.names[0].0);
        }
        if let Some(&ino) = st.dirs.get(&(parent, name.to_vec())) {
            return Ok(ino);
        }
        let key = (parent, name.to_vec());
        if pn.upper {
            let p = self.child_path(st, parent, name)?;
            match classify(&p).map_err(ioerr("cannot stat", &p))? {
                UpperEntry::Whiteout => return Err(errno(libc::ENOENT)),
                UpperEntry::Present(m) if m.is_dir() => {
                    let x = At::Path(&p);
                    let (lower, lower_path) =
                        if x.get(X_OPAQUE).map_err(ioerr("xattr", &p))?.is_some() {
                            (None, Vec::new())
                        } else if let Some(o) = x.get(X_ORIGIN).map_err(ioerr("xattr", &p))? {
                            (self.lower_dir(self.lower_resolve(&o)), o)
                        } else {
                            let lp = join(&pn.lower_path, name);
                            (self.lower_dir(self.lower_child(st, parent, name)), lp)
                        };
                    let ino = st.add(Node {
                        kind: libc::S_IFDIR,
                        names: vec![key.clone()],
                        lower,
                        lower_path,
                        upper: true,
                        file: None,
                        opens: 0,
                    });
                    st.dirs.insert(key, ino);
                    return Ok(ino);
                }
                UpperEntry::Present(m) => {
                    let k = (m.dev(), m.ino());
                    if let Some(&ino) = st.by_upper.get(&k) {
                        let n = st.node_mut(ino)?;
                        if !n.names.contains(&key) {
                            n.names.push(key);
                        }
                        return Ok(ino);
                    }
                    let kind = m.mode() & libc::S_IFMT;
                    let (mut lower, mut lower_path, mut file) = (None, Vec::new(), None);
                    if kind == libc::S_IFREG {
                        let x = At::Path(&p);
                        let mut ranges = None;
                        if let Some(o) = x.get(X_ORIGIN).map_err(ioerr("xattr", &p))? {
                            let r = x.get(X_RANGES).map_err(ioerr("xattr", &p))?;
                            ranges = Some(r.and_then(|r| Ranges::decode(&r)).unwrap_or_default());
                            lower = self.lower_resolve(&o);
                            if lower.is_none() {
                                log::error!(
                                    "{}: origin {:?} is not in the lower tree; its unwritten bytes read as zeros",
                                    p.display(),
                                    String::from_utf8_lossy(&o)
                                );
                            }
                            lower_path = o;
                        }
                        file = Some(Arc::new(Mutex::new(UpperFile {
                            fd: None,
                            ranges,
                            dirty: false,
                        })));
                    }
                    let ino = st.add(Node {
                        kind,
                        names: vec![key],
                        lower,
                        lower_path,
                        upper: true,
                        file,
                        opens: 0,
                    });
                    st.by_upper.insert(k, ino);
                    return Ok(ino);
                }
                UpperEntry::Absent => {}
            }
        }
        let pn = st.node(parent)?;
        let l = pn.lower.ok_or(errno(libc::ENOENT))?;
        let c = self.lower.lookup(l, name)?;
        let a = self.lower.attr(c)?;
        let kind = a.mode & libc::S_IFMT;
        let lower_path = join(&pn.lower_path, name);
        if kind == libc::S_IFDIR {
            let ino = st.add(Node {
                kind,
                names: vec![key.clone()],
                lower: Some(c),
                lower_path,
                upper: false,
                file: None,
                opens: 0,
            });
            st.dirs.insert(key, ino);
            return Ok(ino);
        }
        if let Some(&ino) = st.by_lower.get(&c) {
            let n = st.node_mut(ino)?;
            if !n.names.contains(&key) {
                n.names.push(key);
            }
            return Ok(ino);
        }
        let ino = st.add(Node {
            kind,
            names: vec![key],
            lower: Some(c),
            lower_path,
            upper: false,
            file: None,
            opens: 0,
        });
        st.by_lower.insert(c, ino);
        Ok(ino)
    }

    /// The merged listing of directory `ino` (cached until the directory changes).
    pub(super) fn listing(&self, st: &mut State, ino: u64) -> Result<Arc<Vec<Listed>>> {
        if let Some(l) = st.listings.get(&ino) {
            return Ok(l.clone());
        }
        let n = st.node(ino)?.clone();
        if n.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut hidden: std::collections::HashSet<Vec<u8>> = Default::default();
        if n.upper {
            let p = self.upath(st, ino)?;
            for e in std::fs::read_dir(&p).map_err(ioerr("cannot list", &p))? {
                let e = e.map_err(ioerr("cannot list", &p))?;
                let name = e.file_name().as_bytes().to_vec();
                let cp = p.join(e.file_name());
                match classify(&cp).map_err(ioerr("cannot stat", &cp))? {
                    UpperEntry::Whiteout => {
                        hidden.insert(name);
                    }
                    UpperEntry::Present(_) => {
                        hidden.insert(name.clone());
                        names.push(name);
                    }
                    UpperEntry::Absent => {}
                }
            }
        }
        if let Some(l) = n.lower {
            self.lower.read_dir(l, 2, &mut |_, name, _, _| {
                if !hidden.contains(name) {
                    names.push(name.to_vec());
                }
                false
            })?;
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.lookup_locked(st, ino, &name) {
                Ok(c) => {
                    let kind = st.node(c)?.kind;
                    out.push(Listed { name, ino: c, kind });
                }
                Err(Error::Errno(libc::ENOENT)) => {}
                Err(e) => return Err(e),
            }
        }
        let out = Arc::new(out);
        st.listings.insert(ino, out.clone());
        Ok(out)
    }

    // ------------------------------------------------------------ copy-up

    /// The open upper file of regular upper node `ino`.
    pub(super) fn upper_file(
        &self,
        st: &State,
        ino: u64,
    ) -> Result<(Arc<Mutex<UpperFile>>, Arc<File>)> {
        let n = st.node(ino)?;
        let uf = n.file.clone().ok_or(errno(libc::EINVAL))?;
        let fd = {
            let mut g = lock(&uf);
            match &g.fd {
                Some(f) => f.clone(),
                None => {
                    let p = self.upath(st, ino)?;
                    let f = Arc::new(open_file(&p).map_err(ioerr("cannot open", &p))?);
                    g.fd = Some(f.clone());
                    f
                }
            }
        };
        Ok((uf, fd))
    }

    /// Writes the ranges of a partial file, or turns it into a whole one.
    fn persist(&self, g: &mut UpperFile, fd: &File, lower: Option<u64>) -> Result<()> {
        if !g.dirty {
            return Ok(());
        }
        let x = At::Fd(fd);
        let p = Path::new("upper file");
        match &g.ranges {
            Some(r) => x
                .set(X_RANGES, &r.encode(), 0)
                .map_err(ioerr("cannot record ranges of", p))?,
            None => {
                self.own_xattrs(x, lower)?;
                x.remove(X_RANGES).map_err(ioerr("cannot update", p))?;
                x.remove(X_ORIGIN).map_err(ioerr("cannot update", p))?;
            }
        }
        g.dirty = false;
        Ok(())
    }

    /// Makes the upper entry's `user.snapfs.x.*` set authoritative, copying the lower
    /// entry's xattrs the first time.
    pub(super) fn own_xattrs(&self, x: At<'_>, lower: Option<u64>) -> Result<()> {
        let p = Path::new("upper entry");
        if x.get(X_OWN).map_err(ioerr("xattr", p))?.is_some() {
            return Ok(());
        }
        if let Some(l) = lower {
            let names = self.lower.xattr_names(l)?;
            for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
                let v = self.lower.xattr(l, name)?;
                let mut k = X_VIEW.to_vec();
                k.extend_from_slice(name);
                x.set(&k, &v, 0).map_err(ioerr("cannot set xattr on", p))?;
            }
        }
        x.set(X_OWN, b"", 0)
            .map_err(ioerr("cannot set xattr on", p))
    }

    fn flush_file(&self, ino: u64) -> Result<()> {
        let st = self.read_state();
        self.flush_file_in(&st, ino)
    }

    /// Writes the ranges of `ino` if it is a partial file (state lock held by caller).
    fn flush_file_in(&self, st: &State, ino: u64) -> Result<()> {
        let n = st.node(ino)?;
        let (uf, lower) = match &n.file {
            Some(f) => (f.clone(), n.lower),
            None => return Ok(()),
        };
        let mut g = lock(&uf);
        if let Some(fd) = g.fd.clone() {
            self.persist(&mut g, &fd, lower)?;
        }
        Ok(())
    }

    fn make_whiteout(&self, target: &Path) -> Result<()> {
        let tmp = self.tmp_path();
        File::create(&tmp).map_err(ioerr("cannot create", &tmp))?;
        At::Path(&tmp)
            .set(X_WHITEOUT, b"", 0)
            .map_err(ioerr("cannot set xattr on", &tmp))?;
        std::fs::rename(&tmp, target).map_err(ioerr("cannot record deletion of", target))
    }

    /// Removes the whiteouts left inside upper directory `p` (empty in the view).
    fn clear_whiteouts(&self, p: &Path) -> Result<()> {
        for e in std::fs::read_dir(p).map_err(ioerr("cannot list", p))? {
            let e = e.map_err(ioerr("cannot list", p))?;
            let cp = e.path();
            match classify(&cp).map_err(ioerr("cannot stat", &cp))? {
                UpperEntry::Whiteout => {
                    std::fs::remove_file(&cp).map_err(ioerr("cannot remove", &cp))?
                }
                UpperEntry::Present(_) => return Err(errno(libc::ENOTEMPTY)),
                UpperEntry::Absent => {}
            }
        }
        Ok(())
    }

    /// Forgets name (parent, name) of `ino`.
    fn drop_name(&self, st: &mut State, ino: u64, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        st.dirs.remove(&key);
        let Some(n) = st.nodes.get_mut(&ino) else {
            return;
        };
        n.names.retain(|k| *k != key);
        if n.names.is_empty() {
            let (lower, upper, opens) = (n.lower, n.upper, n.opens);
            if !upper {
                if let Some(l) = lower {
                    if st.by_lower.get(&l) == Some(&ino) {
                        st.by_lower.remove(&l);
                    }
                }
            }
            st.by_upper.retain(|_, v| *v != ino);
            st.listings.remove(&ino);
            if opens == 0 {
                st.nodes.remove(&ino);
            }
        }
    }

    /// Creates a new entry `name` in `parent`, made by `make` at a scratch path.
    fn new_entry(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        owner: Owner,
        make: impl FnOnce(&Path) -> io::Result<()>,
    ) -> Result<u64> {
        let mut st = self.write();
        let st = &mut *st;
        match self.lookup_locked(st, parent, name) {
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(Error::Errno(libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
        self.copy_up_dir(st, parent)?;
        let pp = self.upath(st, parent)?;
        let pm = std::fs::symlink_metadata(&pp).map_err(ioerr("cannot stat", &pp))?;
        let kind = mode & libc::S_IFMT;
        let mut mode = mode;
        let gid = if pm.mode() & libc::S_ISGID != 0 {
            if kind == libc::S_IFDIR {
                mode |= libc::S_ISGID;
            }
            pm.gid()
        } else {
            owner.gid
        };
        let tmp = self.tmp_path();
        make(&tmp).map_err(ioerr("cannot create", &tmp))?;
        let is_link = kind == libc::S_IFLNK;
        chown(At::Path(&tmp), Some(owner.uid), Some(gid)).map_err(ioerr("cannot chown", &tmp))?;
        chmod(At::Path(&tmp), mode, is_link).map_err(ioerr("cannot chmod", &tmp))?;
        if kind == libc::S_IFDIR && self.lower_child(st, parent, name).is_some() {
            At::Path(&tmp)
                .set(X_OPAQUE, b"", 0)
                .map_err(ioerr("cannot set xattr on", &tmp))?;
        }
        let target = pp.join(OsStr::from_bytes(name));
        if kind == libc::S_IFDIR {
            if let UpperEntry::Whiteout =
                classify(&target).map_err(ioerr("cannot stat", &target))?
            {
                std::fs::remove_file(&target).map_err(ioerr("cannot remove", &target))?;
            }
        }
        std::fs::rename(&tmp, &target).map_err(ioerr("cannot create", &target))?;
        st.changed(parent);
        self.lookup_locked(st, parent, name)
    }

    fn check_name(name: &[u8]) -> Result<()> {
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(errno(libc::EINVAL));
        }
        if name.len() > 255 {
            return Err(errno(libc::ENAMETOOLONG));
        }
        Ok(())
    }

    /// Whether `ino` is `anc` or inside it.
    fn is_within(st: &State, ino: u64, anc: u64) -> bool {
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == anc {
                return true;
            }
            if cur == ROOT_INO {
                return false;
            }
            match st.nodes.get(&cur).and_then(|n| n.names.first()) {
                Some((p, _)) => cur = *p,
                None => return false,
            }
        }
        false
    }

    fn rename_locked(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
        np: u64,
        nn: &[u8],
        flags: u32,
    ) -> Result<()> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(errno(libc::EINVAL));
        }
        let src = self.lookup_locked(st, parent, name)?;
        let dst = match self.lookup_locked(st, np, nn) {
            Ok(d) => Some(d),
            Err(Error::Errno(libc::ENOENT)) => None,
            Err(e) => return Err(e),
        };
        let sdir = st.node(src)?.kind == libc::S_IFDIR;
        if sdir && Self::is_within(st, np, src) {
            return Err(errno(libc::EINVAL));
        }
        if let Some(d) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(errno(libc::EEXIST));
            }
            if d == src {
                return Ok(());
            }
            let ddir = st.node(d)?.kind == libc::S_IFDIR;
            match (sdir, ddir) {
                (true, false) => return Err(errno(libc::ENOTDIR)),
                (false, true) => return Err(errno(libc::EISDIR)),
                (true, true) if !self.listing(st, d)?.is_empty() => {
                    return Err(errno(libc::ENOTEMPTY))
                }
                _ => {}
            }
        }
        self.copy_up(st, src)?;
        self.flush_file_in(st, src)?;
        self.copy_up_dir(st, np)?;
        // The name being renamed (a hard-linked file has others).
        let sp = self.child_path(st, parent, name)?;
        if sdir {
            let sn = st.node(src)?;
            let x = At::Path(&sp);
            if let Some(_l) = sn.lower {
                if x.get(X_ORIGIN).map_err(ioerr("xattr", &sp))?.is_none() {
                    x.set(X_ORIGIN, &sn.lower_path, 0)
                        .map_err(ioerr("cannot set xattr on", &sp))?;
                }
            } else if self.lower_child(st, np, nn).is_some() {
                x.set(X_OPAQUE, b"", 0)
                    .map_err(ioerr("cannot set xattr on", &sp))?;
            }
        }
        let tp = self.child_path(st, np, nn)?;
        match classify(&tp).map_err(ioerr("cannot stat", &tp))? {
            UpperEntry::Whiteout if sdir => {
                std::fs::remove_file(&tp).map_err(ioerr("cannot remove", &tp))?
            }
            UpperEntry::Present(m) if m.is_dir() => self.clear_whiteouts(&tp)?,
            _ => {}
        }
        std::fs::rename(&sp, &tp).map_err(ioerr("cannot rename to", &tp))?;
        if self.lower_child(st, parent, name).is_some() {
            let old = self.child_path(st, parent, name)?;
            self.make_whiteout(&old)?;
        }
        if let Some(d) = dst {
            self.drop_name(st, d, np, nn);
        }
        let key = (parent, name.to_vec());
        let nkey = (np, nn.to_vec());
        if sdir {
            st.dirs.remove(&key);
            st.dirs.insert(nkey.clone(), src);
        }
        let n = st.node_mut(src)?;
        n.names.retain(|k| *k != key);
        n.names.insert(0, nkey);
        st.changed(parent);
        st.changed(np);
        Ok(())
    }

    fn unlink_locked(&self, st: &mut State, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        let ino = self.lookup_locked(st, parent, name)?;
        let n = st.node(ino)?.clone();
        let is_dir = n.kind == libc::S_IFDIR;
        if dir && !is_dir {
            return Err(errno(libc::ENOTDIR));
        }
        if !dir && is_dir {
            return Err(errno(libc::EISDIR));
        }
        if is_dir && !self.listing(st, ino)?.is_empty() {
            return Err(errno(libc::ENOTEMPTY));
        }
        if !n.upper && !is_dir {
            if let Some(l) = n.lower {
                if self.lower.attr(l)?.nlink > 1 {
                    self.copy_up_file(st, ino)?;
                }
            }
        }
        self.copy_up_dir(st, parent)?;
        let tp = self.child_path(st, parent, name)?;
        let below = self.lower_child(st, parent, name).is_some();
        match classify(&tp).map_err(ioerr("cannot stat", &tp))? {
            UpperEntry::Present(m) if m.is_dir() => {
                self.clear_whiteouts(&tp)?;
                std::fs::remove_dir(&tp).map_err(ioerr("cannot remove", &tp))?;
                if below {
                    self.make_whiteout(&tp)?;
                }
            }
            UpperEntry::Present(_) if below => self.make_whiteout(&tp)?,
            UpperEntry::Present(_) => {
                std::fs::remove_file(&tp).map_err(ioerr("cannot remove", &tp))?
            }
            UpperEntry::Absent if below => self.make_whiteout(&tp)?,
            _ => {}
        }
        self.drop_name(st, ino, parent, name);
        st.changed(parent);
        Ok(())
    }

    fn set_attr_locked(&self, st: &mut State, ino: u64, set: &SetAttr) -> Result<()> {
        self.copy_up(st, ino)?;
        let n = st.node(ino)?.clone();
        let is_link = n.kind == libc::S_IFLNK;
        if n.kind == libc::S_IFREG {
            let (uf, fd) = self.upper_file(st, ino)?;
            let x = At::Fd(&fd);
            let p = Path::new("upper file");
            if let Some(size) = set.size {
                let mut g = lock(&uf);
                let old = fd.metadata().map_err(ioerr("cannot stat", p))?.len();
                fd.set_len(size).map_err(ioerr("cannot truncate", p))?;
                if let Some(r) = &mut g.ranges {
                    if size < old {
                        r.truncate(size);
                    } else {
                        r.insert(old, size);
                    }
                    if r.covers(size) {
                        g.ranges = None;
                    }
                    g.dirty = true;
                    self.persist(&mut g, &fd, n.lower)?;
                }
            }
            chown(x, set.uid, set.gid).map_err(ioerr("cannot chown", p))?;
            if let Some(m) = set.mode {
                chmod(x, m, false).map_err(ioerr("cannot chmod", p))?;
            }
            if set.atime.is_some() || set.mtime.is_some() {
                set_times(x, set.atime, set.mtime).map_err(ioerr("cannot set times", p))?;
            }
            return Ok(());
        }
        if set.size.is_some() {
            return Err(errno(if n.kind == libc::S_IFDIR {
                libc::EISDIR
            } else {
                libc::EINVAL
            }));
        }
        let p = self.upath(st, ino)?;
        let x = At::Path(&p);
        chown(x, set.uid, set.gid).map_err(ioerr("cannot chown", &p))?;
        if let Some(m) = set.mode {
            chmod(x, m, is_link).map_err(ioerr("cannot chmod", &p))?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            set_times(x, set.atime, set.mtime).map_err(ioerr("cannot set times", &p))?;
        }
        Ok(())
    }

    /// Where the view's xattrs of upper node `ino` live.
    fn xattr_target(&self, st: &State, ino: u64) -> Result<(PathBuf, Option<Arc<File>>)> {
        let n = st.node(ino)?;
        let fd = n.file.as_ref().and_then(|f| lock(f).fd.clone());
        let p = if fd.is_some() {
            PathBuf::new()
        } else {
            self.upath(st, ino)?
        };
        Ok((p, fd))
    }

    fn change_xattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>, flags: i32) -> Result<()> {
        if name.starts_with(CONTROL_PREFIX) {
            return Err(errno(libc::EPERM));
        }
        let mut st = self.write();
        let st = &mut *st;
        self.copy_up(st, ino)?;
        let lower = st.node(ino)?.lower;
        let (p, fd) = self.xattr_target(st, ino)?;
        let x = match &fd {
            Some(f) => At::Fd(f),
            None => At::Path(&p),
        };
        let what = Path::new("upper entry");
        if name.starts_with(ACL_PREFIX) {
            // POSIX ACLs live on the upper entry itself, where the kernel keeps them
            // consistent with the mode (a minimal ACL is just mode bits).
            return match value {
                Some(v) => x.set(name, v, flags),
                None => match x.remove(name) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(io::Error::from_raw_os_error(libc::ENODATA)),
                    Err(e) => Err(e),
                },
            }
            .map_err(ioerr("cannot set ACL of", what));
        }
        self.own_xattrs(x, lower)?;
        let mut k = X_VIEW.to_vec();
        k.extend_from_slice(name);
        let exists = x.get(&k).map_err(ioerr("xattr", what))?.is_some();
        match value {
            Some(v) => {
                if flags & libc::XATTR_CREATE != 0 && exists {
                    return Err(errno(libc::EEXIST));
                }
                if flags & libc::XATTR_REPLACE != 0 && !exists {
                    return Err(errno(libc::ENODATA));
                }
                x.set(&k, v, 0).map_err(ioerr("cannot set xattr on", what))
            }
            None => {
                if !x
                    .remove(&k)
                    .map_err(ioerr("cannot remove xattr of", what))?
                {
                    return Err(errno(libc::ENODATA));
                }
                Ok(())
            }
        }
    }
}

impl Tree for UpperTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        let st = self.read_state();
        let n = st.node(ino)?;
        if !n.upper {
            let l = n.lower.ok_or(errno(libc::ENOENT))?;
            drop(st);
            let mut a = self.lower.attr(l)?;
            a.ino = ino;
            return Ok(a);
        }
        if let Some(f) = &n.file {
            if let Some(fd) = lock(f).fd.clone() {
                let m = fd.metadata().map_err(ioerr("cannot stat", &self.root))?;
                return Ok(attr_of(ino, &m));
            }
        }
        let p = self.upath(&st, ino)?;
        let m = std::fs::symlink_metadata(&p).map_err(ioerr("cannot stat", &p))?;
        Ok(attr_of(ino, &m))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        let mut st = self.write();
        self.lookup_locked(&mut st, parent, name)
    }

    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        let (list, parent) = {
            let mut st = self.write();
            let list = self.listing(&mut st, ino)?;
            (list, st.node(ino)?.names.first().map_or(ROOT_INO, |k| k.0))
        };
        emit(ino, parent, &list, offset, sink);
        Ok(())
    }

    fn open_dir(&self, ino: u64) -> Result<u64> {
        let mut st = self.write();
        let list = self.listing(&mut st, ino)?;
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, list);
        Ok(fh)
    }

    fn read_dir_handle(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<()> {
        let (list, parent) = {
            let st = self.read_state();
            let parent = st.node(ino)?.names.first().map_or(ROOT_INO, |k| k.0);
            (st.handles.get(&fh).cloned(), parent)
        };
        match list {
            Some(list) => {
                emit(ino, parent, &list, offset, sink);
                Ok(())
            }
            None => self.read_dir(ino, offset, sink),
        }
    }

    fn release_dir(&self, _ino: u64, fh: u64) -> Result<()> {
        self.write().handles.remove(&fh);
        Ok(())
    }

    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.read_state();
        let n = st.node(ino)?;
        if !n.upper {
            let l = n.lower.ok_or(errno(libc::ENOENT))?;
            drop(st);
            return self.lower.read_link(l);
        }
        if n.kind != libc::S_IFLNK {
            return Err(errno(libc::EINVAL));
        }
        let p = self.upath(&st, ino)?;
        let t = std::fs::read_link(&p).map_err(ioerr("cannot read link", &p))?;
        Ok(t.as_os_str().as_bytes().to_vec())
    }

    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.read_state();
        let n = st.node(ino)?;
        let lower = n.lower;
        if n.upper && matches!(n.kind, libc::S_IFREG | libc::S_IFDIR) {
            let (p, fd) = self.xattr_target(&st, ino)?;
            let x = match &fd {
                Some(f) => At::Fd(f),
                None => At::Path(&p),
            };
            let own = x.get(X_OWN).map_err(ioerr("xattr", &p))?.is_some();
            let mut out = Vec::new();
            for name in x.list().map_err(ioerr("cannot list xattrs of", &p))? {
                if name.starts_with(ACL_PREFIX) {
                    out.extend_from_slice(&name);
                    out.push(0);
                } else if let Some(v) = name.strip_prefix(X_VIEW).filter(|_| own) {
                    out.extend_from_slice(v);
                    out.push(0);
                }
            }
            if own {
                return Ok(out);
            }
            drop(st);
            if let Some(l) = lower {
                out.extend_from_slice(&self.lower.xattr_names(l)?);
            }
            return Ok(out);
        } else if n.upper {
            return Ok(Vec::new());
        }
        drop(st);
        match lower {
            Some(l) => self.lower.xattr_names(l),
            None => Ok(Vec::new()),
        }
    }

    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.read_state();
        let n = st.node(ino)?;
        let lower = n.lower;
        if n.upper && matches!(n.kind, libc::S_IFREG | libc::S_IFDIR) {
            let (p, fd) = self.xattr_target(&st, ino)?;
            let x = match &fd {
                Some(f) => At::Fd(f),
                None => At::Path(&p),
            };
            if name.starts_with(ACL_PREFIX) {
                return x
                    .get(name)
                    .map_err(ioerr("xattr", &p))?
                    .ok_or(errno(libc::ENODATA));
            }
            if x.get(X_OWN).map_err(ioerr("xattr", &p))?.is_some() {
                let mut k = X_VIEW.to_vec();
                k.extend_from_slice(name);
                return x
                    .get(&k)
                    .map_err(ioerr("xattr", &p))?
                    .ok_or(errno(libc::ENODATA));
            }
        } else if n.upper {
            return Err(errno(libc::ENODATA));
        }
        drop(st);
        match lower {
            Some(l) => self.lower.xattr(l, name),
            None => Err(errno(libc::ENODATA)),
        }
    }

    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (uf, fd, lower) = {
            let st = self.read_state();
            let n = st.node(ino)?;
            if !n.upper {
                let l = n.lower.ok_or(errno(libc::ENOENT))?;
                drop(st);
                return self.lower.read(l, offset, size);
            }
            match n.kind {
                libc::S_IFREG => {}
                libc::S_IFDIR => return Err(errno(libc::EISDIR)),
                _ => return Err(errno(libc::EINVAL)),
            }
            let (uf, fd) = self.upper_file(&st, ino)?;
            (uf, fd, n.lower)
        };
        let g = lock(&uf);
        let what = Path::new("upper file");
        let fsize = fd.metadata().map_err(ioerr("cannot stat", what))?.len();
        if offset >= fsize {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(u64::from(size)).min(fsize);
        let mut buf = vec![0u8; (end - offset) as usize];
        match &g.ranges {
            None => read_full_at(&fd, &mut buf, offset).map_err(ioerr("cannot read", what))?,
            Some(r) => {
                let mut pos = offset;
                while pos < end {
                    let (present, to) = r.segment(pos, end);
                    let dst = &mut buf[(pos - offset) as usize..(to - offset) as usize];
                    if present {
                        read_full_at(&fd, dst, pos).map_err(ioerr("cannot read", what))?;
                    } else if let Some(l) = lower {
                        let data = self.lower.read(l, pos, dst.len() as u32)?;
                        let k = data.len().min(dst.len());
                        dst[..k].copy_from_slice(&data[..k]);
                    }
                    pos = to;
                }
            }
        }
        Ok(buf)
    }

    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        let (uf, fd) = {
            let st = self.read_state();
            let n = st.node(ino)?;
            if !n.upper {
                let l = n.lower.ok_or(errno(libc::ENOENT))?;
                drop(st);
                return self.lower.seek_data(l, offset, data);
            }
            if n.kind != libc::S_IFREG {
                return Err(errno(libc::EINVAL));
            }
            self.upper_file(&st, ino)?
        };
        let g = lock(&uf);
        let size = fd
            .metadata()
            .map_err(ioerr("cannot stat", &self.root))?
            .len();
        if offset >= size {
            return Err(errno(libc::ENXIO));
        }
        if g.ranges.is_some() {
            // Partial: report data everywhere (conservative and correct).
            return Ok(if data { offset } else { size });
        }
        let whence = if data {
            libc::SEEK_DATA
        } else {
            libc::SEEK_HOLE
        };
        let off = i64::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
        // SAFETY: lseek on an fd we own.
        let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
        if r < 0 {
            return Err(Error::io("cannot seek", &self.root, last_err()));
        }
        Ok(r as u64)
    }

    fn stats(&self) -> FsStats {
        self.lower.stats()
    }

    fn writable(&self) -> bool {
        true
    }

    fn free_space(&self) -> Option<FreeSpace> {
        let c = cpath(&self.dir).ok()?;
        // SAFETY: statvfs fills the struct we pass.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return None;
        }
        let scale = |b: u64| b.saturating_mul(s.f_frsize as u64) / 4096;
        Some(FreeSpace {
            blocks_free: scale(s.f_bfree as u64),
            blocks_avail: scale(s.f_bavail as u64),
            files_free: s.f_ffree as u64,
        })
    }

    fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let mut st = self.write();
        let st = &mut *st;
        let n = st.node(ino)?.clone();
        let wr = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if n.kind == libc::S_IFREG && wr && !n.upper {
            self.copy_up_file(st, ino)?;
        }
        st.node_mut(ino)?.opens += 1;
        let n = st.node(ino)?;
        if n.upper && n.kind == libc::S_IFREG {
            if let Err(e) = self.upper_file(st, ino) {
                st.node_mut(ino)?.opens -= 1;
                return Err(e);
            }
        }
        Ok(0)
    }

    fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> Result<(u64, u64)> {
        Self::check_name(name)?;
        let ino = self.new_entry(parent, name, libc::S_IFREG | (mode & 0o7777), owner, |p| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .map(drop)
        })?;
        let fh = self.open(ino, flags & !libc::O_TRUNC)?;
        Ok((ino, fh))
    }

    fn flush(&self, ino: u64, _fh: u64) -> Result<()> {
        self.flush_file(ino)
    }

    fn release(&self, ino: u64, _fh: u64) -> Result<()> {
        let mut st = self.write();
        let st = &mut *st;
        let Some(n) = st.nodes.get_mut(&ino) else {
            return Ok(());
        };
        n.opens = n.opens.saturating_sub(1);
        let (opens, dead, file, lower) = (n.opens, n.names.is_empty(), n.file.clone(), n.lower);
        let mut r = Ok(());
        if let Some(uf) = file {
            let mut g = lock(&uf);
            if let Some(fd) = g.fd.clone() {
                r = self.persist(&mut g, &fd, lower);
                if opens == 0 {
                    g.fd = None;
                }
            }
        }
        if dead && opens == 0 {
            st.nodes.remove(&ino);
        }
        r
    }

    fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        self.flush_file(ino)?;
        let (fd, path, dir) = {
            let st = self.read_state();
            let n = st.node(ino)?;
            if !n.upper {
                return Ok(());
            }
            let dir = match n.names.first() {
                Some((p, _)) if n.kind != libc::S_IFDIR => Some(self.upath(&st, *p)?),
                _ => None,
            };
            if n.kind == libc::S_IFREG {
                (Some(self.upper_file(&st, ino)?.1), None, dir)
            } else {
                (None, Some(self.upath(&st, ino)?), dir)
            }
        };
        if let Some(fd) = fd {
            let r = if datasync {
                fd.sync_data()
            } else {
                fd.sync_all()
            };
            r.map_err(ioerr("cannot fsync", &self.root))?;
        }
        if let Some(p) = path.filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_dir())) {
            sync_dir(&p).map_err(ioerr("cannot fsync", &p))?;
        }
        if let Some(d) = dir {
            sync_dir(&d).map_err(ioerr("cannot fsync", &d))?;
        }
        Ok(())
    }

    fn write(&self, ino: u64, _fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let needs_copy = {
            let st = self.read_state();
            let n = st.node(ino)?;
            if n.kind != libc::S_IFREG {
                return Err(errno(libc::EINVAL));
            }
            !n.upper
        };
        if needs_copy {
            let mut st = self.write();
            self.copy_up_file(&mut st, ino)?;
        }
        let (uf, fd, lower) = {
            let st = self.read_state();
            let (uf, fd) = self.upper_file(&st, ino)?;
            (uf, fd, st.node(ino)?.lower)
        };
        let mut g = lock(&uf);
        let what = Path::new("upper file");
        let old = fd.metadata().map_err(ioerr("cannot stat", what))?.len();
        fd.write_all_at(data, offset)
            .map_err(ioerr("cannot write", what))?;
        let end = offset.saturating_add(data.len() as u64);
        if let Some(r) = &mut g.ranges {
            if offset > old {
                r.insert(old, offset);
            }
            r.insert(offset, end);
            if r.covers(old.max(end)) {
                g.ranges = None;
            }
            g.dirty = true;
            if g.ranges.is_none() {
                self.persist(&mut g, &fd, lower)?;
            }
        }
        u32::try_from(data.len()).map_err(|_| errno(libc::EINVAL))
    }

    fn set_attr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        {
            let mut st = self.write();
            self.set_attr_locked(&mut st, ino, set)?;
        }
        self.attr(ino)
    }

    fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, owner: Owner) -> Result<u64> {
        Self::check_name(name)?;
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFREG || kind == 0 {
            let m = libc::S_IFREG | (mode & 0o7777);
            return self.new_entry(parent, name, m, owner, |p| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(p)
                    .map(drop)
            });
        }
        if !matches!(
            kind,
            libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFSOCK
        ) {
            return Err(errno(libc::EINVAL));
        }
        self.new_entry(parent, name, mode, owner, |p| mknod(p, mode, rdev))
    }

    fn mkdir(&self, parent: u64, name: &[u8], mode: u32, owner: Owner) -> Result<u64> {
        Self::check_name(name)?;
        let m = libc::S_IFDIR | (mode & 0o7777);
        self.new_entry(parent, name, m, owner, |p| std::fs::create_dir(p))
    }

    fn symlink(&self, parent: u64, name: &[u8], target: &[u8], owner: Owner) -> Result<u64> {
        Self::check_name(name)?;
        let t = OsStr::from_bytes(target);
        self.new_entry(parent, name, libc::S_IFLNK | 0o777, owner, |p| {
            std::os::unix::fs::symlink(t, p)
        })
    }

    fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<u64> {
        Self::check_name(name)?;
        let mut st = self.write();
        let st = &mut *st;
        if st.node(ino)?.kind == libc::S_IFDIR {
            return Err(errno(libc::EPERM));
        }
        match self.lookup_locked(st, parent, name) {
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(Error::Errno(libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
        self.copy_up_file(st, ino)?;
        self.copy_up_dir(st, parent)?;
        let src = self.upath(st, ino)?;
        let tp = self.child_path(st, parent, name)?;
        if let UpperEntry::Whiteout = classify(&tp).map_err(ioerr("cannot stat", &tp))? {
            std::fs::remove_file(&tp).map_err(ioerr("cannot remove", &tp))?;
        }
        std::fs::hard_link(&src, &tp).map_err(ioerr("cannot link", &tp))?;
        st.node_mut(ino)?.names.push((parent, name.to_vec()));
        st.changed(parent);
        Ok(ino)
    }

    fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        let mut st = self.write();
        self.unlink_locked(&mut st, parent, name, false)
    }

    fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        let mut st = self.write();
        self.unlink_locked(&mut st, parent, name, true)
    }

    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        Self::check_name(new_name)?;
        let mut st = self.write();
        self.rename_locked(&mut st, parent, name, new_parent, new_name, flags)
    }

    fn set_xattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.change_xattr(ino, name, Some(value), flags)
    }

    fn remove_xattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.change_xattr(ino, name, None, 0)
    }
}

/// Feeds `.`, `..` and the listing from `offset` (offsets are index + 1).
pub(super) fn emit(ino: u64, parent: u64, list: &[Listed], offset: u64, sink: &mut DirSink<'_>) {
    let mut off = offset;
    if off == 0 {
        if sink(1, b".", ino, libc::S_IFDIR) {
            return;
        }
        off = 1;
    }
    if off == 1 {
        if sink(2, b"..", parent, libc::S_IFDIR) {
            return;
        }
        off = 2;
    }
    let start = usize::try_from(off - 2).unwrap_or(usize::MAX);
    for (i, e) in list.iter().enumerate().skip(start) {
        if sink(i as u64 + 3, &e.name, e.ino, e.kind) {
            break;
        }
    }
}
