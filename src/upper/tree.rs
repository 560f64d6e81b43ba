//! [`UpperTree`]: the view's inodes (names, lower and upper identity, kernel lookup
//! counts), lookups that merge the upper directory with the lower tree, listings, the
//! partial files' ranges, and every [`Tree`] call.
//!
//! The upper directory is reached only through descriptors: the root of `tree/`, a
//! bounded cache of `O_PATH` descriptors of upper directories (opened component by
//! component, each relative to its parent, never following a symlink), and the open
//! upper files. A directory's descriptor follows it through renames.
//!
//! Inode numbers are handed out once and never reused. A node lives while the kernel
//! holds references to it (entries it was given, returned by `forget`), while it is
//! open, or while nodes below it live; then it is dropped, and looking the name up
//! again makes a new node. Hard links of one upper or lower inode share one node.

use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use lru::LruCache;

use super::layout::*;
use super::sys::{self, classify, errno, ioerr, shown, Obj, UpperEntry};
use crate::error::{Error, Result};
use crate::index::tree::{
    Attr, DirPlusSink, DirSink, FreeSpace, FsStats, Owner, ReadBytes, SetAttr, SetTime, Tree,
};
use crate::index::ROOT_INO;

/// An upper regular file: its open descriptor and, if partial, its ranges.
pub(super) struct UpperFile {
    pub(super) fd: Option<Arc<File>>,
    /// `Some` while the file is partial (bytes outside its ranges come from `origin`).
    pub(super) part: Option<Partial>,
}

/// The ranges of a partial file and its range record.
pub(super) struct Partial {
    /// Loaded on first use.
    ranges: Option<Ranges>,
    /// The record found on disk (id, log records), until its log is opened.
    record: Option<(u64, u64)>,
    log: Option<RangeLog>,
}

impl Partial {
    /// A partial file that has no record yet (nothing present, or format 1 ranges).
    pub(super) fn fresh() -> Partial {
        Partial {
            ranges: Some(Ranges::default()),
            record: None,
            log: None,
        }
    }

    fn unloaded() -> Partial {
        Partial {
            ranges: None,
            record: None,
            log: None,
        }
    }

    fn id(&self) -> Option<u64> {
        self.log.as_ref().map(|l| l.id).or(self.record.map(|r| r.0))
    }
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
    /// (device, inode) of the upper entry (non-directories).
    pub(super) ukey: Option<(u64, u64)>,
    pub(super) file: Option<Arc<Mutex<UpperFile>>>,
    /// The view's ctime while the upper entry holds it in `user.snapfs.ctime`.
    pub(super) frozen: Option<(i64, u32)>,
    pub(super) opens: u32,
    /// References the kernel holds (entries handed to it, not yet forgotten).
    pub(super) lookups: u64,
    /// Names of other nodes in this directory.
    pub(super) kids: u32,
}

impl Node {
    fn new(kind: u32, key: (u64, Vec<u8>)) -> Node {
        Node {
            kind,
            names: vec![key],
            lower: None,
            lower_path: Vec::new(),
            upper: false,
            ukey: None,
            file: None,
            frozen: None,
            opens: 0,
            lookups: 0,
            kids: 0,
        }
    }
}

/// What [`UpperTree::emit`] feeds: (state, next offset, name, inode, type) → full?
type EmitSink<'a> = dyn FnMut(&mut State, u64, &[u8], u64, u32) -> Result<bool> + 'a;

/// A regular upper file to change: its state, descriptor, lower inode, path shown.
type DataTarget = (Arc<Mutex<UpperFile>>, Arc<File>, Option<u64>, PathBuf);

pub(super) struct Listed {
    pub(super) name: Vec<u8>,
    pub(super) ino: u64,
    pub(super) kind: u32,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) nodes: HashMap<u64, Node>,
    next: u64,
    pub(super) by_lower: HashMap<u64, u64>,
    pub(super) by_upper: HashMap<(u64, u64), u64>,
    dirs: HashMap<(u64, Vec<u8>), u64>,
    listings: HashMap<u64, Arc<Vec<Listed>>>,
    handles: HashMap<u64, Arc<Vec<Listed>>>,
    next_fh: u64,
    /// Node count above which a `forget` sweeps nodes nobody holds.
    sweep_at: usize,
}

/// Fewest nodes at which unreferenced ones are swept.
const SWEEP_MIN: usize = 100_000;
/// Upper directory descriptors kept open.
const DIR_FDS: usize = 256;

impl State {
    pub(super) fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(errno(libc::ENOENT))
    }
    pub(super) fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(errno(libc::ENOENT))
    }
    fn add(&mut self, n: Node) -> u64 {
        let ino = self.next;
        self.next += 1;
        for (p, _) in &n.names {
            if let Some(pn) = self.nodes.get_mut(p) {
                pn.kids += 1;
            }
        }
        self.nodes.insert(ino, n);
        ino
    }
    /// Adds name `key` to `ino` (at the front: the name used to reach it).
    fn add_name(&mut self, ino: u64, key: (u64, Vec<u8>), front: bool) {
        let p = key.0;
        let Some(n) = self.nodes.get_mut(&ino) else {
            return;
        };
        if n.names.contains(&key) {
            return;
        }
        if front {
            n.names.insert(0, key);
        } else {
            n.names.push(key);
        }
        if let Some(pn) = self.nodes.get_mut(&p) {
            pn.kids += 1;
        }
    }
    fn remove_name(&mut self, ino: u64, key: &(u64, Vec<u8>)) {
        let Some(n) = self.nodes.get_mut(&ino) else {
            return;
        };
        let before = n.names.len();
        n.names.retain(|k| k != key);
        if n.names.len() != before {
            if let Some(pn) = self.nodes.get_mut(&key.0) {
                pn.kids = pn.kids.saturating_sub(1);
            }
        }
    }
    fn changed(&mut self, dir: u64) {
        self.listings.remove(&dir);
    }
}

pub(super) fn lock(m: &Mutex<UpperFile>) -> MutexGuard<'_, UpperFile> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long opening an upper dir waits for another holder to let go: a daemon whose
/// view was just unmounted with plain `umount` still holds the lock for a moment
/// while it exits.
const UPPER_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// An entry to read or change metadata of: an open upper file or an `O_PATH`
/// descriptor.
enum Handle {
    File(Arc<File>),
    Fd(Arc<OwnedFd>),
}

impl Handle {
    fn obj(&self) -> Obj<'_> {
        match self {
            Handle::File(f) => Obj::File(f),
            Handle::Fd(fd) => Obj::Path(fd.as_fd()),
        }
    }
}

/// A read-only tree made writable by an upper directory (see [`super::layout`]).
pub struct UpperTree {
    pub(super) lower: Box<dyn Tree>,
    dir: PathBuf,
    /// `DIR/tree` and `DIR/work`, for messages.
    root: PathBuf,
    work: PathBuf,
    dirfd: OwnedFd,
    rootfd: Arc<OwnedFd>,
    pub(super) workfd: OwnedFd,
    store: RangeStore,
    state: RwLock<State>,
    fds: Mutex<LruCache<u64, Arc<OwnedFd>>>,
    tmp: AtomicU64,
    _lock: File,
}

impl UpperTree {
    /// Opens (creating if needed) upper directory `dir` over `lower`.
    pub fn new(lower: Box<dyn Tree>, dir: &Path) -> Result<UpperTree> {
        std::fs::create_dir_all(dir).map_err(ioerr("cannot create upper dir", dir))?;
        sys::raise_fd_limit();
        let dirfd = sys::open_dir_path(dir).map_err(ioerr("cannot open", dir))?;
        let fpath = shown(dir, FORMAT_FILE);
        let lockf = open_format(&dirfd).map_err(ioerr("cannot open", &fpath))?;
        if !sys::lock_exclusive(&lockf, UPPER_LOCK_PATIENCE) {
            return Err(Error::InUse {
                path: dir.to_path_buf(),
                holder: "another snapfs mount".into(),
            });
        }
        let mut have = vec![0u8; 64];
        let n = lockf
            .read_at(&mut have, 0)
            .map_err(ioerr("cannot read", &fpath))?;
        have.truncate(n);
        if have.is_empty() || have == FORMAT_1 {
            // Format 1 is read as it is (its ranges xattrs) and upgraded in place:
            // snapfs versions that only know format 1 must not open it any more.
            lockf
                .set_len(0)
                .and_then(|()| lockf.write_all_at(FORMAT, 0))
                .and_then(|()| lockf.sync_all())
                .map_err(ioerr("cannot write", &fpath))?;
        } else if have != FORMAT {
            return Err(Error::NotA {
                path: dir.to_path_buf(),
                expected: "snapfs upper dir",
                detail: Some(format!(
                    "its format file says {:?}; this snapfs reads {:?} and {:?}",
                    String::from_utf8_lossy(&have).trim(),
                    String::from_utf8_lossy(FORMAT).trim(),
                    String::from_utf8_lossy(FORMAT_1).trim()
                )),
            });
        }
        let work = shown(dir, WORK);
        match std::fs::remove_dir_all(&work) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("cannot clear", &work, e))
            }
            _ => {}
        }
        sys::mkdir_at(dirfd.as_fd(), WORK, 0o700).map_err(ioerr("cannot create", &work))?;
        let workfd = sys::open_dir(dirfd.as_fd(), WORK).map_err(ioerr("cannot open", &work))?;
        let probe = Obj::Path(workfd.as_fd());
        probe
            .set(b"user.snapfs.probe", b"1", 0)
            .and_then(|_| probe.remove(b"user.snapfs.probe").map(|_| ()))
            .map_err(ioerr(
                "upper dir needs user xattrs (and /proc); cannot set one on",
                &work,
            ))?;
        let store = RangeStore::open(dirfd.as_fd(), dir, true)?
            .ok_or_else(|| Error::Internal("ranges directory vanished".into()))?;
        let root = shown(dir, TREE);
        let rootfd = match sys::open_dir(dirfd.as_fd(), TREE) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let la = lower.attr(ROOT_INO)?;
                let tmp = b"root".to_vec();
                let shown_tmp = shown(&work, &tmp);
                sys::mkdir_at(workfd.as_fd(), &tmp, 0o700)
                    .map_err(ioerr("cannot create", &shown_tmp))?;
                let fd = sys::open_dir(workfd.as_fd(), &tmp)
                    .map_err(ioerr("cannot open", &shown_tmp))?;
                let meta = |x: Obj<'_>| -> std::io::Result<()> {
                    x.chown(Some(la.uid), Some(la.gid))?;
                    x.chmod(la.mode)?;
                    x.set(X_CTIME, &encode_time((la.ctime, la.ctime_nsec)), 0)?;
                    x.set_times(
                        Some(SetTime::At(la.atime, la.atime_nsec)),
                        Some(SetTime::At(la.mtime, la.mtime_nsec)),
                    )
                };
                meta(Obj::Path(fd.as_fd())).map_err(ioerr("cannot set metadata of", &shown_tmp))?;
                sys::rename_at(workfd.as_fd(), &tmp, dirfd.as_fd(), TREE, 0)
                    .map_err(ioerr("cannot create", &root))?;
                sys::sync_dir(dirfd.as_fd()).map_err(ioerr("cannot sync", dir))?;
                fd
            }
            Err(e) => return Err(Error::io("cannot open", &root, e)),
        };
        let frozen = Obj::Path(rootfd.as_fd())
            .get(X_CTIME)
            .map_err(ioerr("cannot read xattr of", &root))?
            .and_then(|v| decode_time(&v));
        let mut st = State {
            next: ROOT_INO + 1,
            next_fh: 1,
            sweep_at: SWEEP_MIN,
            ..Default::default()
        };
        let mut rn = Node::new(libc::S_IFDIR, (ROOT_INO, Vec::new()));
        rn.lower = Some(ROOT_INO);
        rn.upper = true;
        rn.frozen = frozen;
        st.nodes.insert(ROOT_INO, rn);
        let cap = NonZeroUsize::new(DIR_FDS).unwrap_or(NonZeroUsize::MIN);
        Ok(UpperTree {
            lower,
            dir: dir.to_path_buf(),
            root,
            work,
            dirfd,
            rootfd: Arc::new(rootfd),
            workfd,
            store,
            state: RwLock::new(st),
            fds: Mutex::new(LruCache::new(cap)),
            tmp: AtomicU64::new(0),
            _lock: lockf,
        })
    }

    /// The upper directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh scratch name in `work/`.
    pub(super) fn tmp_name(&self) -> Vec<u8> {
        let n = self.tmp.fetch_add(1, Ordering::Relaxed);
        format!("t{n}").into_bytes()
    }

    pub(super) fn shown_work(&self, name: &[u8]) -> PathBuf {
        shown(&self.work, name)
    }

    /// The upper path of `ino` (through its first name), for messages only.
    pub(super) fn shown(&self, st: &State, ino: u64) -> PathBuf {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            match st.nodes.get(&cur).and_then(|n| n.names.first()) {
                Some((p, name)) if parts.len() < 1 << 16 => {
                    parts.push(name);
                    cur = *p;
                }
                _ => {
                    parts.push(b"(deleted)");
                    break;
                }
            }
        }
        let mut path = self.root.clone();
        for p in parts.iter().rev() {
            path.push(std::ffi::OsStr::from_bytes(p));
        }
        path
    }

    /// `shown(parent)/name`.
    pub(super) fn shown_child(&self, st: &State, parent: u64, name: &[u8]) -> PathBuf {
        shown(&self.shown(st, parent), name)
    }

    /// The descriptor of upper directory `ino`: from the cache, or opened name by
    /// name from the nearest cached ancestor (or the root of `tree/`).
    pub(super) fn dir_fd(&self, st: &State, ino: u64) -> Result<Arc<OwnedFd>> {
        if ino == ROOT_INO {
            return Ok(self.rootfd.clone());
        }
        let mut fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        let mut chain: Vec<(u64, &[u8])> = Vec::new();
        let mut cur = ino;
        let mut base = loop {
            if cur == ROOT_INO {
                break self.rootfd.clone();
            }
            if let Some(fd) = fds.get(&cur) {
                break fd.clone();
            }
            let n = st.node(cur)?;
            if !n.upper || n.kind != libc::S_IFDIR {
                return Err(Error::Internal(format!(
                    "{} is not an upper directory",
                    self.shown(st, cur).display()
                )));
            }
            let (p, name) = n.names.first().ok_or(errno(libc::ENOENT))?;
            chain.push((cur, name));
            cur = *p;
        };
        for (i, name) in chain.into_iter().rev() {
            let fd = sys::open_dir(base.as_fd(), name)
                .map_err(|e| Error::io("cannot open", self.shown(st, i), e))?;
            base = Arc::new(fd);
            fds.put(i, base.clone());
        }
        Ok(base)
    }

    pub(super) fn cache_dir_fd(&self, ino: u64, fd: OwnedFd) {
        let mut fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        fds.put(ino, Arc::new(fd));
    }

    /// (descriptor of the directory holding `ino`'s first name, that name).
    fn place(&self, st: &State, ino: u64) -> Result<(Arc<OwnedFd>, Vec<u8>)> {
        let (p, name) = st
            .node(ino)?
            .names
            .first()
            .cloned()
            .ok_or(errno(libc::ENOENT))?;
        Ok((self.dir_fd(st, p)?, name))
    }

    /// How to reach upper node `ino` for metadata calls.
    fn handle(&self, st: &State, ino: u64) -> Result<Handle> {
        let n = st.node(ino)?;
        if let Some(f) = n.file.as_ref().and_then(|f| lock(f).fd.clone()) {
            return Ok(Handle::File(f));
        }
        if n.kind == libc::S_IFDIR {
            return self.dir_fd(st, ino).map(Handle::Fd);
        }
        let (dfd, name) = self.place(st, ino)?;
        let fd = sys::open_path(dfd.as_fd(), &name)
            .map_err(|e| Error::io("cannot open", self.shown(st, ino), e))?;
        Ok(Handle::Fd(Arc::new(fd)))
    }

    /// The lower entry named `name` in the lower directory merged into `parent`.
    pub(super) fn lower_child(&self, st: &State, parent: u64, name: &[u8]) -> Option<u64> {
        let l = st.nodes.get(&parent)?.lower?;
        self.lower.lookup(l, name).ok()
    }

    fn lower_resolve(&self, path: &[u8]) -> Option<u64> {
        let mut ino = ROOT_INO;
        for c in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            ino = self.lower.lookup(ino, c).ok()?;
        }
        Some(ino)
    }

    fn lower_dir(&self, ino: Option<u64>) -> Option<u64> {
        let i = ino?;
        match self.lower.attr(i) {
            Ok(a) if a.mode & libc::S_IFMT == libc::S_IFDIR => Some(i),
            _ => None,
        }
    }

    // ------------------------------------------------------------ ctime

    /// Holds the view's ctime `t` of upper directory `ino` in `user.snapfs.ctime`
    /// before an internal change would move the real one.
    pub(super) fn freeze(
        &self,
        st: &mut State,
        ino: u64,
        t: (i64, u32),
        fd: &OwnedFd,
    ) -> Result<()> {
        if st.node(ino)?.frozen.is_some() {
            return Ok(());
        }
        Obj::Path(fd.as_fd())
            .set(X_CTIME, &encode_time(t), 0)
            .map_err(|e| Error::io("cannot set xattr on", self.shown(st, ino), e))?;
        st.node_mut(ino)?.frozen = Some(t);
        Ok(())
    }

    /// A change through the view: the entry's own ctime is the view's again.
    fn touched(&self, st: &mut State, ino: u64) {
        let Some(n) = st.nodes.get(&ino) else { return };
        let open = n.file.as_ref().is_some_and(|f| lock(f).fd.is_some());
        if n.frozen.is_none() || !n.upper || (n.names.is_empty() && !open) {
            return;
        }
        match self.handle(st, ino) {
            Ok(h) => {
                if let Err(e) = h.obj().remove(X_CTIME) {
                    log::warn!("cannot update {}: {e}", self.shown(st, ino).display());
                }
            }
            Err(e) => log::warn!("{e}"),
        }
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.frozen = None;
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
            let pfd = self.dir_fd(st, parent)?;
            let what = || self.shown_child(st, parent, name);
            match classify(pfd.as_fd(), name).map_err(|e| Error::io("cannot open", what(), e))? {
                UpperEntry::Whiteout => return Err(errno(libc::ENOENT)),
                UpperEntry::Present(s, fd) if s.is_dir() => {
                    let x = Obj::Path(fd.as_fd());
                    let xa = |n: &[u8]| {
                        x.get(n)
                            .map_err(|e| Error::io("cannot read xattr of", what(), e))
                    };
                    let (lower, lower_path) = if xa(X_OPAQUE)?.is_some() {
                        (None, Vec::new())
                    } else if let Some(o) = xa(X_ORIGIN)? {
                        (self.lower_dir(self.lower_resolve(&o)), o)
                    } else {
                        let lp = join(&st.node(parent)?.lower_path, name);
                        (self.lower_dir(self.lower_child(st, parent, name)), lp)
                    };
                    let frozen = xa(X_CTIME)?.and_then(|v| decode_time(&v));
                    let mut n = Node::new(libc::S_IFDIR, key.clone());
                    n.lower = lower;
                    n.lower_path = lower_path;
                    n.upper = true;
                    n.frozen = frozen;
                    let ino = st.add(n);
                    st.dirs.insert(key, ino);
                    self.cache_dir_fd(ino, fd);
                    return Ok(ino);
                }
                UpperEntry::Present(s, fd) => {
                    let k = s.key();
                    if let Some(&ino) = st.by_upper.get(&k) {
                        st.add_name(ino, key, false);
                        return Ok(ino);
                    }
                    let mut n = Node::new(s.kind(), key);
                    n.upper = true;
                    n.ukey = Some(k);
                    if s.is_file() {
                        let x = Obj::Path(fd.as_fd());
                        let xa = |n: &[u8]| {
                            x.get(n)
                                .map_err(|e| Error::io("cannot read xattr of", what(), e))
                        };
                        let mut part = None;
                        if let Some(o) = xa(X_ORIGIN)? {
                            part = Some(Partial::unloaded());
                            n.lower = self.lower_resolve(&o);
                            if n.lower.is_none() {
                                log::error!(
                                    "{}: origin {:?} is not in the lower tree; its unwritten bytes read as zeros",
                                    what().display(),
                                    String::from_utf8_lossy(&o)
                                );
                            }
                            n.lower_path = o;
                        }
                        n.frozen = xa(X_CTIME)?.and_then(|v| decode_time(&v));
                        n.file = Some(Arc::new(Mutex::new(UpperFile { fd: None, part })));
                    }
                    let ino = st.add(n);
                    st.by_upper.insert(k, ino);
                    return Ok(ino);
                }
                UpperEntry::Absent => {}
            }
        }
        let pn = st.node(parent)?;
        let l = pn.lower.ok_or(errno(libc::ENOENT))?;
        let lower_path = join(&pn.lower_path, name);
        let c = self.lower.lookup(l, name)?;
        let a = self.lower.attr(c)?;
        let kind = a.mode & libc::S_IFMT;
        if kind != libc::S_IFDIR {
            if let Some(&ino) = st.by_lower.get(&c) {
                st.add_name(ino, key, false);
                return Ok(ino);
            }
        }
        let mut n = Node::new(kind, key.clone());
        n.lower = Some(c);
        n.lower_path = lower_path;
        let ino = st.add(n);
        if kind == libc::S_IFDIR {
            st.dirs.insert(key, ino);
        } else {
            st.by_lower.insert(c, ino);
        }
        Ok(ino)
    }

    /// The merged listing of directory `ino` (cached until the directory changes).
    pub(super) fn listing(&self, st: &mut State, ino: u64) -> Result<Arc<Vec<Listed>>> {
        if let Some(l) = st.listings.get(&ino) {
            return Ok(l.clone());
        }
        let n = st.node(ino)?;
        if n.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let (upper, lower) = (n.upper, n.lower);
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut hidden: std::collections::HashSet<Vec<u8>> = Default::default();
        if upper {
            let dfd = self.dir_fd(st, ino)?;
            let what = self.shown(st, ino);
            for name in sys::list_dir(dfd.as_fd()).map_err(ioerr("cannot list", &what))? {
                let s = sys::stat_at(dfd.as_fd(), &name)
                    .map_err(|e| Error::io("cannot stat", shown(&what, &name), e))?;
                let Some(s) = s else { continue };
                let whiteout = s.is_file()
                    && s.size() == 0
                    && match sys::open_path(dfd.as_fd(), &name) {
                        Ok(fd) => sys::is_whiteout(&s, fd.as_fd()).map_err(|e| {
                            Error::io("cannot read xattr of", shown(&what, &name), e)
                        })?,
                        Err(_) => false,
                    };
                if !whiteout {
                    names.push(name.clone());
                }
                hidden.insert(name);
            }
        }
        if let Some(l) = lower {
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

    /// The live inode of listed entry `e` of `dir`: a listing may hold inodes of
    /// nodes dropped since; the name is looked up again then (`None`: it is gone).
    fn live(&self, st: &mut State, dir: u64, e: &Listed) -> Result<Option<u64>> {
        if st.nodes.contains_key(&e.ino) {
            return Ok(Some(e.ino));
        }
        match self.lookup_locked(st, dir, &e.name) {
            Ok(i) => Ok(Some(i)),
            Err(Error::Errno(libc::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Feeds `.`, `..` and `list` from `offset` (offsets are index + 1) to `sink`,
    /// which also gets each entry's attributes if `plus`; counts the entries the
    /// kernel took (`plus`: they are references).
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        st: &mut State,
        ino: u64,
        list: &[Listed],
        offset: u64,
        plus: bool,
        sink: &mut EmitSink<'_>,
    ) -> Result<()> {
        let parent = st.node(ino)?.names.first().map_or(ROOT_INO, |k| k.0);
        let mut off = offset;
        if off == 0 {
            if sink(st, 1, b".", ino, libc::S_IFDIR)? {
                return Ok(());
            }
            off = 1;
        }
        if off == 1 {
            if sink(st, 2, b"..", parent, libc::S_IFDIR)? {
                return Ok(());
            }
            off = 2;
        }
        let start = usize::try_from(off - 2).unwrap_or(usize::MAX);
        for (i, e) in list.iter().enumerate().skip(start) {
            let Some(child) = self.live(st, ino, e)? else {
                continue;
            };
            if sink(st, i as u64 + 3, &e.name, child, e.kind)? {
                break;
            }
            if plus {
                if let Some(n) = st.nodes.get_mut(&child) {
                    n.lookups += 1;
                }
            }
        }
        Ok(())
    }

    /// The attributes of `ino` (state lock held by the caller).
    fn attr_locked(&self, st: &State, ino: u64) -> Result<Attr> {
        let n = st.node(ino)?;
        if !n.upper {
            let l = n.lower.ok_or(errno(libc::ENOENT))?;
            let mut a = self.lower.attr(l)?;
            a.ino = ino;
            return Ok(a);
        }
        let open = n.file.as_ref().and_then(|f| lock(f).fd.clone());
        let s = if let Some(fd) = open {
            sys::stat_fd(fd.as_fd())
        } else if n.kind == libc::S_IFDIR {
            sys::stat_fd(self.dir_fd(st, ino)?.as_fd())
        } else {
            let (dfd, name) = self.place(st, ino)?;
            match sys::stat_at(dfd.as_fd(), &name) {
                Ok(Some(s)) => Ok(s),
                Ok(None) => return Err(errno(libc::ENOENT)),
                Err(e) => Err(e),
            }
        }
        .map_err(|e| Error::io("cannot stat", self.shown(st, ino), e))?;
        let mut a = sys::attr_of(ino, &s);
        if let Some((t, ns)) = n.frozen {
            a.ctime = t;
            a.ctime_nsec = ns;
        }
        Ok(a)
    }

    // ------------------------------------------------------------ nodes

    /// Drops `ino` if nothing holds it (no kernel reference, not open, no live nodes
    /// below it), then its parents if that was all that held them.
    fn maybe_drop(&self, st: &mut State, ino: u64) {
        let mut todo = vec![ino];
        while let Some(i) = todo.pop() {
            if i == ROOT_INO {
                continue;
            }
            match st.nodes.get(&i) {
                Some(n) if n.lookups == 0 && n.opens == 0 && n.kids == 0 => {}
                _ => continue,
            }
            let Some(n) = st.nodes.remove(&i) else {
                continue;
            };
            for key in &n.names {
                if st.dirs.get(key) == Some(&i) {
                    st.dirs.remove(key);
                }
                if let Some(pn) = st.nodes.get_mut(&key.0) {
                    pn.kids = pn.kids.saturating_sub(1);
                    todo.push(key.0);
                }
            }
            if let Some(l) = n.lower {
                if st.by_lower.get(&l) == Some(&i) {
                    st.by_lower.remove(&l);
                }
            }
            if let Some(k) = n.ukey {
                if st.by_upper.get(&k) == Some(&i) {
                    st.by_upper.remove(&k);
                }
            }
            st.listings.remove(&i);
            self.fds.lock().unwrap_or_else(|e| e.into_inner()).pop(&i);
        }
    }

    /// Drops every node nothing holds (those made by listings and internal lookups).
    fn sweep(&self, st: &mut State) {
        let idle: Vec<u64> = st
            .nodes
            .iter()
            .filter(|(_, n)| n.lookups == 0 && n.opens == 0 && n.kids == 0)
            .map(|(&i, _)| i)
            .collect();
        for i in idle {
            self.maybe_drop(st, i);
        }
        st.listings.clear();
        st.sweep_at = (st.nodes.len() * 2).max(SWEEP_MIN);
    }

    /// Forgets name (parent, name) of `ino` (its entry is gone from the upper dir).
    fn drop_name(&self, st: &mut State, ino: u64, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        if st.dirs.get(&key) == Some(&ino) {
            st.dirs.remove(&key);
        }
        st.remove_name(ino, &key);
        let Some(n) = st.nodes.get(&ino) else { return };
        if n.names.is_empty() {
            let (lower, ukey) = (n.lower, n.ukey);
            if let Some(l) = lower {
                if st.by_lower.get(&l) == Some(&ino) {
                    st.by_lower.remove(&l);
                }
            }
            if let Some(k) = ukey {
                if st.by_upper.get(&k) == Some(&ino) {
                    st.by_upper.remove(&k);
                }
            }
            st.listings.remove(&ino);
        }
        self.maybe_drop(st, ino);
    }

    // ------------------------------------------------------------ upper files

    /// The open upper file of regular upper node `ino`.
    fn upper_file(&self, st: &State, ino: u64) -> Result<(Arc<Mutex<UpperFile>>, Arc<File>)> {
        let n = st.node(ino)?;
        let uf = n.file.clone().ok_or(errno(libc::EINVAL))?;
        let mut g = lock(&uf);
        let fd = match &g.fd {
            Some(f) => f.clone(),
            None => {
                let (dfd, name) = self.place(st, ino)?;
                let f = sys::open_file(dfd.as_fd(), &name)
                    .map_err(|e| Error::io("cannot open", self.shown(st, ino), e))?;
                let f = Arc::new(f);
                g.fd = Some(f.clone());
                f
            }
        };
        drop(g);
        Ok((uf, fd))
    }

    /// The ranges of partial file `p` (loaded on first use).
    fn ranges<'a>(&self, p: &'a mut Partial, fd: &File, what: &Path) -> Result<&'a mut Ranges> {
        if p.ranges.is_none() {
            let size = fd.metadata().map_err(ioerr("cannot stat", what))?.len();
            let (r, record) = file_ranges(Some(&self.store), Obj::File(fd), size, what)?;
            p.record = record;
            p.ranges = Some(r);
        }
        p.ranges
            .as_mut()
            .ok_or_else(|| Error::Internal("ranges not loaded".into()))
    }

    /// Appends `rec` to the range record of partial file `p` (made on first use).
    fn record(&self, p: &mut Partial, fd: &File, what: &Path, rec: Record) -> Result<()> {
        if p.log.is_none() {
            let log = match p.record {
                Some((id, records)) => self.store.open_log(id, records)?,
                None => {
                    let initial = p.ranges.clone().unwrap_or_default();
                    let log = self.store.create(fd, what, &initial)?;
                    // Format 1 ranges now live in the record.
                    let _ = Obj::File(fd).remove(X_RANGES);
                    log
                }
            };
            p.log = Some(log);
        }
        match &mut p.log {
            Some(log) => log.append(&self.store, rec),
            None => Err(Error::Internal("no range log".into())),
        }
    }

    /// After a change of partial file `g`: makes it whole if its ranges cover it,
    /// compacts a long log. Neither can lose anything (the log holds the change), so
    /// failures are logged, not returned.
    fn settle(&self, g: &mut UpperFile, fd: &File, lower: Option<u64>, what: &Path) {
        let Some(p) = g.part.as_mut() else { return };
        let Some(r) = p.ranges.as_ref() else { return };
        let size = match fd.metadata() {
            Ok(m) => m.len(),
            Err(e) => return log::warn!("cannot stat {}: {e}", what.display()),
        };
        if r.covers(size) {
            if let Err(e) = self.make_whole(g, fd, lower, what) {
                log::warn!("{e} (it stays partial)");
            }
            return;
        }
        if let Some(log) = p.log.as_mut() {
            if log.long(r) {
                if let Err(e) = log.compact(&self.store, r) {
                    log::warn!("{e} (the range log stays in charge)");
                }
            }
        }
    }

    /// Turns a partial file whose ranges cover it into a whole one.
    fn make_whole(
        &self,
        g: &mut UpperFile,
        fd: &File,
        lower: Option<u64>,
        what: &Path,
    ) -> Result<()> {
        let x = Obj::File(fd);
        self.own_xattrs(x, lower, what)?;
        x.remove(X_ORIGIN).map_err(ioerr("cannot update", what))?;
        let id = g.part.take().and_then(|p| p.id());
        let _ = x.remove(X_RANGES);
        if let Some(id) = id {
            if let Err(e) = x.remove(X_RLOG) {
                log::warn!("cannot update {}: {e}", what.display());
            }
            self.store.remove(id);
        }
        Ok(())
    }

    /// Compacts the range log of partial file `g` if it has records since the last
    /// compaction (on close and fsync); returns the error instead of logging it.
    fn compact(&self, g: &mut UpperFile) -> Result<()> {
        if let Some(Partial {
            ranges: Some(r),
            log: Some(log),
            ..
        }) = g.part.as_mut()
        {
            if log.pending > 0 {
                return log.compact(&self.store, r);
            }
        }
        Ok(())
    }

    /// Makes the upper entry's `user.snapfs.x.*` set authoritative, copying the lower
    /// entry's xattrs the first time.
    pub(super) fn own_xattrs(&self, x: Obj<'_>, lower: Option<u64>, what: &Path) -> Result<()> {
        if x.get(X_OWN)
            .map_err(ioerr("cannot read xattr of", what))?
            .is_some()
        {
            return Ok(());
        }
        if let Some(l) = lower {
            let names = self.lower.xattr_names(l)?;
            for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
                let v = self.lower.xattr(l, name)?;
                let mut k = X_VIEW.to_vec();
                k.extend_from_slice(name);
                x.set(&k, &v, 0)
                    .map_err(ioerr("cannot set xattr on", what))?;
            }
        }
        x.set(X_OWN, b"", 0)
            .map_err(ioerr("cannot set xattr on", what))
    }

    // ------------------------------------------------------------ changes

    /// Replaces `name` of upper directory `dfd` by a whiteout.
    fn make_whiteout(&self, dfd: &OwnedFd, name: &[u8], what: &Path) -> Result<()> {
        let tmp = self.tmp_name();
        let shown_tmp = self.shown_work(&tmp);
        let f = sys::create_file(self.workfd.as_fd(), &tmp, 0o600)
            .map_err(ioerr("cannot create", &shown_tmp))?;
        Obj::File(&f)
            .set(X_WHITEOUT, b"", 0)
            .map_err(ioerr("cannot set xattr on", &shown_tmp))?;
        sys::rename_at(self.workfd.as_fd(), &tmp, dfd.as_fd(), name, 0)
            .map_err(ioerr("cannot record deletion of", what))
    }

    /// Removes the whiteouts left inside upper directory `fd` (empty in the view).
    fn clear_whiteouts(&self, fd: &OwnedFd, what: &Path) -> Result<()> {
        for name in sys::list_dir(fd.as_fd()).map_err(ioerr("cannot list", what))? {
            let p = shown(what, &name);
            match classify(fd.as_fd(), &name).map_err(ioerr("cannot open", &p))? {
                UpperEntry::Whiteout => {
                    sys::unlink_at(fd.as_fd(), &name, false).map_err(ioerr("cannot remove", &p))?
                }
                UpperEntry::Present(..) => return Err(errno(libc::ENOTEMPTY)),
                UpperEntry::Absent => {}
            }
        }
        Ok(())
    }

    /// Creates a new entry `name` in `parent`, made by `make` at a scratch name in
    /// `work/` (which may hand back the open file it made); the kernel gets a
    /// reference to it.
    fn new_entry(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        owner: Owner,
        make: impl FnOnce(&OwnedFd, &[u8]) -> std::io::Result<Option<File>>,
    ) -> Result<u64> {
        check_name(name)?;
        let mut st = self.write_state();
        let st = &mut *st;
        match self.lookup_locked(st, parent, name) {
            Ok(_) => return Err(errno(libc::EEXIST)),
            Err(Error::Errno(libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
        self.copy_up_dir(st, parent)?;
        let pfd = self.dir_fd(st, parent)?;
        let target = self.shown_child(st, parent, name);
        let pm =
            sys::stat_fd(pfd.as_fd()).map_err(ioerr("cannot stat", &self.shown(st, parent)))?;
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
        let tmp = self.tmp_name();
        let shown_tmp = self.shown_work(&tmp);
        let file = make(&self.workfd, &tmp).map_err(ioerr("cannot create", &shown_tmp))?;
        let pathfd = match &file {
            Some(_) => None,
            None => Some(
                sys::open_path(self.workfd.as_fd(), &tmp)
                    .map_err(ioerr("cannot open", &shown_tmp))?,
            ),
        };
        let x = match (&file, &pathfd) {
            (Some(f), _) => Obj::File(f),
            (None, Some(fd)) => Obj::Path(fd.as_fd()),
            (None, None) => return Err(Error::Internal("no new entry".into())),
        };
        x.chown(Some(owner.uid), Some(gid))
            .map_err(ioerr("cannot chown", &shown_tmp))?;
        x.chmod(mode).map_err(ioerr("cannot chmod", &shown_tmp))?;
        let below = self.lower_child(st, parent, name).is_some();
        if kind == libc::S_IFDIR && below {
            x.set(X_OPAQUE, b"", 0)
                .map_err(ioerr("cannot set xattr on", &shown_tmp))?;
        }
        let s = x.stat().map_err(ioerr("cannot stat", &shown_tmp))?;
        if kind == libc::S_IFDIR {
            if let UpperEntry::Whiteout =
                classify(pfd.as_fd(), name).map_err(ioerr("cannot open", &target))?
            {
                sys::unlink_at(pfd.as_fd(), name, false)
                    .map_err(ioerr("cannot remove", &target))?;
            }
        }
        sys::rename_at(self.workfd.as_fd(), &tmp, pfd.as_fd(), name, 0)
            .map_err(ioerr("cannot create", &target))?;
        st.changed(parent);
        self.touched(st, parent);
        // The node, from what was just made (no lookup needed): a new directory
        // hides the lower tree's entry (opaque), a new file is whole.
        let key = (parent, name.to_vec());
        let mut n = Node::new(s.kind(), key.clone());
        n.upper = true;
        n.lookups = 1;
        if s.is_dir() {
            n.lower_path = join(&st.node(parent)?.lower_path, name);
        } else {
            n.ukey = Some(s.key());
        }
        if s.is_file() {
            n.file = Some(Arc::new(Mutex::new(UpperFile {
                fd: file.map(Arc::new),
                part: None,
            })));
        }
        let ino = st.add(n);
        if s.is_dir() {
            st.dirs.insert(key, ino);
            if let Some(fd) = pathfd {
                self.cache_dir_fd(ino, fd);
            }
        } else {
            st.by_upper.insert(s.key(), ino);
        }
        Ok(ino)
    }

    /// Whether `ino` is `anc` or inside it.
    fn is_within(st: &State, ino: u64, anc: u64) -> bool {
        let mut cur = ino;
        for _ in 0..1 << 20 {
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

    /// Before directory `ino` moves to (`to`, `to_name`): a directory that merges
    /// with a lower one keeps merging with it (`origin`), one without a lower one
    /// hides what the lower tree has at the new place (`opaque`).
    fn prepare_dir_move(&self, st: &State, ino: u64, to: u64, to_name: &[u8]) -> Result<()> {
        let n = st.node(ino)?;
        if n.kind != libc::S_IFDIR {
            return Ok(());
        }
        let fd = self.dir_fd(st, ino)?;
        let x = Obj::Path(fd.as_fd());
        let what = self.shown(st, ino);
        if n.lower.is_some() {
            if x.get(X_ORIGIN)
                .map_err(ioerr("cannot read xattr of", &what))?
                .is_none()
            {
                x.set(X_ORIGIN, &n.lower_path, 0)
                    .map_err(ioerr("cannot set xattr on", &what))?;
            }
        } else if self.lower_child(st, to, to_name).is_some() {
            x.set(X_OPAQUE, b"", 0)
                .map_err(ioerr("cannot set xattr on", &what))?;
        }
        Ok(())
    }

    /// Moves name (`from`, `name`) of `ino` to (`to`, `new_name`) in the state.
    fn move_name(st: &mut State, ino: u64, from: u64, name: &[u8], to: u64, new_name: &[u8]) {
        let key = (from, name.to_vec());
        let nkey = (to, new_name.to_vec());
        if st.dirs.get(&key) == Some(&ino) {
            st.dirs.remove(&key);
        }
        st.remove_name(ino, &key);
        st.add_name(ino, nkey.clone(), true);
        if st.nodes.get(&ino).is_some_and(|n| n.kind == libc::S_IFDIR) {
            st.dirs.insert(nkey, ino);
        }
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
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 || flags == known {
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
        if flags & libc::RENAME_EXCHANGE != 0 {
            let d = dst.ok_or(errno(libc::ENOENT))?;
            return self.exchange_locked(st, (parent, name, src), (np, nn, d));
        }
        if let Some(d) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(errno(libc::EEXIST));
            }
            if d == src {
                return Ok(());
            }
            let dn = st.node(d)?;
            let (ddir, dupper, dlower) = (dn.kind == libc::S_IFDIR, dn.upper, dn.lower);
            match (sdir, ddir) {
                (true, false) => return Err(errno(libc::ENOTDIR)),
                (false, true) => return Err(errno(libc::EISDIR)),
                (true, true) if !self.listing(st, d)?.is_empty() => {
                    return Err(errno(libc::ENOTEMPTY))
                }
                _ => {}
            }
            // A lower file with other names loses one: make its link count real.
            if !ddir && !dupper {
                if let Some(l) = dlower {
                    if self.lower.attr(l)?.nlink > 1 {
                        self.copy_up_file(st, d)?;
                    }
                }
            }
        }
        self.copy_up(st, src)?;
        self.copy_up_dir(st, np)?;
        let spfd = self.dir_fd(st, parent)?;
        let npfd = self.dir_fd(st, np)?;
        let sp = self.shown_child(st, parent, name);
        let tp = self.shown_child(st, np, nn);
        if sdir {
            self.prepare_dir_move(st, src, np, nn)?;
        }
        match classify(npfd.as_fd(), nn).map_err(ioerr("cannot open", &tp))? {
            UpperEntry::Whiteout if sdir => {
                sys::unlink_at(npfd.as_fd(), nn, false).map_err(ioerr("cannot remove", &tp))?
            }
            UpperEntry::Present(s, fd) if s.is_dir() => self.clear_whiteouts(&fd, &tp)?,
            _ => {}
        }
        sys::rename_at(spfd.as_fd(), name, npfd.as_fd(), nn, 0)
            .map_err(|e| Error::io("cannot rename", &sp, e))?;
        if self.lower_child(st, parent, name).is_some() {
            self.make_whiteout(&spfd, name, &sp)?;
        }
        if let Some(d) = dst {
            self.drop_name(st, d, np, nn);
            self.touched(st, d);
        }
        Self::move_name(st, src, parent, name, np, nn);
        for i in [src, parent, np] {
            self.touched(st, i);
        }
        st.changed(parent);
        st.changed(np);
        Ok(())
    }

    /// `RENAME_EXCHANGE`: both names stay, their entries swap.
    fn exchange_locked(
        &self,
        st: &mut State,
        (parent, name, src): (u64, &[u8], u64),
        (np, nn, dst): (u64, &[u8], u64),
    ) -> Result<()> {
        if dst == src {
            return Ok(());
        }
        if st.node(dst)?.kind == libc::S_IFDIR && Self::is_within(st, parent, dst) {
            return Err(errno(libc::EINVAL));
        }
        self.copy_up(st, src)?;
        self.copy_up(st, dst)?;
        let spfd = self.dir_fd(st, parent)?;
        let npfd = self.dir_fd(st, np)?;
        self.prepare_dir_move(st, src, np, nn)?;
        self.prepare_dir_move(st, dst, parent, name)?;
        let sp = self.shown_child(st, parent, name);
        sys::rename_at(spfd.as_fd(), name, npfd.as_fd(), nn, libc::RENAME_EXCHANGE)
            .map_err(|e| Error::io("cannot exchange", &sp, e))?;
        Self::move_name(st, src, parent, name, np, nn);
        // `dst`'s old name may now sit in `src`'s node list too (hard links of one
        // file swap with themselves only if src == dst, handled above).
        let key = (np, nn.to_vec());
        if st.dirs.get(&key) == Some(&dst) {
            st.dirs.remove(&key);
        }
        st.remove_name(dst, &key);
        st.add_name(dst, (parent, name.to_vec()), true);
        if st.nodes.get(&dst).is_some_and(|n| n.kind == libc::S_IFDIR) {
            st.dirs.insert((parent, name.to_vec()), dst);
        }
        if st.nodes.get(&src).is_some_and(|n| n.kind == libc::S_IFDIR) {
            st.dirs.insert((np, nn.to_vec()), src);
        }
        for i in [src, dst, parent, np] {
            self.touched(st, i);
        }
        st.changed(parent);
        st.changed(np);
        Ok(())
    }

    fn unlink_locked(&self, st: &mut State, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        let ino = self.lookup_locked(st, parent, name)?;
        let n = st.node(ino)?;
        let is_dir = n.kind == libc::S_IFDIR;
        if dir && !is_dir {
            return Err(errno(libc::ENOTDIR));
        }
        if !dir && is_dir {
            return Err(errno(libc::EISDIR));
        }
        let (upper, lower) = (n.upper, n.lower);
        if is_dir && !self.listing(st, ino)?.is_empty() {
            return Err(errno(libc::ENOTEMPTY));
        }
        if !upper && !is_dir {
            if let Some(l) = lower {
                if self.lower.attr(l)?.nlink > 1 {
                    self.copy_up_file(st, ino)?;
                }
            }
        }
        self.copy_up_dir(st, parent)?;
        let pfd = self.dir_fd(st, parent)?;
        let tp = self.shown_child(st, parent, name);
        let below = self.lower_child(st, parent, name).is_some();
        match classify(pfd.as_fd(), name).map_err(ioerr("cannot open", &tp))? {
            UpperEntry::Present(s, fd) if s.is_dir() => {
                self.clear_whiteouts(&fd, &tp)?;
                sys::unlink_at(pfd.as_fd(), name, true).map_err(ioerr("cannot remove", &tp))?;
                if below {
                    self.make_whiteout(&pfd, name, &tp)?;
                }
            }
            UpperEntry::Present(..) if below => self.make_whiteout(&pfd, name, &tp)?,
            UpperEntry::Present(..) => {
                sys::unlink_at(pfd.as_fd(), name, false).map_err(ioerr("cannot remove", &tp))?
            }
            UpperEntry::Absent if below => self.make_whiteout(&pfd, name, &tp)?,
            _ => {}
        }
        self.drop_name(st, ino, parent, name);
        self.touched(st, ino);
        self.touched(st, parent);
        st.changed(parent);
        Ok(())
    }

    /// Truncation of regular upper file `ino`.
    fn truncate(&self, st: &State, ino: u64, size: u64) -> Result<()> {
        let lower = st.node(ino)?.lower;
        let (uf, fd) = self.upper_file(st, ino)?;
        let what = self.shown(st, ino);
        let mut g = lock(&uf);
        let Some(p) = g.part.as_mut() else {
            return fd.set_len(size).map_err(ioerr("cannot truncate", &what));
        };
        let old = fd.metadata().map_err(ioerr("cannot stat", &what))?.len();
        self.ranges(p, &fd, &what)?;
        if size > old {
            // Recorded first: bytes past the old end are zeros, never lower bytes.
            self.record(p, &fd, &what, Record::Add(old, size))?;
            fd.set_len(size).map_err(ioerr("cannot truncate", &what))?;
            if let Some(r) = p.ranges.as_mut() {
                r.insert(old, size);
            }
        } else if size < old {
            fd.set_len(size).map_err(ioerr("cannot truncate", &what))?;
            if let Some(r) = p.ranges.as_mut() {
                r.truncate(size);
            }
            // Only tidies the record: bytes past the end are never read, and a
            // later growth records them again.
            if let Err(e) = self.record(p, &fd, &what, Record::Cut(size)) {
                log::warn!("{e}");
            }
        }
        self.settle(&mut g, &fd, lower, &what);
        Ok(())
    }

    fn set_attr_locked(&self, st: &mut State, ino: u64, set: &SetAttr) -> Result<()> {
        self.copy_up(st, ino)?;
        let kind = st.node(ino)?.kind;
        if let Some(size) = set.size {
            match kind {
                libc::S_IFREG => self.truncate(st, ino, size)?,
                libc::S_IFDIR => return Err(errno(libc::EISDIR)),
                _ => return Err(errno(libc::EINVAL)),
            }
        }
        let what = self.shown(st, ino);
        let h = self.handle(st, ino)?;
        let x = h.obj();
        if set.uid.is_some() || set.gid.is_some() {
            x.chown(set.uid, set.gid)
                .map_err(ioerr("cannot chown", &what))?;
        }
        if let Some(m) = set.mode {
            x.chmod(m).map_err(ioerr("cannot chmod", &what))?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            x.set_times(set.atime, set.mtime)
                .map_err(ioerr("cannot set times of", &what))?;
        }
        self.touched(st, ino);
        Ok(())
    }

    fn change_xattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>, flags: i32) -> Result<()> {
        if name.starts_with(CONTROL_PREFIX) {
            return Err(errno(libc::EPERM));
        }
        let mut st = self.write_state();
        let st = &mut *st;
        self.copy_up(st, ino)?;
        let lower = st.node(ino)?.lower;
        let h = self.handle(st, ino)?;
        let x = h.obj();
        let what = self.shown(st, ino);
        let r = if name.starts_with(ACL_PREFIX) {
            // POSIX ACLs live on the upper entry itself, where the kernel keeps them
            // consistent with the mode (a minimal ACL is just mode bits).
            match value {
                Some(v) => x.set(name, v, flags),
                None => match x.remove(name) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(std::io::Error::from_raw_os_error(libc::ENODATA)),
                    Err(e) => Err(e),
                },
            }
            .map_err(ioerr("cannot set ACL of", &what))
        } else {
            self.own_xattrs(x, lower, &what)?;
            let mut k = X_VIEW.to_vec();
            k.extend_from_slice(name);
            let exists = x
                .get(&k)
                .map_err(ioerr("cannot read xattr of", &what))?
                .is_some();
            match value {
                Some(_) if flags & libc::XATTR_CREATE != 0 && exists => Err(errno(libc::EEXIST)),
                Some(_) if flags & libc::XATTR_REPLACE != 0 && !exists => Err(errno(libc::ENODATA)),
                Some(v) => x.set(&k, v, 0).map_err(ioerr("cannot set xattr on", &what)),
                None => match x
                    .remove(&k)
                    .map_err(ioerr("cannot remove xattr of", &what))?
                {
                    true => Ok(()),
                    false => Err(errno(libc::ENODATA)),
                },
            }
        };
        if r.is_ok() {
            self.touched(st, ino);
        }
        r
    }

    /// Copies up `ino` for a data change if it is a lower file, and undoes a frozen
    /// ctime; the upper file, its lower inode and its path for messages.
    fn for_data(&self, ino: u64) -> Result<DataTarget> {
        let prepared = {
            let st = self.read_state();
            let n = st.node(ino)?;
            if n.kind != libc::S_IFREG {
                return Err(errno(if n.kind == libc::S_IFDIR {
                    libc::EISDIR
                } else {
                    libc::EINVAL
                }));
            }
            n.upper && n.frozen.is_none()
        };
        if !prepared {
            let mut st = self.write_state();
            self.copy_up_file(&mut st, ino)?;
            self.touched(&mut st, ino);
        }
        let st = self.read_state();
        let (uf, fd) = self.upper_file(&st, ino)?;
        Ok((uf, fd, st.node(ino)?.lower, self.shown(&st, ino)))
    }
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

/// Opens (creating) `DIR/format` for reading and writing.
fn open_format(dir: &OwnedFd) -> std::io::Result<File> {
    match sys::open_file(dir.as_fd(), FORMAT_FILE) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            sys::create_file(dir.as_fd(), FORMAT_FILE, 0o644)
        }
        r => r,
    }
}

const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

impl Tree for UpperTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        let st = self.read_state();
        self.attr_locked(&st, ino)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        let mut st = self.write_state();
        let ino = self.lookup_locked(&mut st, parent, name)?;
        st.node_mut(ino)?.lookups += 1;
        Ok(ino)
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        let mut st = self.write_state();
        let st = &mut *st;
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.lookups = n.lookups.saturating_sub(nlookup);
        }
        self.maybe_drop(st, ino);
        if st.nodes.len() > st.sweep_at {
            self.sweep(st);
        }
    }

    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        let mut st = self.write_state();
        let st = &mut *st;
        let list = self.listing(st, ino)?;
        self.emit(
            st,
            ino,
            &list,
            offset,
            false,
            &mut |_, next, name, child, kind| Ok(sink(next, name, child, kind)),
        )
    }

    fn open_dir(&self, ino: u64) -> Result<u64> {
        let mut st = self.write_state();
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
        let mut st = self.write_state();
        let st = &mut *st;
        let list = match st.handles.get(&fh) {
            Some(l) => l.clone(),
            None => self.listing(st, ino)?,
        };
        self.emit(
            st,
            ino,
            &list,
            offset,
            false,
            &mut |_, next, name, child, kind| Ok(sink(next, name, child, kind)),
        )
    }

    fn read_dir_plus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirPlusSink<'_>,
    ) -> Result<()> {
        let mut st = self.write_state();
        let st = &mut *st;
        let list = match st.handles.get(&fh) {
            Some(l) => l.clone(),
            None => self.listing(st, ino)?,
        };
        self.emit(
            st,
            ino,
            &list,
            offset,
            true,
            &mut |st, next, name, child, _| {
                match self.attr_locked(st, child) {
                    Ok(a) => Ok(sink(next, name, &a)),
                    // An entry that vanished between listing and now is left out.
                    Err(Error::Errno(libc::ENOENT)) => Ok(false),
                    Err(e) => Err(e),
                }
            },
        )
    }

    fn release_dir(&self, _ino: u64, fh: u64) -> Result<()> {
        self.write_state().handles.remove(&fh);
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
        let (dfd, name) = self.place(&st, ino)?;
        sys::read_link_at(dfd.as_fd(), &name)
            .map_err(|e| Error::io("cannot read link", self.shown(&st, ino), e))
    }

    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.read_state();
        let n = st.node(ino)?;
        let lower = n.lower;
        if n.upper && matches!(n.kind, libc::S_IFREG | libc::S_IFDIR) {
            let h = self.handle(&st, ino)?;
            let x = h.obj();
            let what = self.shown(&st, ino);
            let own = x
                .get(X_OWN)
                .map_err(ioerr("cannot read xattr of", &what))?
                .is_some();
            let mut out = Vec::new();
            for name in x.list().map_err(ioerr("cannot list xattrs of", &what))? {
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
            let h = self.handle(&st, ino)?;
            let x = h.obj();
            let what = self.shown(&st, ino);
            let get = |k: &[u8]| x.get(k).map_err(ioerr("cannot read xattr of", &what));
            if name.starts_with(ACL_PREFIX) {
                return get(name)?.ok_or(errno(libc::ENODATA));
            }
            if get(X_OWN)?.is_some() {
                let mut k = X_VIEW.to_vec();
                k.extend_from_slice(name);
                return get(&k)?.ok_or(errno(libc::ENODATA));
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

    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes> {
        let (uf, fd, lower, what) = {
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
            (uf, fd, n.lower, self.shown(&st, ino))
        };
        let mut g = lock(&uf);
        let fsize = fd.metadata().map_err(ioerr("cannot stat", &what))?.len();
        if offset >= fsize {
            return Ok(ReadBytes::empty());
        }
        let end = offset.saturating_add(u64::from(size)).min(fsize);
        let len = usize::try_from(end - offset).map_err(|_| errno(libc::EINVAL))?;
        let mut buf = vec![0u8; len];
        match g.part.as_mut() {
            None => {
                sys::read_full_at(&fd, &mut buf, offset).map_err(ioerr("cannot read", &what))?
            }
            Some(p) => {
                let r = self.ranges(p, &fd, &what)?;
                let mut pos = offset;
                while pos < end {
                    let (present, to) = r.segment(pos, end);
                    let dst = &mut buf[(pos - offset) as usize..(to - offset) as usize];
                    if present {
                        sys::read_full_at(&fd, dst, pos).map_err(ioerr("cannot read", &what))?;
                    } else if let Some(l) = lower {
                        let data = self.lower.read(l, pos, dst.len() as u32)?;
                        let k = data.len().min(dst.len());
                        dst[..k].copy_from_slice(&data[..k]);
                    }
                    pos = to;
                }
            }
        }
        Ok(buf.into())
    }

    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        let (uf, fd, what) = {
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
            let (uf, fd) = self.upper_file(&st, ino)?;
            (uf, fd, self.shown(&st, ino))
        };
        let g = lock(&uf);
        let size = fd.metadata().map_err(ioerr("cannot stat", &what))?.len();
        if offset >= size {
            return Err(errno(libc::ENXIO));
        }
        if g.part.is_some() {
            // Partial: report data everywhere (conservative and correct).
            return Ok(if data { offset } else { size });
        }
        let whence = if data {
            libc::SEEK_DATA
        } else {
            libc::SEEK_HOLE
        };
        sys::seek(&fd, offset, whence).map_err(ioerr("cannot seek in", &what))
    }

    fn stats(&self) -> FsStats {
        self.lower.stats()
    }

    fn writable(&self) -> bool {
        true
    }

    fn free_space(&self) -> Option<FreeSpace> {
        let (blocks_free, blocks_avail, files_free) = sys::free_space(self.dirfd.as_fd())?;
        Some(FreeSpace {
            blocks_free,
            blocks_avail,
            files_free,
        })
    }

    fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let mut st = self.write_state();
        let st = &mut *st;
        let n = st.node(ino)?;
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
        let m = libc::S_IFREG | (mode & 0o7777);
        let ino = self.new_entry(parent, name, m, owner, |w, tmp| {
            sys::create_file(w.as_fd(), tmp, 0o600).map(Some)
        })?;
        let fh = self.open(ino, flags & !libc::O_TRUNC)?;
        Ok((ino, fh))
    }

    fn flush(&self, _ino: u64, _fh: u64) -> Result<()> {
        // Every change was recorded before it was answered.
        Ok(())
    }

    fn release(&self, ino: u64, _fh: u64) -> Result<()> {
        let mut st = self.write_state();
        let st = &mut *st;
        let Some(n) = st.nodes.get_mut(&ino) else {
            return Ok(());
        };
        n.opens = n.opens.saturating_sub(1);
        let (opens, file) = (n.opens, n.file.clone());
        if let Some(uf) = file {
            let what = self.shown(st, ino);
            let mut g = lock(&uf);
            if let Err(e) = self.compact(&mut g) {
                // The log still holds every range: nothing is lost, so the close
                // succeeds and a later close or fsync tries again.
                log::warn!("{e} (the range log of {} stays in charge)", what.display());
            }
            if opens == 0 {
                g.fd = None;
                if let Some(p) = g.part.as_mut() {
                    // Reopened (and its length known) on the next change.
                    if let Some(log) = p.log.take() {
                        p.record = Some((log.id, log.pending));
                    }
                }
            }
        }
        self.maybe_drop(st, ino);
        Ok(())
    }

    fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        let (file, dir, what, parent) = {
            let st = self.read_state();
            let n = st.node(ino)?;
            if !n.upper {
                return Ok(());
            }
            let what = self.shown(&st, ino);
            let parent = match n.names.first() {
                Some((p, _)) => Some((self.dir_fd(&st, *p)?, self.shown(&st, *p))),
                None => None,
            };
            match n.kind {
                libc::S_IFREG => {
                    let (uf, fd) = self.upper_file(&st, ino)?;
                    (Some((uf, fd)), None, what, parent)
                }
                libc::S_IFDIR => (None, Some(self.dir_fd(&st, ino)?), what, parent),
                _ => (None, None, what, parent),
            }
        };
        if let Some((uf, fd)) = file {
            let r = if datasync {
                fd.sync_data()
            } else {
                fd.sync_all()
            };
            r.map_err(ioerr("cannot fsync", &what))?;
            let mut g = lock(&uf);
            if let Err(e) = self.compact(&mut g) {
                log::warn!("{e} (syncing the range log of {} instead)", what.display());
                if let Some(Partial { log: Some(log), .. }) = g.part.as_ref() {
                    log.sync(&self.store)?;
                }
            }
        }
        if let Some(d) = dir {
            sys::sync_dir(d.as_fd()).map_err(ioerr("cannot fsync", &what))?;
        }
        if let Some((p, pw)) = parent {
            sys::sync_dir(p.as_fd()).map_err(ioerr("cannot fsync", &pw))?;
        }
        Ok(())
    }

    fn write(&self, ino: u64, _fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let n = u32::try_from(data.len()).map_err(|_| errno(libc::EINVAL))?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(errno(libc::EFBIG))?;
        let (uf, fd, lower, what) = self.for_data(ino)?;
        let mut g = lock(&uf);
        let old = fd.metadata().map_err(ioerr("cannot stat", &what))?.len();
        fd.write_all_at(data, offset)
            .map_err(ioerr("cannot write", &what))?;
        if let Some(p) = g.part.as_mut() {
            // Past the old end the file is zeros up to `offset`: present too.
            let add = (offset.min(old), end);
            if !self.ranges(p, &fd, &what)?.contains(add.0, add.1) {
                if let Err(e) = self.record(p, &fd, &what, Record::Add(add.0, add.1)) {
                    if end > old {
                        let _ = fd.set_len(old);
                    }
                    return Err(e);
                }
                if let Some(r) = p.ranges.as_mut() {
                    r.insert(add.0, add.1);
                }
            }
            self.settle(&mut g, &fd, lower, &what);
        }
        Ok(n)
    }

    fn fallocate(&self, ino: u64, _fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let end = offset.checked_add(length).ok_or(errno(libc::EFBIG))?;
        let op = mode & !FALLOC_KEEP_SIZE;
        let keep = mode & FALLOC_KEEP_SIZE != 0;
        if !matches!(op, 0 | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) {
            // Collapse, insert, unshare: only for whole files (below).
            let st = self.read_state();
            let n = st.node(ino)?;
            let whole = n.upper
                && n.file.as_ref().is_some_and(|f| {
                    let g = lock(f);
                    g.part.is_none()
                });
            if !whole {
                return Err(errno(libc::EOPNOTSUPP));
            }
        }
        if mode == FALLOC_KEEP_SIZE {
            // Only reserves space: not a change of the view, so not copied up if
            // lower (nothing to reserve for bytes that stay in the archive).
            let st = self.read_state();
            if !st.node(ino)?.upper {
                return Ok(());
            }
        }
        let (uf, fd, lower, what) = self.for_data(ino)?;
        let mut g = lock(&uf);
        let Some(p) = g.part.as_mut() else {
            return sys::fallocate(&fd, mode, offset, length)
                .map_err(ioerr("cannot fallocate", &what));
        };
        let old = fd.metadata().map_err(ioerr("cannot stat", &what))?.len();
        self.ranges(p, &fd, &what)?;
        let grows = !keep && end > old;
        match op {
            0 => {
                // Allocation keeps the content: lower bytes stay lower bytes, and
                // only a growth is new (zero) data.
                if grows {
                    self.record(p, &fd, &what, Record::Add(old, end))?;
                }
                sys::fallocate(&fd, mode, offset, length)
                    .map_err(ioerr("cannot fallocate", &what))?;
                if grows {
                    if let Some(r) = p.ranges.as_mut() {
                        r.insert(old, end);
                    }
                }
            }
            _ => {
                // Punch hole, zero range: the bytes become written zeros.
                sys::fallocate(&fd, mode, offset, length)
                    .map_err(ioerr("cannot fallocate", &what))?;
                let add = if grows {
                    (offset.min(old), end)
                } else {
                    (offset, end.min(old))
                };
                if add.0 < add.1 && !p.ranges.as_ref().is_some_and(|r| r.contains(add.0, add.1)) {
                    if let Err(e) = self.record(p, &fd, &what, Record::Add(add.0, add.1)) {
                        if grows {
                            let _ = fd.set_len(old);
                        }
                        return Err(e);
                    }
                    if let Some(r) = p.ranges.as_mut() {
                        r.insert(add.0, add.1);
                    }
                }
            }
        }
        self.settle(&mut g, &fd, lower, &what);
        Ok(())
    }

    fn set_attr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        let mut st = self.write_state();
        self.set_attr_locked(&mut st, ino, set)?;
        self.attr_locked(&st, ino)
    }

    fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, owner: Owner) -> Result<u64> {
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFREG || kind == 0 {
            let m = libc::S_IFREG | (mode & 0o7777);
            return self.new_entry(parent, name, m, owner, |w, tmp| {
                sys::create_file(w.as_fd(), tmp, 0o600).map(|_| None)
            });
        }
        if !matches!(
            kind,
            libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFSOCK
        ) {
            return Err(errno(libc::EINVAL));
        }
        self.new_entry(parent, name, mode, owner, |w, tmp| {
            sys::mknod_at(w.as_fd(), tmp, mode, rdev).map(|()| None)
        })
    }

    fn mkdir(&self, parent: u64, name: &[u8], mode: u32, owner: Owner) -> Result<u64> {
        let m = libc::S_IFDIR | (mode & 0o7777);
        self.new_entry(parent, name, m, owner, |w, tmp| {
            sys::mkdir_at(w.as_fd(), tmp, 0o700).map(|()| None)
        })
    }

    fn symlink(&self, parent: u64, name: &[u8], target: &[u8], owner: Owner) -> Result<u64> {
        self.new_entry(parent, name, libc::S_IFLNK | 0o777, owner, |w, tmp| {
            sys::symlink_at(target, w.as_fd(), tmp).map(|()| None)
        })
    }

    fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<u64> {
        check_name(name)?;
        let mut st = self.write_state();
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
        let (sfd, sname) = self.place(st, ino)?;
        let pfd = self.dir_fd(st, parent)?;
        let tp = self.shown_child(st, parent, name);
        if let UpperEntry::Whiteout =
            classify(pfd.as_fd(), name).map_err(ioerr("cannot open", &tp))?
        {
            sys::unlink_at(pfd.as_fd(), name, false).map_err(ioerr("cannot remove", &tp))?;
        }
        sys::link_at(sfd.as_fd(), &sname, pfd.as_fd(), name).map_err(ioerr("cannot link", &tp))?;
        st.add_name(ino, (parent, name.to_vec()), false);
        st.node_mut(ino)?.lookups += 1;
        self.touched(st, ino);
        self.touched(st, parent);
        st.changed(parent);
        Ok(ino)
    }

    fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        let mut st = self.write_state();
        self.unlink_locked(&mut st, parent, name, false)
    }

    fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        let mut st = self.write_state();
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
        check_name(new_name)?;
        let mut st = self.write_state();
        self.rename_locked(&mut st, parent, name, new_parent, new_name, flags)
    }

    fn set_xattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.change_xattr(ino, name, Some(value), flags)
    }

    fn backing_file(&self, ino: u64) -> Option<Arc<File>> {
        // Only a whole file: a partial one's missing bytes come from the lower tree.
        // Not while its ctime is frozen either: the kernel's writes would move the
        // real one without the view's being let go of (see `touched`).
        let st = self.read_state();
        let n = st.nodes.get(&ino)?;
        if !n.upper || n.kind != libc::S_IFREG || n.frozen.is_some() {
            return None;
        }
        let g = lock(n.file.as_ref()?);
        match g.part {
            None => g.fd.clone(),
            Some(_) => None,
        }
    }

    fn remove_xattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.change_xattr(ino, name, None, 0)
    }
}
