//! The FUSE adapter: turns kernel requests into [`Tree`] calls and replies. Sets the cache policy: an immutable tree gets long TTLs,
//! keep-cache, cached dirs and negative entries; a writable tree ([`Tree::writable`],
//! the upper view) gets short TTLs and no page or dir caching across opens. Modifying
//! calls go to the tree, which answers EROFS unless it is writable. Opens of a
//! writable tree's whole upper files are passed through to the kernel where it can
//! (see [`super::passthrough`]). A writable tree also takes over clearing set-id bits
//! on writes from the kernel (see [`super::killpriv`]).

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::killpriv::Caller;
use super::passthrough::{Answer, Passthrough};
use crate::error::Error;
use crate::index::tree::{Attr, Owner, SetAttr, SetTime, Tree};

/// Entries and attributes never change: let the kernel cache them for a long time.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Cache time of a writable tree (every change goes through the kernel, so this is
/// only a bound on staleness after our own bugs).
const WRITABLE_TTL: Duration = Duration::from_secs(1);
/// Largest read the kernel may send us (and readahead window).
pub const MAX_READ: u32 = 1 << 20;

/// Test hook: when this environment variable is set when the daemon starts, a lookup
/// of exactly that name panics inside the request handler (the integration tests use
/// it to prove that a panic is answered with EIO and the daemon lives on). Unset in
/// normal use; it only ever turns one lookup into EIO.
pub const PANIC_HOOK_ENV: &str = "SNAPFS_TEST_PANIC_ON_LOOKUP";

/// Test hook: milliseconds the filesystem waits, when the session ends, before it
/// lets go of its tree (and with it an upper dir's lock and the cache). The
/// integration tests use it to make a slow daemon exit reproducible. Unset in normal
/// use.
pub const EXIT_DELAY_HOOK_ENV: &str = "SNAPFS_TEST_EXIT_DELAY_MS";

/// A FUSE filesystem serving one [`Tree`].
pub struct SnapFs<T> {
    tree: T,
    ttl: Duration,
    /// The name whose lookup panics (see [`PANIC_HOOK_ENV`]).
    panic_on: Option<Vec<u8>>,
    /// Whether to ask the kernel for passthrough at init (a writable tree, unless
    /// the mount says no).
    want_passthrough: bool,
    passthrough: Passthrough,
    /// The kernel left clearing set-id bits on writes and truncations to us
    /// (FUSE_HANDLE_KILLPRIV_V2, writable trees).
    kill_priv: bool,
    /// Tells the kernel about changes it did not ask for (set once mounted).
    notifier: Arc<OnceLock<Notifier>>,
}

impl<T: Tree> SnapFs<T> {
    /// Wraps `tree`.
    pub fn new(tree: T) -> Self {
        let ttl = if tree.writable() { WRITABLE_TTL } else { TTL };
        let panic_on = std::env::var_os(PANIC_HOOK_ENV).map(|v| v.as_bytes().to_vec());
        let want_passthrough = tree.writable();
        SnapFs {
            tree,
            ttl,
            panic_on,
            want_passthrough,
            passthrough: Passthrough::off(),
            kill_priv: false,
            notifier: Arc::default(),
        }
    }

    /// Turns FUSE passthrough off (`on = false`) or leaves it as the tree allows
    /// (writable trees only).
    pub fn with_passthrough(mut self, on: bool) -> Self {
        self.want_passthrough &= on;
        self
    }

    /// Where the session's notifier goes once the session exists.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// Flags for an open file or directory: keep caches only if nothing can change.
    fn open_flags(&self, dir: bool) -> FopenFlags {
        match (self.tree.writable(), dir) {
            (true, _) => FopenFlags::empty(),
            (false, false) => FopenFlags::FOPEN_KEEP_CACHE,
            (false, true) => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        }
    }

    /// Runs the tree work of one request. A panic in it is caught, logged and answered
    /// with EIO, so a bug reachable from archive bytes or a request costs one reply, not
    /// the daemon (or one of its worker threads). Every lock a tree holds recovers from
    /// poisoning, so later requests still work.
    /// The mode `ino` gets when `caller` (who lacks CAP_FSETID) writes to it or
    /// truncates it, if that clears set-id bits (see [`super::killpriv`]).
    fn mode_without_setid(&self, ino: u64, caller: &Caller) -> crate::Result<Option<u32>> {
        let a = self.tree.attr(ino)?;
        let bits = caller.bits_to_clear(a.mode, a.gid);
        Ok((bits != 0).then_some(a.mode & 0o7777 & !bits))
    }

    fn run<R>(
        &self,
        op: &'static str,
        ino: u64,
        f: impl FnOnce() -> crate::Result<R>,
    ) -> crate::Result<R> {
        match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => {
                let what = p
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| p.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("unknown panic");
                log::error!("{op} of inode {ino} panicked ({what}); answered EIO");
                Err(Error::Errno(libc::EIO))
            }
        }
    }

    /// The test hook (see [`PANIC_HOOK_ENV`]): panics when `name` is the configured one.
    fn test_panic(&self, name: &[u8]) {
        if self.panic_on.as_deref() == Some(name) {
            panic!("test hook {PANIC_HOOK_ENV} hit");
        }
    }

    fn reply_entry(
        &self,
        op: &'static str,
        parent: u64,
        r: impl FnOnce() -> crate::Result<u64>,
        reply: ReplyEntry,
    ) {
        let r = self.run(op, parent, || {
            let ino = r()?;
            // The tree counted the entry as a reference; one that is not sent is not.
            self.tree
                .attr(ino)
                .inspect_err(|_| self.tree.forget(ino, 1))
        });
        match r {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn owner(req: &Request) -> Owner {
    Owner {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    SetTime::At(-(d.as_secs() as i64), 0)
                } else {
                    SetTime::At(-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                }
            }
        },
    })
}

fn empty(r: crate::Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn errno(e: &Error) -> Errno {
    if !matches!(e, Error::Errno(_)) {
        log::error!("{e}");
    }
    Errno::from_i32(e.errno())
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time(secs: i64, nsec: u32) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nsec))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec))))
    };
    t.unwrap_or(UNIX_EPOCH)
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = time(a.mtime, a.mtime_nsec);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime, a.atime_nsec),
        mtime,
        ctime: time(a.ctime, a.ctime_nsec),
        crtime: mtime,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Replies with an xattr value or list, honouring the size-probe protocol.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(data);
    }
}

const EROFS: Errno = Errno::EROFS;

impl<T: Tree + 'static> Filesystem for SnapFs<T> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_ASYNC_READ;
        let _ = config.add_capabilities(wanted & config.capabilities());
        let _ = config
            .set_max_readahead(MAX_READ)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config
            .set_max_write(MAX_READ)
            .or_else(|max| config.set_max_write(max));
        if self.tree.writable()
            && config
                .capabilities()
                .contains(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
        {
            self.kill_priv = config
                .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
                .is_ok();
            if self.kill_priv {
                log::debug!("FUSE_HANDLE_KILLPRIV_V2 on: the daemon clears set-id bits on writes");
            }
        }
        if self.want_passthrough {
            // Depth 1: backing files on a plain file system, and the mount itself
            // may still be a lower layer of an overlayfs.
            let offered = config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH);
            if offered
                && config.set_max_stack_depth(1).is_ok()
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            {
                self.passthrough = Passthrough::on(self.kill_priv);
                log::debug!("FUSE passthrough on: whole upper files bypass the daemon");
            } else {
                log::debug!(
                    "FUSE passthrough unavailable: the kernel does not offer it (Linux 6.9+); \
                     files are served through the daemon"
                );
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(ms) = std::env::var(EXIT_DELAY_HOOK_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.run("lookup", parent.0, || {
            self.test_panic(name.as_bytes());
            let ino = self.tree.lookup(parent.0, name.as_bytes())?;
            self.tree
                .attr(ino)
                .inspect_err(|_| self.tree.forget(ino, 1))
        });
        match r {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            // Immutable: a miss stays a miss, so let the kernel cache it too.
            Err(Error::Errno(libc::ENOENT)) => {
                reply.entry(&self.ttl, &negative_attr(), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _ = self.run("forget", ino.0, || {
            self.tree.forget(ino.0, nlookup);
            Ok(())
        });
    }

    // batch_forget: fuser's default calls `forget` for each node (its `ForgetOne`
    // type is not exported, so it cannot be overridden here).

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.run("getattr", ino.0, || self.tree.attr(ino.0)) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.run("readlink", ino.0, || self.tree.read_link(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !self.tree.writable() {
            // A read-only tree keeps no per-open state: ENOSYS tells the kernel
            // (FUSE_NO_OPEN_SUPPORT, Linux 4.19+) to stop sending OPEN and RELEASE for
            // every file, and to keep the page cache across opens (its default without
            // open). The mount is MS_RDONLY, so the VFS refuses write opens itself.
            // Reading every small file then costs LOOKUP + READ instead of five
            // round trips.
            return reply.error(Errno::ENOSYS);
        }
        match self.run("open", ino.0, || self.tree.open(ino.0, flags.0)) {
            Ok(fh) => {
                let a = OpenAnswer {
                    reply,
                    fh: FileHandle(fh),
                    flags: self.open_flags(false),
                };
                self.passthrough.answer(&self.tree, ino.0, a)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.run("read", ino.0, || self.tree.read(ino.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self.run("opendir", ino.0, || {
            let a = self.tree.attr(ino.0)?;
            if a.mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(Error::Errno(libc::ENOTDIR));
            }
            self.tree.open_dir(ino.0)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), self.open_flags(true)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        empty(
            self.run("releasedir", ino.0, || self.tree.release_dir(ino.0, fh.0)),
            reply,
        );
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(
            self.run("fsyncdir", ino.0, || self.tree.fsync(ino.0, datasync)),
            reply,
        );
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        if !self.tree.writable() {
            // Nothing to flush, ever: ENOSYS stops the kernel sending FLUSH on close.
            return reply.error(Errno::ENOSYS);
        }
        empty(
            self.run("flush", ino.0, || self.tree.flush(ino.0, fh.0)),
            reply,
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.run("release", ino.0, || self.tree.release(ino.0, fh.0));
        self.passthrough.released(ino.0);
        empty(r, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(
            self.run("fsync", ino.0, || self.tree.fsync(ino.0, datasync)),
            reply,
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.run("readdir", ino.0, || {
            self.tree
                .read_dir_handle(ino.0, fh.0, offset, &mut |next, name, child, mode| {
                    reply.add(
                        INodeNo(child),
                        next,
                        file_type(mode),
                        OsStr::from_bytes(name),
                    )
                })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        let r = self.run("readdirplus", ino.0, || {
            self.tree
                .read_dir_plus(ino.0, fh.0, offset, &mut |next, name, a| {
                    reply.add(
                        INodeNo(a.ino),
                        next,
                        OsStr::from_bytes(name),
                        &ttl,
                        &file_attr(a),
                        Generation(0),
                    )
                })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = self.run("statfs", 1, || {
            Ok((self.tree.stats(), self.tree.free_space()))
        });
        let (s, free) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(errno(&e)),
        };
        match free {
            None => reply.statfs(s.blocks / 8, 0, 0, s.files, 0, 4096, 255, 4096),
            Some(f) => reply.statfs(
                s.blocks / 8 + f.blocks_free,
                f.blocks_free,
                f.blocks_avail,
                s.files + f.files_free,
                f.files_free,
                4096,
                255,
                4096,
            ),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.run("getxattr", ino.0, || {
            self.tree.xattr(ino.0, name.as_bytes())
        }) {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.run("listxattr", ino.0, || self.tree.xattr_names(ino.0)) {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) && !self.tree.writable() {
            return reply.error(EROFS);
        }
        match self.run("access", ino.0, || self.tree.attr(ino.0)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::from_i32(libc::EINVAL)),
        };
        let r = self.run("lseek", ino.0, || self.tree.seek_data(ino.0, off, data));
        match r.map(i64::try_from) {
            Ok(Ok(o)) => reply.offset(o),
            Ok(Err(_)) => reply.error(Errno::from_i32(libc::EOVERFLOW)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    // Everything below modifies the tree (EROFS unless the tree is writable).

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let r = self.run("setattr", ino.0, || {
            if self.kill_priv && size.is_some() && mode.is_none() {
                // A truncation by a caller without CAP_FSETID drops the set-id bits.
                let caller = caller(req);
                if let Some(m) = self.mode_without_setid(ino.0, &caller)? {
                    if !caller.has_fsetid() {
                        set.mode = Some(m);
                    }
                }
            }
            self.tree.set_attr(ino.0, &set)
        });
        match r {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = || {
            self.tree
                .mknod(parent.0, name.as_bytes(), mode, rdev, owner(req))
        };
        self.reply_entry("mknod", parent.0, r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = || self.tree.mkdir(parent.0, name.as_bytes(), mode, owner(req));
        self.reply_entry("mkdir", parent.0, r, reply);
    }

    fn unlink(&self, _r: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            self.run("unlink", parent.0, || {
                self.tree.unlink(parent.0, name.as_bytes())
            }),
            reply,
        );
    }

    fn rmdir(&self, _r: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            self.run("rmdir", parent.0, || {
                self.tree.rmdir(parent.0, name.as_bytes())
            }),
            reply,
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = || {
            self.tree.symlink(
                parent.0,
                name.as_bytes(),
                target.as_os_str().as_bytes(),
                owner(req),
            )
        };
        self.reply_entry("symlink", parent.0, r, reply);
    }

    fn rename(
        &self,
        _r: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.run("rename", parent.0, || {
            self.tree.rename(
                parent.0,
                name.as_bytes(),
                new_parent.0,
                new_name.as_bytes(),
                flags.bits(),
            )
        });
        empty(r, reply);
    }

    fn link(
        &self,
        _r: &Request,
        ino: INodeNo,
        new_parent: INodeNo,
        new_name: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = || self.tree.link(ino.0, new_parent.0, new_name.as_bytes());
        self.reply_entry("link", ino.0, r, reply);
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _f: OpenFlags,
        _l: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.run("write", ino.0, || {
            // The kernel found the writer without CAP_FSETID and the file with a bit
            // to clear.
            if self.kill_priv && wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                if let Some(m) = self.mode_without_setid(ino.0, &caller(req))? {
                    let set = SetAttr {
                        mode: Some(m),
                        ..SetAttr::default()
                    };
                    self.tree.set_attr(ino.0, &set)?;
                    // The kernel's cached mode still has the bits (attributes only).
                    if let Some(n) = self.notifier.get() {
                        let _ = n.inval_inode(ino, -1, 0);
                    }
                }
            }
            self.tree.write(ino.0, fh.0, offset, data)
        }) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _r: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.run("setxattr", ino.0, || {
            self.tree.set_xattr(ino.0, name.as_bytes(), value, flags)
        });
        empty(r, reply);
    }

    fn removexattr(&self, _r: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            self.run("removexattr", ino.0, || {
                self.tree.remove_xattr(ino.0, name.as_bytes())
            }),
            reply,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.run("create", parent.0, || {
            self.tree
                .create(parent.0, name.as_bytes(), mode, flags, owner(req))
                .and_then(|(ino, fh)| Ok((self.tree.attr(ino)?, fh)))
        });
        match r {
            Ok((a, fh)) => {
                let a = CreateAnswer {
                    reply,
                    ttl: self.ttl,
                    attr: file_attr(&a),
                    fh: FileHandle(fh),
                    flags: self.open_flags(false),
                };
                let ino = a.attr.ino.0;
                self.passthrough.answer(&self.tree, ino, a)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _r: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.run("fallocate", ino.0, || {
            self.tree.fallocate(ino.0, fh.0, offset, length, mode)
        });
        empty(r, reply);
    }
}

/// The answer to an `open`.
struct OpenAnswer {
    reply: ReplyOpen,
    fh: FileHandle,
    flags: FopenFlags,
}

impl Answer for OpenAnswer {
    fn register(&self, f: &File) -> std::io::Result<BackingId> {
        self.reply.open_backing(f)
    }
    fn through(self, id: &BackingId) {
        self.reply.opened_passthrough(self.fh, self.flags, id)
    }
    fn served(self) {
        self.reply.opened(self.fh, self.flags)
    }
}

/// The answer to a `create`: the new entry and its open handle.
struct CreateAnswer {
    reply: ReplyCreate,
    ttl: Duration,
    attr: FileAttr,
    fh: FileHandle,
    flags: FopenFlags,
}

impl Answer for CreateAnswer {
    fn register(&self, f: &File) -> std::io::Result<BackingId> {
        self.reply.open_backing(f)
    }
    fn through(self, id: &BackingId) {
        let (ttl, attr) = (self.ttl, self.attr);
        self.reply
            .created_passthrough(&ttl, &attr, Generation(0), self.fh, self.flags, id)
    }
    fn served(self) {
        let (ttl, attr) = (self.ttl, self.attr);
        self.reply
            .created(&ttl, &attr, Generation(0), self.fh, self.flags)
    }
}

/// A lookup miss cached by the kernel: an entry with inode 0.
fn negative_attr() -> FileAttr {
    let mut a = file_attr(&Attr {
        ino: 0,
        mode: libc::S_IFREG,
        nlink: 0,
        uid: 0,
        gid: 0,
        size: 0,
        blocks: 0,
        mtime: 0,
        mtime_nsec: 0,
        atime: 0,
        atime_nsec: 0,
        ctime: 0,
        ctime_nsec: 0,
        rdev: 0,
        implicit: false,
    });
    a.ino = INodeNo(0);
    a
}
