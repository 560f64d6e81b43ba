//! FUSE passthrough (Linux 6.9+): an open of a file whose bytes all lie in one local
//! file at the offsets the view shows them (a whole upper file, see
//! [`Tree::backing_file`]) is answered with that file as its backing file, and the
//! kernel then reads, writes and maps it itself, without a request to the daemon.
//!
//! The kernel keeps an inode in one io mode at a time: while one handle of it is
//! passed through, every new open of it must be too, with the same backing file,
//! and while one handle goes through the daemon (its page cache), none may be
//! passed through (either mistake fails the user's `open` with EIO). So the modes
//! are kept per inode here, with the backing id its passthrough opens share; the id
//! is closed when the last of them is released (the kernel has left that mode by
//! then: it drops a file's io mode before it sends its RELEASE).
//!
//! Registering a backing file needs CAP_SYS_ADMIN in the initial user namespace and
//! a backing file system that is not stacked too deep; the first refusal turns
//! passthrough off for the session with one debug log line, and every open is then
//! served through the daemon as without it.
//!
//! When the daemon clears set-id bits for the kernel (see [`super::killpriv`]), a
//! file with one of them is served through the daemon: its writes must reach it.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use fuser::BackingId;

use super::killpriv::has_setid;
use crate::index::tree::Tree;

/// Test hook: when this environment variable is set when the daemon starts, every
/// backing-file registration fails (EPERM, as in a user namespace) without asking
/// the kernel, so the tests can watch the fallback. Unset in normal use.
pub const NO_BACKING_HOOK_ENV: &str = "SNAPFS_TEST_NO_BACKING";

/// One way to answer an open: the reply and what it carries besides the mode.
pub(super) trait Answer {
    /// Registers `f` as a backing file of this session.
    fn register(&self, f: &File) -> std::io::Result<BackingId>;
    /// Answers with passthrough to `id`.
    fn through(self, id: &BackingId);
    /// Answers without passthrough (the daemon serves the handle).
    fn served(self);
}

/// The open handles of one inode, by io mode.
#[derive(Default)]
struct Io {
    /// Handles served through the daemon.
    served: u32,
    /// Handles passed through, and the backing id they share.
    through: u32,
    backing: Option<BackingId>,
}

/// The passthrough state of one session.
pub(super) struct Passthrough {
    /// Whether opens are tracked at all: the mount asked for passthrough and the
    /// kernel agreed to it.
    tracking: bool,
    /// Whether new backing files may be registered (off after the first refusal).
    on: AtomicBool,
    /// [`NO_BACKING_HOOK_ENV`] was set.
    refuse: bool,
    /// Files with set-id bits are served through the daemon (it clears the bits on
    /// writes, FUSE_HANDLE_KILLPRIV_V2).
    setid_served: bool,
    inodes: Mutex<HashMap<u64, Io>>,
}

impl Passthrough {
    /// Passthrough off (the mount did not ask, or the kernel cannot).
    pub(super) fn off() -> Self {
        Passthrough {
            tracking: false,
            on: AtomicBool::new(false),
            refuse: false,
            setid_served: false,
            inodes: Mutex::new(HashMap::new()),
        }
    }

    /// Passthrough on: the kernel agreed to it at init. `setid_served`: the daemon
    /// clears set-id bits on writes, so files with them are not passed through.
    pub(super) fn on(setid_served: bool) -> Self {
        Passthrough {
            tracking: true,
            on: AtomicBool::new(true),
            refuse: std::env::var_os(NO_BACKING_HOOK_ENV).is_some(),
            setid_served,
            inodes: Mutex::new(HashMap::new()),
        }
    }

    /// Answers an open of `ino`, already opened in `tree`: passed through if `tree`
    /// has a backing file for it and the inode's other handles allow it.
    pub(super) fn answer(&self, tree: &impl Tree, ino: u64, a: impl Answer) {
        if !self.tracking {
            return a.served();
        }
        let mut inodes = self.inodes.lock().unwrap_or_else(|e| e.into_inner());
        let io = inodes.entry(ino).or_default();
        if io.served == 0 {
            if io.backing.is_none() && self.on.load(Ordering::Relaxed) && !self.setid(tree, ino) {
                if let Some(f) = tree.backing_file(ino) {
                    match self.register(&a, &f) {
                        Ok(id) => io.backing = Some(id),
                        Err(e) => self.refused(ino, &e),
                    }
                }
            }
            if let Some(id) = &io.backing {
                io.through += 1;
                return a.through(id);
            }
        }
        io.served += 1;
        a.served()
    }

    /// The kernel released one handle of `ino` (answered by [`Passthrough::answer`]).
    pub(super) fn released(&self, ino: u64) {
        if !self.tracking {
            return;
        }
        let mut inodes = self.inodes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(io) = inodes.get_mut(&ino) else {
            return;
        };
        // One of the two counts is zero: the modes never mix.
        if io.through > 0 {
            io.through -= 1;
        } else {
            io.served = io.served.saturating_sub(1);
        }
        if io.through == 0 && io.served == 0 {
            // Drops the backing id (closing it in the kernel).
            inodes.remove(&ino);
        }
    }

    /// Whether `ino` must be served because the daemon clears its set-id bits.
    fn setid(&self, tree: &impl Tree, ino: u64) -> bool {
        self.setid_served && tree.attr(ino).map_or(true, |a| has_setid(a.mode))
    }

    fn register(&self, a: &impl Answer, f: &File) -> std::io::Result<BackingId> {
        if self.refuse {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        a.register(f)
    }

    /// A backing file was refused: passthrough stays off for the session.
    fn refused(&self, ino: u64, e: &std::io::Error) {
        if self.on.swap(false, Ordering::Relaxed) {
            let why = match e.raw_os_error() {
                Some(libc::EPERM) => " (it needs CAP_SYS_ADMIN in the initial user namespace)",
                Some(libc::ELOOP) => " (the upper dir is on a stacked file system)",
                _ => "",
            };
            log::debug!(
                "FUSE passthrough unavailable: the kernel refused inode {ino}'s upper file \
                 as a backing file: {e}{why}; files are served through the daemon"
            );
        }
    }
}
