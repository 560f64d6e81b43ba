//! Clearing set-user-ID and set-group-ID bits for the kernel (FUSE_HANDLE_KILLPRIV_V2,
//! Linux 5.11+), negotiated for writable trees.
//!
//! Without it the kernel asks the daemon for `security.capability` before every
//! write (GETXATTR), to learn whether the write must drop privileges. With it, the
//! super block is marked "no security bits" (SB_NOSEC): an inode found clean is
//! written without asking again until its attributes are refreshed, and the daemon
//! drops the bits itself, as the VFS does for a local file system:
//!
//! - a write whose request says so (`FUSE_WRITE_KILL_SUIDGID`: the writer lacks
//!   CAP_FSETID) clears set-user-ID, and set-group-ID when the group may execute
//!   or the writer is not in the file's group;
//! - a truncation by a caller without CAP_FSETID does the same (fuser does not pass
//!   the kernel's FATTR_KILL_SUIDGID on, so the caller's capabilities are read from
//!   `/proc`, and only when the file has a bit to clear);
//! - chown: the upper file's own chown clears them;
//! - `security.capability` is still removed by the kernel (REMOVEXATTR), as before.
//!
//! Passthrough writes never reach the daemon, so a file with one of the bits is not
//! passed through (see [`super::passthrough`]).

/// CAP_FSETID's bit in a capability set.
const CAP_FSETID: u32 = 4;

/// Whether `mode` has a set-id bit (such a file is not passed through).
pub(super) fn has_setid(mode: u32) -> bool {
    mode & (libc::S_ISUID | libc::S_ISGID) != 0
}

/// The process behind a request, as far as clearing set-id bits asks about it.
pub(super) struct Caller {
    /// Its pid (0: not visible from here, another pid namespace).
    pub pid: u32,
    /// Its file system uid and gid.
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    /// The mode bits a write or truncation by this caller, who lacks CAP_FSETID,
    /// clears from a file of mode `mode` and group `file_gid`, as the VFS does
    /// (`setattr_should_drop_suidgid`): set-user-ID always; set-group-ID when the
    /// group may execute, or when the caller is not in the file's group.
    pub(super) fn bits_to_clear(&self, mode: u32, file_gid: u32) -> u32 {
        let mut bits = mode & libc::S_ISUID;
        if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !self.in_group(file_gid)) {
            bits |= libc::S_ISGID;
        }
        bits
    }

    /// Whether the caller holds CAP_FSETID (read from `/proc/PID/status`; a process
    /// that is gone or not visible counts as privileged only if it is root).
    pub(super) fn has_fsetid(&self) -> bool {
        self.status()
            .and_then(|s| effective_caps(&s))
            .map_or(self.uid == 0, |c| c >> CAP_FSETID & 1 == 1)
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid
            || self
                .status()
                .is_some_and(|s| supplementary_groups(&s).any(|g| g == gid))
    }

    fn status(&self) -> Option<String> {
        if self.pid == 0 {
            return None;
        }
        std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()
    }
}

/// The effective capability set from the text of `/proc/PID/status`.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The supplementary groups from the text of `/proc/PID/status`.
fn supplementary_groups(status: &str) -> impl Iterator<Item = u32> + '_ {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> Caller {
        Caller {
            pid: 0,
            uid: 65534,
            gid: 65534,
        }
    }

    #[test]
    fn bits_to_clear_follow_the_vfs() {
        let c = nobody();
        assert_eq!(c.bits_to_clear(libc::S_IFREG | 0o4755, 0), libc::S_ISUID);
        assert_eq!(c.bits_to_clear(libc::S_IFREG | 0o2755, 0), libc::S_ISGID);
        // Set-group-ID without group execute: cleared unless the caller is in the group.
        assert_eq!(c.bits_to_clear(libc::S_IFREG | 0o2745, 0), libc::S_ISGID);
        assert_eq!(c.bits_to_clear(libc::S_IFREG | 0o2745, 65534), 0);
        assert_eq!(
            c.bits_to_clear(libc::S_IFREG | 0o6755, 65534),
            libc::S_ISUID | libc::S_ISGID
        );
        assert_eq!(c.bits_to_clear(libc::S_IFREG | 0o755, 0), 0);
        assert!(has_setid(0o2000) && has_setid(0o4000) && !has_setid(0o1777));
    }

    #[test]
    fn status_fields_parse() {
        let s =
            "Name:\tcat\nGroups:\t4 24 27 \nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(s), Some(0x1ff_ffff_ffff));
        assert_eq!(supplementary_groups(s).collect::<Vec<_>>(), [4, 24, 27]);
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps("Name:\tx\n"), None);
        assert_eq!(supplementary_groups("Groups:\n").count(), 0);
    }

    #[test]
    fn this_process_is_judged_by_its_capabilities() {
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let me = Caller {
            pid: std::process::id(),
            uid,
            gid,
        };
        let caps = effective_caps(&std::fs::read_to_string("/proc/self/status").unwrap());
        let expect = caps.map_or(uid == 0, |c| c >> CAP_FSETID & 1 == 1);
        assert_eq!(me.has_fsetid(), expect);
        assert!(!nobody().has_fsetid());
        let root = Caller {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        assert!(root.has_fsetid());
    }
}
