//! Faults (issue 6): a panic inside a request handler, the archive changed, truncated
//! or replaced while mounted, the daemon killed under load, a full disk under a
//! snapshot cut and under the upper dir. Tests that mount a tmpfs need root (CI runs
//! as root).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::corpus::{self, Comp};
use crate::util::{self, FgMount, Mount, TestDir, Tmpfs};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// Ten 300 KB files (`f0`..`f9`) archived with GNU tar; returns (tar, source dir).
fn ten_files(td: &TestDir) -> (PathBuf, PathBuf) {
    let src = td.mkdir("src");
    for i in 0..10u64 {
        fs::write(
            src.join(format!("f{i}")),
            util::semi_compressible(300_000, i),
        )
        .unwrap();
    }
    let tar = td.join("a.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    (tar, src)
}

#[test]
fn handler_panic_is_answered_eio_and_the_daemon_lives() {
    let td = TestDir::new("panic-hook");
    let tar = corpus::small_tar(td.path(), "a.tar", 21);
    let mut m = FgMount::start(
        &tar,
        &td.join("mnt"),
        &["--threads", "2"],
        &[("SNAPFS_TEST_PANIC_ON_LOOKUP", "boom")],
    );
    // More panics than worker threads: a panic must not use up a thread.
    for _ in 0..10 {
        let e = fs::metadata(m.join("boom")).expect_err("lookup of the hook name");
        assert_eq!(util::errno(&e), EIO, "a handler panic must be EIO: {e}");
    }
    assert!(m.alive(), "the daemon died of a handler panic");
    assert_eq!(fs::read(m.join("readme")).unwrap(), b"seed 21\n");
    assert!(util::assert_confined(m.path()) > 10);
    let log = m.log_text();
    assert!(
        log.contains("lookup of inode 1 panicked") && log.contains("answered EIO"),
        "no log line for the panic:\n{log}"
    );
}

/// Mounts ten files in the foreground, reads `f0`, applies `change` to the archive,
/// then checks that every read of a file not read before fails with EIO (never other
/// bytes), that `f0` gives EIO or its original bytes (the page cache may still hold
/// them), and that the daemon logs the change naming the archive and the entry.
fn changed_while_mounted(name: &str, comp: Comp, change: impl FnOnce(&Path), why: &str) {
    let td = TestDir::new(name);
    let (tar, src) = ten_files(&td);
    let archive = corpus::compress(&tar, comp);
    let mut m = FgMount::start(&archive, &td.join("mnt"), &[], &[]);
    assert_eq!(
        fs::read(m.join("f0")).unwrap(),
        fs::read(src.join("f0")).unwrap()
    );
    change(&archive);
    for i in 1..10 {
        let p = m.join(format!("f{i}"));
        match fs::read(&p) {
            Ok(got) => panic!(
                "{name}: f{i} read {} bytes (equal to the original: {}) after the archive changed; want EIO",
                got.len(),
                got == fs::read(src.join(format!("f{i}"))).unwrap()
            ),
            Err(e) => assert_eq!(util::errno(&e), EIO, "{name}: f{i}: {e}"),
        }
    }
    if let Ok(got) = fs::read(m.join("f0")) {
        assert_eq!(got, fs::read(src.join("f0")).unwrap(), "{name}: f0 changed");
    }
    assert!(m.alive(), "{name}: the daemon died");
    assert_eq!(util::list_dir(m.path()).len(), 10, "{name}: listing broke");
    let log = m.log_text();
    let file = archive.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        log.lines()
            .any(|l| l.contains(&file) && l.contains("entry \"f") && l.contains(why)),
        "{name}: no log line naming the archive, the entry and {why:?}:\n{log}"
    );
}

#[test]
fn archive_modified_in_place_while_mounted_reads_eio() {
    changed_while_mounted(
        "changed-in-place",
        Comp::Gzip,
        |a| {
            let f = OpenOptions::new().write(true).open(a).unwrap();
            let len = f.metadata().unwrap().len();
            f.write_all_at(b"XXXXXXXX", len / 2).unwrap();
        },
        "modified in place",
    );
}

#[test]
fn archive_truncated_while_mounted_reads_eio() {
    changed_while_mounted(
        "changed-truncated",
        Comp::None,
        |a| {
            let f = OpenOptions::new().write(true).open(a).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len / 2).unwrap();
        },
        "size",
    );
}

#[test]
fn archive_replaced_by_rename_while_mounted_reads_eio() {
    changed_while_mounted(
        "changed-replaced",
        Comp::ZstdMulti,
        |a| {
            // Same names, other bytes, renamed over the mounted archive.
            let other = a.with_extension("new");
            fs::copy(a, &other).unwrap();
            let f = OpenOptions::new().write(true).open(&other).unwrap();
            f.write_all_at(b"other", 0).unwrap();
            fs::rename(&other, a).unwrap();
        },
        "replaced",
    );
}

#[test]
fn kill_9_under_load_then_umount_remount_keeps_fsynced_upper_data() {
    let td = TestDir::new("kill-load");
    let (tar, src) = ten_files(&td);
    let gz = corpus::compress(&tar, Comp::Gzip);
    let upper = td.join("upper");
    let mnt = td.mkdir("mnt").canonicalize().unwrap();
    let up = upper.to_str().unwrap();
    let m = Mount::with_args(&gz, &mnt, &["--upper", up]);
    let pid = util::daemon_pid(&mnt, &gz);

    // Two readers and a writer that fsyncs numbered files and counts them.
    let stop = Arc::new(AtomicBool::new(false));
    let synced = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for r in 0..2u64 {
        let (mnt, stop) = (mnt.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut buf = Vec::new();
                let p = mnt.join(format!("f{}", (reads + r) % 10));
                if File::open(p)
                    .and_then(|mut f| f.read_to_end(&mut buf))
                    .is_err()
                {
                    break; // the daemon is gone
                }
                reads += 1;
            }
            reads
        }));
    }
    {
        let (mnt, stop, synced) = (mnt.clone(), stop.clone(), synced.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = util::random_bytes(64 << 10, 1000 + n);
                let ok = File::create(mnt.join(format!("w{n}")))
                    .and_then(|mut f| f.write_all(&data).and_then(|_| f.sync_all()));
                if ok.is_err() {
                    break;
                }
                n += 1;
                synced.store(n, Ordering::SeqCst);
            }
            n
        }));
    }
    assert!(
        util::poll_until(Duration::from_secs(60), || synced.load(Ordering::SeqCst)
            >= 20),
        "the writer made no progress"
    );
    util::run_ok(Command::new("kill").arg("-9").arg(pid.to_string()));
    let durable = synced.load(Ordering::SeqCst);
    assert!(util::poll_until(Duration::from_secs(20), || {
        !util::process_alive(pid)
    }));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    let r = util::snapfs([OsStr::new("umount"), mnt.as_os_str()]);
    r.assert_ok();
    assert!(!util::is_mounted(&mnt), "snapfs umount left the dead mount");
    drop(m);

    let m = Mount::with_args(&gz, &mnt, &["--upper", up]);
    for n in 0..durable {
        assert_eq!(
            fs::read(m.join(format!("w{n}"))).unwrap(),
            util::random_bytes(64 << 10, 1000 + n),
            "fsynced file w{n} lost or damaged"
        );
    }
    for i in 0..10 {
        assert_eq!(
            fs::read(m.join(format!("f{i}"))).unwrap(),
            fs::read(src.join(format!("f{i}"))).unwrap()
        );
    }
    println!("kill -9 under load: {durable} fsynced files intact after remount");
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    util::list_dir(dir)
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn disk_full_during_a_snapshot_cut_leaves_no_partial_file() {
    // Root only: mounts a tmpfs.
    let td = TestDir::new("cut-enospc");
    let src = td.mkdir("src");
    fs::write(src.join("big.bin"), util::random_bytes(12 << 20, 7)).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    let out = Tmpfs::new(&td.join("out"), "8M");
    fs::write(out.path.join("existing"), b"keep me").unwrap();

    for (fmt, name) in [("gz", "c.tar.gz"), ("tar", "c.tar"), ("zst", "c.tar.zst")] {
        let dst = out.path.join(name);
        let r = util::snapfs([
            OsStr::new("create"),
            src.as_os_str(),
            OsStr::new("-o"),
            dst.as_os_str(),
            OsStr::new("--format"),
            OsStr::new(fmt),
        ]);
        util::assert_one_line_error(&r, "No space left on device");
        assert!(
            r.stderr_str().contains(out.path.to_str().unwrap()),
            "the error should name the output, not a source file: {}",
            r.stderr_str()
        );
        assert_eq!(names(&out.path), ["existing"], "{fmt}: leftovers");
    }

    // commit --full of a view whose parent is untouched by the failed cut.
    let parent = td.join("parent.tar");
    corpus::gnu_tar(&src, &parent, "posix", &[]);
    let before = util::sha256_file(&parent).unwrap();
    let upper = td.join("upper");
    {
        let m = Mount::with_args(
            &parent,
            &td.join("mnt"),
            &["--upper", upper.to_str().unwrap()],
        );
        fs::write(m.join("added"), b"added in the view").unwrap();
    }
    let dst = out.path.join("full.tar");
    let r = util::snapfs([
        OsStr::new("commit"),
        parent.as_os_str(),
        OsStr::new("--upper"),
        upper.as_os_str(),
        OsStr::new("-o"),
        dst.as_os_str(),
        OsStr::new("--full"),
        OsStr::new("--format"),
        OsStr::new("tar"),
    ]);
    util::assert_one_line_error(&r, "No space left on device");
    assert_eq!(names(&out.path), ["existing"], "commit: leftovers");
    assert_eq!(
        util::sha256_file(&parent).unwrap(),
        before,
        "parent changed"
    );
    assert_eq!(fs::read(out.path.join("existing")).unwrap(), b"keep me");

    // With room, the same cut works.
    let ok = td.join("full.tar");
    util::snapfs([
        OsStr::new("commit"),
        parent.as_os_str(),
        OsStr::new("--upper"),
        upper.as_os_str(),
        OsStr::new("-o"),
        ok.as_os_str(),
        OsStr::new("--full"),
    ])
    .assert_ok();
}

#[test]
fn enospc_in_the_upper_dir_reaches_the_writer_and_loses_nothing() {
    // Root only: mounts a tmpfs.
    let td = TestDir::new("upper-enospc");
    let (tar, src) = ten_files(&td);
    let disk = Tmpfs::new(&td.join("disk"), "8M");
    let upper = disk.path.join("upper");
    let up = upper.to_str().unwrap().to_string();
    let early = util::random_bytes(1 << 20, 77);
    let err = {
        let m = Mount::with_args(&tar, &td.join("mnt"), &["--upper", &up]);
        let mut f = File::create(m.join("early")).unwrap();
        f.write_all(&early).unwrap();
        f.sync_all().unwrap();
        drop(f);
        // A lower file changed in place before the disk fills.
        let g = OpenOptions::new().write(true).open(m.join("f3")).unwrap();
        g.write_all_at(b"patched", 10).unwrap();
        g.sync_all().unwrap();
        drop(g);
        // Fill the disk.
        let mut big = File::create(m.join("big")).unwrap();
        let chunk = util::random_bytes(256 << 10, 78);
        let mut err = None;
        for _ in 0..64 {
            if let Err(e) = big.write_all(&chunk).and_then(|_| big.sync_all()) {
                err = Some(e);
                break;
            }
        }
        drop(big);
        // Everything written before is still there, in this mount.
        assert_eq!(fs::read(m.join("early")).unwrap(), early);
        assert_eq!(&fs::read(m.join("f3")).unwrap()[10..17], b"patched");
        assert_eq!(
            fs::read(m.join("f4")).unwrap(),
            fs::read(src.join("f4")).unwrap()
        );
        // A metadata-only change still works on a full disk, or fails cleanly.
        if let Err(e) = fs::write(m.join("more"), b"x") {
            assert_eq!(util::errno(&e), ENOSPC, "{e}");
        }
        err
    };
    let e = err.expect("8 MiB of upper space never filled up");
    assert_eq!(util::errno(&e), ENOSPC, "the writer should see ENOSPC: {e}");

    // After a remount nothing written before is lost.
    let m = Mount::with_args(&tar, &td.join("mnt"), &["--upper", &up]);
    assert_eq!(fs::read(m.join("early")).unwrap(), early);
    let f3 = fs::read(m.join("f3")).unwrap();
    let mut want = fs::read(src.join("f3")).unwrap();
    want[10..17].copy_from_slice(b"patched");
    assert!(f3 == want, "f3 differs after the remount");
    for i in [0, 1, 2, 4, 9] {
        assert_eq!(
            fs::read(m.join(format!("f{i}"))).unwrap(),
            fs::read(src.join(format!("f{i}"))).unwrap()
        );
    }
}
