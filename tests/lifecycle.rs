//! Operating snapfs like any FUSE daemon: `-o allow_other` for another user (created
//! by the test) with the archive's modes enforced, `nosuid,nodev` by default, the
//! mount(8) helper (`mount -t fuse.snapfs`, an fstab line via `mount -T`), `snapfs
//! list`, `--pid-file`/`--log-file`, `snapfs umount --lazy` and recovery from a daemon
//! killed with kill -9.
//!
//! ROOT ONLY: creating a user, switching to it (setpriv), installing
//! /sbin/mount.fuse.snapfs and mount(8) itself need root.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::util::{self, sh, Mount, Run, TestDir};

/// The unprivileged user the tests switch to.
const USER: &str = "snapfs-it";

/// Creates the test user once (useradd locks /etc/passwd, so never concurrently);
/// returns its (uid, gid).
fn test_user() -> (u32, u32) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ids = || {
        let u = util::run(Command::new("id").arg("-u").arg(USER));
        let g = util::run(Command::new("id").arg("-g").arg(USER));
        (u.ok() && g.ok()).then(|| {
            (
                u.stdout_str().trim().parse().unwrap(),
                g.stdout_str().trim().parse().unwrap(),
            )
        })
    };
    if let Some(ids) = ids() {
        return ids;
    }
    util::run_ok(
        Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin", USER]),
    );
    ids().expect("test user after useradd")
}

/// Runs `sh -c script` as the test user (no supplementary groups).
fn as_user(uid: u32, gid: u32, cwd: &Path, script: &str) -> Run {
    util::run_timeout(
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .args(["sh", "-c", script])
            .current_dir(cwd),
        Duration::from_secs(60),
    )
}

/// An archive with root-owned public and private files, a private dir, and a 0600 file
/// owned by `uid:gid`.
fn modes_archive(td: &TestDir, uid: u32, gid: u32) -> PathBuf {
    let p = td.join("modes.tar");
    util::python(
        r#"
import io, sys, tarfile
uid, gid = int(sys.argv[2]), int(sys.argv[3])
t = tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT)
def add(name, u, g, mode, data=None):
    i = tarfile.TarInfo(name); i.uid, i.gid, i.mode, i.mtime = u, g, mode, 1600000000
    if data is None:
        i.type = tarfile.DIRTYPE; t.addfile(i)
    else:
        i.size = len(data); t.addfile(i, io.BytesIO(data))
add('.', 0, 0, 0o755)
add('public', 0, 0, 0o644, b'public\n')
add('secret', 0, 0, 0o600, b'secret\n')
add('private', 0, 0, 0o700)
add('private/inside', 0, 0, 0o644, b'inside\n')
add('mine', uid, gid, 0o600, b'mine\n')
add('suid-tool', 0, 0, 0o4755, b'#!/bin/sh\nid -u\n')
t.close()
"#,
        [p.display().to_string(), uid.to_string(), gid.to_string()],
    )
    .assert_ok();
    p
}

fn open_up(td: &TestDir) {
    fs::set_permissions(td.path(), fs::Permissions::from_mode(0o755)).unwrap();
}

/// Another user reads through `-o allow_other`; the archive's modes decide what
/// (default_permissions). Without allow_other the user cannot even look. ROOT ONLY.
#[test]
fn allow_other_lets_another_user_in_with_the_archive_modes() {
    let (uid, gid) = test_user();
    let td = TestDir::new("allow-other");
    open_up(&td);
    let tar = modes_archive(&td, uid, gid);
    let script = "for f in public secret mine private/inside; do \
        if cat $f >/dev/null 2>&1; then echo $f=read; else echo $f=denied; fi; done; \
        if ls private >/dev/null 2>&1; then echo ls=ok; else echo ls=denied; fi";
    {
        let m = Mount::with_args(&tar, &td.join("mnt"), &["-o", "allow_other"]);
        assert!(m.join("secret").exists(), "root reads everything");
        let r = as_user(uid, gid, m.path(), script);
        let out = r.stdout_str();
        assert!(r.ok(), "{}", r.stderr_str());
        assert_eq!(
            util::lines(&out),
            [
                "public=read",
                "secret=denied",
                "mine=read",
                "private/inside=denied",
                "ls=denied"
            ],
            "as uid {uid}"
        );
        // Writes are refused (read-only view) even where the mode would allow them.
        let w = as_user(uid, gid, m.path(), "echo x >> mine");
        assert!(
            !w.ok() && w.stderr_str().contains("Read-only"),
            "{}",
            w.stderr_str()
        );
        m.unmount();
    }
    // Without allow_other only the mounting user (root) gets in.
    let m = Mount::new(&tar, &td.join("mnt2"));
    let r = as_user(uid, gid, td.path(), "cat mnt2/public");
    assert!(!r.ok(), "another user read a mount without allow_other");
    assert!(
        r.stderr_str().contains("Permission denied"),
        "{}",
        r.stderr_str()
    );
    m.unmount();
    // --owner presents every entry as the user's: now the user reads the 0600 files.
    let owner = format!("{uid}:{gid}");
    let m = Mount::with_args(
        &tar,
        &td.join("mnt3"),
        &["-o", "allow_other", "--owner", &owner],
    );
    let r = as_user(uid, gid, m.path(), "cat secret private/inside");
    assert!(r.ok(), "{}", r.stderr_str());
    assert_eq!(r.stdout_str(), "secret\ninside\n");
}

/// Mounts are nosuid,nodev unless `-o suid` / `-o dev` ask otherwise. ROOT ONLY.
#[test]
fn mounts_are_nosuid_nodev_unless_asked() {
    let td = TestDir::new("nosuid");
    let tar = modes_archive(&td, 1, 1);
    let opts = |m: &Mount| {
        let i = util::mount_at(m.path()).unwrap();
        i.mount_opts
            .split(',')
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let m = Mount::new(&tar, &td.join("a"));
    let o = opts(&m);
    assert!(
        o.contains(&"nosuid".into()) && o.contains(&"nodev".into()),
        "{o:?}"
    );
    assert!(o.contains(&"ro".into()), "{o:?}");
    // The setuid bit is shown as in the archive, and the kernel ignores it.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(m.join("suid-tool")).unwrap().mode() & 0o7777,
        0o4755
    );
    m.unmount();
    let m = Mount::with_args(&tar, &td.join("b"), &["-o", "suid,dev"]);
    let o = opts(&m);
    assert!(
        !o.contains(&"nosuid".into()) && !o.contains(&"nodev".into()),
        "{o:?}"
    );
}

// ---------------------------------------------------------------- mount helper

/// Points /sbin/mount.fuse.snapfs at the binary under test: idempotent and safe for
/// concurrent tests (a temporary symlink renamed over the old one).
fn install_helper() -> PathBuf {
    let helper = PathBuf::from("/sbin/mount.fuse.snapfs");
    let bin = PathBuf::from(util::bin());
    if fs::read_link(&helper).ok().as_deref() == Some(bin.as_path()) {
        return helper;
    }
    let tmp = PathBuf::from(format!(
        "/sbin/.mount.fuse.snapfs.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&bin, &tmp).unwrap();
    fs::rename(&tmp, &helper).unwrap();
    helper
}

fn small_layers(td: &TestDir) -> (PathBuf, PathBuf) {
    sh(
        td.path(),
        "set -e; mkdir -p base/etc top/etc; echo base > base/etc/name; echo keep > base/keep; \
         echo top > top/etc/name; : > top/.wh.keep; \
         tar --numeric-owner -C base -czf base.tar.gz .; tar --numeric-owner -C top -cf top.tar .",
    )
    .assert_ok();
    (td.join("base.tar.gz"), td.join("top.tar"))
}

/// `mount -t fuse.snapfs` runs the helper: one archive, `:`-separated layers, snapfs
/// options in `-o`, and a line of an fstab file (`mount -T FILE`). ROOT ONLY.
#[test]
fn mount_t_fuse_snapfs_and_fstab_line_work() {
    install_helper();
    let td = TestDir::new("helper");
    let (base, top) = small_layers(&td);
    let mnt = td.mkdir("one").canonicalize().unwrap();
    let r = util::run_timeout(
        Command::new("mount")
            .args(["-t", "fuse.snapfs", "-o", "ro,allow_other,cache_size=64M"])
            .arg(&base)
            .arg(&mnt),
        Duration::from_secs(120),
    );
    let m = Mount::adopt(&base, &mnt);
    assert!(r.ok(), "mount -t fuse.snapfs failed: {}", r.stderr_str());
    let info = util::mount_at(&mnt).expect("mounted");
    assert_eq!(info.fstype, "fuse.snapfs");
    assert!(info.super_opts.contains("allow_other"), "{info:?}");
    assert_eq!(fs::read_to_string(m.join("etc/name")).unwrap(), "base\n");
    // umount(8) unmounts it like any filesystem.
    util::run_ok(Command::new("umount").arg(&mnt));
    assert!(!util::is_mounted(&mnt));
    drop(m);

    // Layers and an upper dir.
    let layered = td.mkdir("layered").canonicalize().unwrap();
    let upper = td.join("upper");
    let source = format!("{}:{}", base.display(), top.display());
    let r = util::run_timeout(
        Command::new("mount")
            .args(["-t", "fuse.snapfs", "-o"])
            .arg(format!("upper={}", upper.display()))
            .arg(&source)
            .arg(&layered),
        Duration::from_secs(120),
    );
    let m = Mount::adopt(&top, &layered);
    assert!(r.ok(), "layered mount failed: {}", r.stderr_str());
    assert_eq!(fs::read_to_string(m.join("etc/name")).unwrap(), "top\n");
    assert!(
        !m.join("keep").exists(),
        "whiteout of the top layer ignored"
    );
    fs::write(m.join("written"), "via helper\n").unwrap();
    assert!(upper.join("tree/written").exists());
    m.unmount();

    // An fstab line, mounted by its mountpoint.
    let fstab_mnt = td.mkdir("from-fstab").canonicalize().unwrap();
    let fstab = td.join("fstab.test");
    fs::write(
        &fstab,
        format!(
            "# snapfs test\n{} {} fuse.snapfs ro,noauto,nofail,allow_other,x-systemd.automount 0 0\n",
            base.display(),
            fstab_mnt.display()
        ),
    )
    .unwrap();
    let r = util::run_timeout(
        Command::new("mount").arg("-T").arg(&fstab).arg(&fstab_mnt),
        Duration::from_secs(120),
    );
    let m = Mount::adopt(&base, &fstab_mnt);
    assert!(r.ok(), "mount from fstab failed: {}", r.stderr_str());
    assert_eq!(fs::read_to_string(m.join("keep")).unwrap(), "keep\n");
    m.unmount();

    // A bad option is one readable line.
    let bad = td.mkdir("bad").canonicalize().unwrap();
    let r = util::run_timeout(
        Command::new("/sbin/mount.fuse.snapfs")
            .arg(&base)
            .arg(&bad)
            .args(["-o", "uid_map=nonsense"]),
        Duration::from_secs(60),
    );
    util::assert_one_line_error(&r, "uid-map");
    assert!(!util::is_mounted(&bad));
}

// ---------------------------------------------------------------- list, pid, log

/// Parses `snapfs list` into (mountpoint, pid, state, archives).
fn list() -> Vec<(String, String, String, String)> {
    let r = util::snapfs(["list"]);
    r.assert_ok();
    let out = r.stdout_str();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("MOUNTPOINT\tPID\tSTATE\tARCHIVES"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.splitn(4, '\t').collect();
            assert_eq!(f.len(), 4, "bad list line {l:?}");
            (f[0].into(), f[1].into(), f[2].into(), f[3].into())
        })
        .collect()
}

fn listed(mnt: &Path) -> Option<(String, String, String, String)> {
    let m = mnt.display().to_string();
    list().into_iter().find(|l| l.0 == m)
}

fn read_pid(f: &Path) -> u32 {
    fs::read_to_string(f).unwrap().trim().parse().unwrap()
}

/// `snapfs list` shows each mount with its daemon pid and archives (all layers);
/// `--pid-file` holds that pid and `--log-file` receives the daemon's log; both
/// are handled on a clean exit. ROOT ONLY (as all mounts here).
#[test]
fn list_pid_file_and_log_file() {
    let td = TestDir::new("list");
    let (base, top) = small_layers(&td);
    let pid_file = td.join("daemon.pid");
    let log_file = td.join("daemon.log");
    let mnt = td.mkdir("layers").canonicalize().unwrap();
    let r = util::run_timeout(
        Command::new(util::bin())
            .arg("mount")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--log-file")
            .arg(&log_file)
            .arg(&base)
            .arg(&top)
            .arg(&mnt),
        Duration::from_secs(120),
    );
    let m = Mount::adopt(&top, &mnt);
    r.assert_ok();
    let single = Mount::new(&base, &td.join("single"));
    let pid = read_pid(&pid_file);
    assert!(util::process_alive(pid));
    assert_eq!(pid, util::daemon_pid(&mnt, &top));
    let (_, lpid, state, archives) = listed(&mnt).expect("layered mount listed");
    assert_eq!(lpid, pid.to_string());
    assert_eq!(state, "live");
    assert_eq!(archives, format!("{} {}", base.display(), top.display()));
    let (_, spid, sstate, sarch) = listed(single.path()).expect("single mount listed");
    assert_eq!(spid, util::daemon_pid(single.path(), &base).to_string());
    assert_eq!(sstate, "live");
    assert_eq!(sarch, base.display().to_string());
    let log = fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains("serving") && log.contains(&mnt.display().to_string()),
        "{log}"
    );
    m.unmount();
    assert!(
        util::poll_until(Duration::from_secs(20), || !util::process_alive(pid)),
        "daemon {pid} survived umount"
    );
    assert!(!pid_file.exists(), "pid file left after a clean exit");
    let log = fs::read_to_string(&log_file).unwrap();
    assert!(log.contains("unmounted"), "{log}");
    assert!(listed(&mnt).is_none());
    single.unmount();
    assert!(listed(&td.join("single").canonicalize().unwrap()).is_none());
}

/// A daemon killed with kill -9 leaves a stale mount that `snapfs list` shows as such;
/// `snapfs umount` removes it and the same mountpoint mounts again at once. ROOT ONLY.
#[test]
fn kill_9_leaves_a_stale_mount_that_umount_clears_for_an_immediate_remount() {
    let td = TestDir::new("kill9");
    let (base, _) = small_layers(&td);
    let pid_file = td.join("pid");
    let pid_s = pid_file.display().to_string();
    let m = Mount::with_args(&base, &td.join("mnt"), &["--pid-file", &pid_s]);
    let mnt = m.path().to_path_buf();
    assert_eq!(fs::read_to_string(m.join("keep")).unwrap(), "keep\n");
    let pid = read_pid(&pid_file);
    util::run_ok(Command::new("kill").arg("-9").arg(pid.to_string()));
    assert!(
        util::poll_until(Duration::from_secs(20), || !util::process_alive(pid)),
        "daemon {pid} survived kill -9"
    );
    let (_, lpid, state, _) = listed(&mnt).expect("stale mount still listed");
    assert_eq!((lpid.as_str(), state.as_str()), ("-", "stale"));
    util::snapfs([OsStr::new("umount"), mnt.as_os_str()]).assert_ok();
    assert!(!util::is_mounted(&mnt));
    m.unmount(); // checks it is gone
    let again = Mount::new(&base, &mnt);
    assert_eq!(
        fs::read_to_string(again.join("etc/name")).unwrap(),
        "base\n"
    );
    let (_, lpid, state, _) = listed(&mnt).expect("remount listed");
    assert_eq!(state, "live");
    assert_ne!(lpid, "-");
}

/// `snapfs umount` refuses a busy mount with one line naming it; `--lazy` detaches it
/// at once, open files keep working, and the daemon exits when the last one closes.
#[test]
fn umount_lazy_detaches_a_busy_mount() {
    let td = TestDir::new("lazy");
    let (base, _) = small_layers(&td);
    let m = Mount::new(&base, &td.join("mnt"));
    let mnt = m.path().to_path_buf();
    let pid = util::daemon_pid(&mnt, &base);
    let mut open = fs::File::open(m.join("etc/name")).unwrap();
    let r = util::snapfs([OsStr::new("umount"), mnt.as_os_str()]);
    util::assert_one_line_error(&r, &mnt.display().to_string());
    assert!(r.stderr_str().contains("busy"), "{}", r.stderr_str());
    assert!(util::is_mounted(&mnt));
    util::snapfs([OsStr::new("umount"), OsStr::new("--lazy"), mnt.as_os_str()]).assert_ok();
    assert!(!util::is_mounted(&mnt), "still mounted after umount --lazy");
    let mut s = String::new();
    std::io::Read::read_to_string(&mut open, &mut s).unwrap();
    assert_eq!(s, "base\n");
    assert!(util::process_alive(pid), "daemon gone while a file is open");
    drop(open);
    assert!(
        util::poll_until(Duration::from_secs(20), || !util::process_alive(pid)),
        "daemon {pid} still running after the last file closed"
    );
    m.unmount();
}

/// `snapfs umount` returns only once the daemon has exited, so the upper dir is free
/// at once: `umount && commit` and `umount && mount` with the same upper never race
/// the exiting daemon (CI once failed on exactly that). The daemon is made slow to
/// exit (test hook: 700 ms after its mount is gone) so the race is certain. Plain
/// `umount(8)` returns before the daemon exits; opening the upper dir then waits for
/// the lock. ROOT ONLY.
#[test]
fn umount_waits_for_the_daemon_so_upper_is_free_at_once() {
    let td = TestDir::new("umount-wait");
    let (base, _) = small_layers(&td);
    let upper = td.join("upper");
    let upper_s = upper.display().to_string();
    for round in 0..4 {
        let mut fg = util::FgMount::start(
            &base,
            &td.join("mnt"),
            &["--upper", &upper_s],
            &[("SNAPFS_TEST_EXIT_DELAY_MS", "700")],
        );
        fs::write(fg.join(format!("round-{round}")), format!("{round}\n")).unwrap();
        let m = fg.mount.take().expect("mounted");
        if round % 2 == 1 {
            // umount(8) does not wait for the daemon.
            sh(td.path(), &format!("umount '{}'", m.path().display())).assert_ok();
            drop(m);
            assert!(
                fg.alive(),
                "round {round}: the exit delay hook did not apply"
            );
        } else {
            m.unmount();
            assert!(
                !fg.alive(),
                "round {round}: daemon still running when snapfs umount returned"
            );
        }
        let delta = td.join(format!("delta-{round}.tar"));
        util::snapfs([
            "commit",
            &base.display().to_string(),
            "--upper",
            &upper_s,
            "-o",
            &delta.display().to_string(),
        ])
        .assert_ok();
        let listing = sh(td.path(), &format!("tar -tf '{}'", delta.display()))
            .assert_ok()
            .stdout_str();
        for r in 0..=round {
            assert!(
                listing.lines().any(|l| l == format!("round-{r}")),
                "round {round}: round-{r} missing from the delta: {listing}"
            );
        }
    }
}
