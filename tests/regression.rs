//! Regressions and contract details of the CLI. Name new tests after the
//! issue they pin (`issue_<n>_<what>`).

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::corpus;
use crate::util::{self, Mount, TestDir};

#[test]
fn mount_is_live_when_the_command_returns() {
    let td = TestDir::new("live");
    let tar = corpus::small_tar(td.path(), "a.tar", 11);
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let r = util::snapfs([OsStr::new("mount"), tar.as_os_str(), mnt.as_os_str()]);
    let live = util::is_mounted(&mnt); // no polling: exit 0 means live
    let _g = Mount::adopt(&tar, &mnt);
    r.assert_ok();
    assert!(
        live,
        "snapfs mount exited 0 before the mount was in mountinfo"
    );
    assert_eq!(fs::read(mnt.join("readme")).unwrap(), b"seed 11\n");
}

#[test]
fn mount_does_not_hold_stdout_stderr_pipes() {
    // `x=$(snapfs mount ...)` must not hang: the daemon closes inherited stdio.
    let td = TestDir::new("pipes");
    let tar = corpus::small_tar(td.path(), "a.tar", 12);
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let mut child = Command::new(util::bin())
        .arg("mount")
        .arg(&tar)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let status = {
        let mut st = None;
        util::poll_until(Duration::from_secs(120), || {
            st = child.try_wait().unwrap();
            st.is_some()
        });
        st
    };
    let _g = Mount::adopt(&tar, &mnt);
    let status = status.expect("snapfs mount did not exit");
    assert!(status.success(), "snapfs mount failed: {status}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut a);
        let _ = err.read_to_end(&mut b);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(20)).is_ok(),
        "the snapfs daemon keeps the caller's stdout/stderr pipe open (a `$(snapfs mount …)` would hang)"
    );
}

#[test]
fn foreground_mount_runs_until_umount() {
    let td = TestDir::new("foreground");
    let tar = corpus::small_tar(td.path(), "a.tar", 13);
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let log = fs::File::create(td.join("fg.log")).unwrap();
    let mut child = Command::new(util::bin())
        .args(["mount", "-f"])
        .arg(&tar)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let up = util::poll_until(Duration::from_secs(60), || {
        util::is_mounted(&mnt) || child.try_wait().unwrap().is_some()
    });
    let g = Mount::adopt(&tar, &mnt);
    if !(up && util::is_mounted(&mnt)) {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "foreground mount never came up: {}",
            fs::read_to_string(td.join("fg.log")).unwrap()
        );
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "`snapfs mount -f` returned while mounted"
    );
    assert_eq!(fs::read(mnt.join("readme")).unwrap(), b"seed 13\n");
    g.unmount();
    let mut st = None;
    let exited = util::poll_until(Duration::from_secs(20), || {
        st = child.try_wait().unwrap();
        st.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`snapfs mount -f` did not exit after umount");
    }
    assert!(
        st.unwrap().success(),
        "`snapfs mount -f` exit status {:?}",
        st
    );
}

#[test]
fn mount_option_allow_other_is_passed() {
    let td = TestDir::new("allow-other");
    let tar = corpus::small_tar(td.path(), "a.tar", 14);
    let m = Mount::with_args(&tar, &td.join("mnt"), &["-o", "allow_other"]);
    let mi = util::mount_at(m.path()).unwrap();
    assert!(
        mi.super_opts.contains("allow_other"),
        "mountinfo super options {:?}",
        mi.super_opts
    );
    assert_eq!(fs::read(m.join("readme")).unwrap(), b"seed 14\n");
}

#[test]
fn two_mounts_of_one_archive_at_once() {
    let td = TestDir::new("two-mounts");
    let tar = corpus::small_tar(td.path(), "a.tar", 15);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m1 = Mount::new(&tar, &td.join("m1"));
    let m2 = Mount::new(&tar, &td.join("m2"));
    crate::tree::assert_same_tree(&exp, m1.path(), &Default::default());
    crate::tree::assert_same_tree(&exp, m2.path(), &Default::default());
}

/// Self-check of the harness: the tree comparison must notice each kind of
/// difference it claims to compare (no snapfs involved).
#[test]
fn harness_tree_compare_detects_differences() {
    use crate::tree::{self, CmpOpts};
    use std::os::unix::fs::symlink;
    let td = TestDir::new("harness");
    let a = td.mkdir("a");
    let mk = |root: &std::path::Path| {
        fs::write(root.join("f"), b"content").unwrap();
        fs::write(root.join("g"), b"gg").unwrap();
        fs::hard_link(root.join("g"), root.join("g2")).unwrap();
        symlink("f", root.join("l")).unwrap();
        fs::create_dir(root.join("d")).unwrap();
        util::sh(
            root,
            "setfattr -n user.k -v v f; touch -h -d @1600000000.5 f l d g",
        );
    };
    mk(&a);
    let same = td.mkdir("same");
    mk(&same);
    assert_eq!(
        tree::compare(
            &tree::walk(&a, &Default::default()),
            &tree::walk(&same, &Default::default()),
            &CmpOpts::default()
        ),
        Vec::<String>::new()
    );
    let b = td.mkdir("b");
    mk(&b);
    fs::write(b.join("f"), b"CONTENT").unwrap(); // content (and mtime)
    util::sh(&b, "setfattr -n user.k -v w f; touch -h -d @1600000000.6 l; chmod 700 d; rm g2; cp g g2; chown 5:5 g; rm l; ln -s F l; touch -h -d @1600000000.5 l; mkfifo extra");
    let d = tree::compare(
        &tree::walk(&a, &Default::default()),
        &tree::walk(&b, &Default::default()),
        &CmpOpts::default(),
    );
    let text = d.join("\n");
    for want in [
        "\"f\": content",
        "\"f\": xattrs",
        "\"f\": mtime",
        "\"d\": mode",
        "\"g\": uid:gid",
        "\"l\": symlink target",
        "hardlink group",
        "\"extra\": extra",
        "\"g\": nlink",
    ] {
        assert!(
            text.contains(want),
            "comparison missed {want:?}; diff was:\n{text}"
        );
    }
}

/// Issue 2: a stream without seek points for more than 64 MiB (here a single zstd
/// frame) is served from a one-time decompressed cache file, with a logged note, and
/// reads back exact bytes; the cache file lives under `$XDG_CACHE_HOME/snapfs`.
#[test]
fn issue_2_single_frame_zstd_falls_back_to_a_cache_file() {
    let td = TestDir::new("cachefile");
    let data = util::semi_compressible(80 << 20, 17);
    fs::create_dir_all(td.join("src")).unwrap();
    fs::write(td.join("src/big.txt"), &data).unwrap();
    util::sh(
        td.path(),
        "tar -C src -cf a.tar big.txt && zstd -q -T1 a.tar -o a.tar.zst && rm a.tar",
    )
    .assert_ok();
    let archive = td.join("a.tar.zst");
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let cache = td.mkdir("cache");
    // The index goes beside the archive; only the decompressed stream goes to the cache.
    let r = util::run(
        Command::new(util::bin())
            .env("XDG_CACHE_HOME", &cache)
            .arg("mount")
            .arg(&archive)
            .arg(&mnt),
    );
    r.assert_ok();
    let m = Mount::adopt(&archive, &mnt);
    assert!(
        r.stderr_str().contains("decompressing it once"),
        "no note: {}",
        r.stderr_str()
    );
    let got = fs::read(m.join("big.txt")).unwrap();
    assert!(got == data, "bytes differ through the cache file");
    let cached: Vec<_> = fs::read_dir(cache.join("snapfs")).unwrap().collect();
    assert_eq!(cached.len(), 1, "expected one cache file");
}
