//! Mount / umount lifecycle: errors are one readable line and leave no mount,
//! stale mounts of a killed daemon can be cleaned up, the daemon exits on
//! umount.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::corpus;
use crate::util::{self, Mount, TestDir};

fn assert_mount_fails(td: &TestDir, archive: &Path, needle: &str) {
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let r = util::snapfs([OsStr::new("mount"), archive.as_os_str(), mnt.as_os_str()]);
    let still = util::is_mounted(&mnt);
    if still {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    util::assert_one_line_error(&r, needle);
    assert!(!still, "failed mount left a mount at {}", mnt.display());
    let gone = util::poll_until(Duration::from_secs(10), || {
        util::pids_with_arg(&mnt)
            .into_iter()
            .all(|p| !util::process_alive(p))
    });
    assert!(
        gone,
        "a snapfs process for {} survived a failed mount",
        mnt.display()
    );
    assert!(util::list_dir(&mnt).is_empty());
}

#[test]
fn mount_missing_archive_fails_cleanly() {
    let td = TestDir::new("missing");
    assert_mount_fails(&td, &td.join("does-not-exist.tar"), "does-not-exist.tar");
}

#[test]
fn mount_garbage_tar_fails_cleanly() {
    let td = TestDir::new("garbage-tar");
    let p = td.join("garbage.tar");
    fs::write(&p, util::random_bytes(100_000, 17)).unwrap();
    assert_mount_fails(&td, &p, "garbage.tar");
}

#[test]
fn mount_garbage_inside_gzip_fails_cleanly() {
    let td = TestDir::new("garbage-gz");
    fs::write(td.join("garbage"), util::random_bytes(100_000, 18)).unwrap();
    util::sh(td.path(), "gzip -c garbage > garbage.tar.gz");
    assert_mount_fails(&td, &td.join("garbage.tar.gz"), "garbage.tar.gz");
}

#[test]
fn mount_garbage_inside_zstd_fails_cleanly() {
    let td = TestDir::new("garbage-zst");
    fs::write(td.join("garbage"), util::random_bytes(100_000, 19)).unwrap();
    util::sh(td.path(), "zstd -q -c garbage > garbage.tar.zst");
    assert_mount_fails(&td, &td.join("garbage.tar.zst"), "garbage.tar.zst");
}

#[test]
fn mount_corrupt_gzip_stream_fails_cleanly() {
    // Valid gzip magic, then damaged deflate data.
    let td = TestDir::new("corrupt-gz");
    let tar = corpus::small_tar(td.path(), "c.tar", 7);
    let gz = corpus::compress(&tar, corpus::Comp::Gzip);
    let mut b = fs::read(&gz).unwrap();
    for i in (40..b.len() - 8).step_by(97) {
        b[i] ^= 0xff;
    }
    fs::write(&gz, &b).unwrap();
    assert_mount_fails(&td, &gz, &gz.file_name().unwrap().to_string_lossy());
}

#[test]
fn index_missing_archive_fails_cleanly() {
    let td = TestDir::new("index-missing");
    let r = util::snapfs([OsStr::new("index"), td.join("nope.tar").as_os_str()]);
    util::assert_one_line_error(&r, "nope.tar");
    assert!(!td.join("nope.tar.snapfs-idx").exists());
}

#[test]
fn mount_on_missing_mountpoint_fails() {
    let td = TestDir::new("no-mnt");
    let tar = corpus::small_tar(td.path(), "a.tar", 8);
    let mnt = td.join("no/such/dir");
    let r = util::snapfs([OsStr::new("mount"), tar.as_os_str(), mnt.as_os_str()]);
    util::assert_one_line_error(&r, "no/such/dir");
}

#[test]
fn umount_cleans_up_stale_mount_of_killed_daemon() {
    let td = TestDir::new("stale");
    let tar = corpus::small_tar(td.path(), "a.tar", 9);
    let m = Mount::new(&tar, &td.join("mnt"));
    assert!(m.join("readme").exists());
    let pid = util::daemon_pid(m.path(), &tar);
    util::run_ok(Command::new("kill").arg("-9").arg(pid.to_string()));
    assert!(
        util::poll_until(Duration::from_secs(20), || !util::process_alive(pid)),
        "daemon {pid} survived kill -9"
    );
    // (The kernel may answer from its attribute cache for a moment.)
    let mut last = None;
    let stale = util::poll_until(Duration::from_secs(10), || {
        last = Some(
            fs::metadata(m.path().join("readme"))
                .map(|_| ())
                .and_then(|_| fs::read_dir(m.path()).map(|_| ())),
        );
        matches!(&last, Some(Err(e)) if util::errno(e) == util::ENOTCONN)
    });
    assert!(
        stale,
        "a mount whose daemon died should give ENOTCONN, got {last:?}"
    );
    assert!(util::is_mounted(m.path()));
    let r = util::snapfs([OsStr::new("umount"), m.path().as_os_str()]);
    r.assert_ok();
    assert!(
        !util::is_mounted(m.path()),
        "stale mount still listed after snapfs umount"
    );
    let mnt = m.path().to_path_buf();
    m.unmount(); // no-op now, checks it is gone
                 // The mountpoint is usable again.
    let m2 = Mount::new(&tar, &mnt);
    assert_eq!(fs::read(m2.join("readme")).unwrap(), b"seed 9\n");
}

#[test]
fn daemon_exits_after_umount() {
    let td = TestDir::new("daemon-exit");
    let tar = corpus::small_tar(td.path(), "a.tar", 10);
    let m = Mount::new(&tar, &td.join("mnt"));
    let pid = util::daemon_pid(m.path(), &tar);
    m.unmount();
    assert!(
        util::poll_until(Duration::from_secs(20), || !util::process_alive(pid)),
        "daemon {pid} still running after umount"
    );
}

#[test]
fn umount_of_something_not_mounted_fails() {
    let td = TestDir::new("umount-nothing");
    let d = td.mkdir("plain");
    let r = util::snapfs([OsStr::new("umount"), d.as_os_str()]);
    r.assert_fail();
    assert!(!util::lines(&r.stderr_str()).is_empty(), "no error message");
}

#[test]
fn issue_10_mounting_over_a_live_mount_is_refused_and_umount_returns_promptly() {
    let td = TestDir::new("overmount");
    let tar = corpus::small_tar(td.path(), "a.tar", 31);
    let other = corpus::small_tar(td.path(), "b.tar", 32);
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let m = Mount::new(&tar, &mnt);
    let r = util::snapfs([OsStr::new("mount"), other.as_os_str(), mnt.as_os_str()]);
    util::assert_one_line_error(&r, &mnt.display().to_string());
    assert!(
        r.stderr_str().contains("already has a fuse.snapfs mount"),
        "{}",
        r.stderr_str()
    );
    let stacked = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!(" {} ", mnt.display())))
        .count();
    assert_eq!(stacked, 1, "only the first mount is there");
    assert_eq!(fs::read(mnt.join("readme")).unwrap(), b"seed 31\n");
    // The one daemon exits and umount says nothing about another.
    let r = util::snapfs([OsStr::new("umount"), mnt.as_os_str()]);
    r.assert_ok();
    assert!(r.stderr_str().is_empty(), "{}", r.stderr_str());
    assert!(!util::is_mounted(&mnt));
    drop(m);
}

/// `snapfs` hands serve, volume and remote objects to `snapfs-net` beside it: the same
/// result through either, and one clear error line when `snapfs-net` is missing.
#[test]
fn lean_executable_hands_network_commands_to_snapfs_net() {
    let td = TestDir::new("lean");
    let net = Path::new(util::bin()).with_file_name("snapfs-net");
    let sock = td.join("no-service.sock");
    let volume_ls = [
        OsStr::new("volume"),
        OsStr::new("ls"),
        OsStr::new("--service"),
        sock.as_os_str(),
    ];
    let lean = util::snapfs(volume_ls);
    let full = util::run(Command::new(&net).args(volume_ls));
    util::assert_one_line_error(&lean, "cannot reach the snapfs service");
    assert_eq!(lean.stderr_str(), full.stderr_str());
    // A remote object: a closed port refuses the HEAD, and the error names the URL.
    let mnt = td.mkdir("mnt");
    let url = "http://127.0.0.1:9/x.tar";
    let mount_url = [OsStr::new("mount"), OsStr::new(url), mnt.as_os_str()];
    let r = util::snapfs(mount_url);
    util::assert_one_line_error(&r, url);
    // Alone, the lean executable names what it is missing.
    let alone = td.mkdir("bin").join("snapfs");
    fs::copy(util::bin(), &alone).unwrap();
    for args in [&volume_ls[..], &mount_url] {
        let r = util::run(Command::new(&alone).args(args));
        util::assert_one_line_error(&r, "snapfs-net");
    }
    // Local commands need only the lean one.
    util::run_ok(Command::new(&alone).arg("--version"));
    assert!(!util::is_mounted(&mnt));
}

/// FUSE worker threads (`fuser-N`) of daemon `pid`.
fn fuse_workers(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|comm| comm.starts_with("fuser-"))
        .count()
}

#[test]
fn issue_15_workers_one_per_core_read_only_eight_writable_or_as_given() {
    let td = TestDir::new("workers");
    let tar = corpus::small_tar(td.path(), "a.tar", 11);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let m = Mount::new(&tar, &td.join("ro"));
    assert_eq!(
        fuse_workers(util::daemon_pid(m.path(), &tar)),
        cores.clamp(2, 8)
    );
    assert_eq!(fs::read(m.join("readme")).unwrap(), b"seed 11\n");
    m.unmount();
    let upper = td.mkdir("upper");
    let upper_s = upper.to_str().unwrap().to_string();
    let m = Mount::with_args(&tar, &td.join("rw"), &["--upper", &upper_s]);
    assert_eq!(
        fuse_workers(util::daemon_pid(m.path(), &tar)),
        8,
        "writable view"
    );
    m.unmount();
    let m = Mount::with_args(&tar, &td.join("given"), &["-o", "threads=3"]);
    assert_eq!(
        fuse_workers(util::daemon_pid(m.path(), &tar)),
        3,
        "threads=3"
    );
    assert_eq!(fs::read(m.join("readme")).unwrap(), b"seed 11\n");
}
