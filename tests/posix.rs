//! Public POSIX suites on writable views, with the kernel's overlayfs and a plain
//! directory on the same machine as the reference:
//!
//! - **pjdfstest** 0.2.2 (the Rust port, `cargo install --locked pjdfstest@0.2.2`)
//!   inside a `--upper` view of a small tar.gz mounted with `-o allow_other`: no
//!   failure and no more skips than overlayfs (lowerdir = the extracted tree); the
//!   three summaries are printed side by side.
//! - **fsx** 0.3.2 (`cargo install --locked fsx@0.3.2`) on existing lower files of a
//!   tar.gz view, with and without mmap and with its fallocate operations
//!   (posix_fallocate, punch hole); the same seed on a plain copy gives the expected
//!   file. The port has no O_DIRECT mode and no zero-range operation (those are
//!   pinned in `regression::issue_10_fallocate_modes_on_a_partial_file`). Its
//!   block mode zeroes `[0, flen)` first and never changes the size, so the file
//!   stays partial with its tail served from the archive; its normal mode
//!   truncates the file at open, which makes it whole. After each run the view is
//!   remounted and compared, then `snapfs commit --full` is mounted alone and
//!   compared again.
//!
//! ROOT ONLY: creates the user `tests` if missing, mounts overlayfs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::util::{self, run_ok, snapfs, Mount, TestDir};

/// A tool installed with `cargo install` (in PATH or `~/.cargo/bin`).
fn tool(name: &str, version: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin")));
    for d in candidates {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install it with `cargo install --locked {name}@{version}`");
}

/// Makes sure user and group `tests` exist (pjdfstest switches to them); useradd
/// locks /etc/passwd, so never concurrently.
fn ensure_tests_user() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if util::run(Command::new("id").arg("tests")).ok() {
        return;
    }
    run_ok(
        Command::new("useradd")
            .args(["--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin", "tests"]),
    );
}

/// The pjdfstest configuration (naptime 0.05: ext4's timestamp granularity makes
/// plain directories fail with shorter naps).
const PJ_CONF: &str = r#"
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}
[settings]
naptime = 0.05
allow_remount = false
[dummy_auth]
entries = [ ["nobody", "nogroup"], ["tests", "tests"] ]
"#;

/// One pjdfstest summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    failed: u32,
    skipped: u32,
    passed: u32,
}

/// Runs the whole pjdfstest suite in `dir`; the summary and the output.
fn pjdfstest(conf: &Path, dir: &Path) -> (Summary, String) {
    let bin = tool("pjdfstest", "0.2.2");
    let r = util::run_timeout(
        Command::new(bin).arg("-c").arg(conf).arg("-p").arg(dir),
        Duration::from_secs(600),
    );
    let out = format!("{}{}", r.stdout_str(), r.stderr_str());
    let line = out
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("no pjdfstest summary for {}:\n{out}", dir.display()));
    let num = |what: &str| -> u32 {
        line.split(',')
            .find_map(|part| {
                let part = part.trim().trim_start_matches("Summary:").trim();
                part.strip_suffix(what)?.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("bad summary {line:?}"))
    };
    let s = Summary {
        failed: num("failed"),
        skipped: num("skipped"),
        passed: num("passed"),
    };
    (s, out)
}

/// The failing tests of a pjdfstest output.
fn failures(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.trim_end().ends_with("FAILED"))
        .collect()
}

/// An overlayfs mount, unmounted (lazily if it must) on drop.
struct Overlay {
    mnt: PathBuf,
}

impl Overlay {
    fn new(lower: &Path, upper: &Path, work: &Path, mnt: &Path) -> Overlay {
        for d in [upper, work, mnt] {
            fs::create_dir_all(d).unwrap();
        }
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                ))
                .arg(mnt),
        );
        Overlay {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A small tar.gz (a few files, a directory, a symlink) and its source tree.
fn small_targz(d: &TestDir) -> (PathBuf, PathBuf) {
    let src = d.join("src");
    crate::corpus::build_small_tree(&src, 10);
    let tar = d.join("small.tar");
    crate::corpus::gnu_tar(&src, &tar, "gnu", &[]);
    let gz = crate::corpus::compress(&tar, crate::corpus::Comp::Gzip);
    (gz, src)
}

#[test]
fn pjdfstest_in_a_writable_view_fails_nothing_and_skips_no_more_than_overlayfs() {
    ensure_tests_user();
    let d = TestDir::new("pjdfstest");
    // pjdfstest works as other users inside the test directory.
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let conf = d.join("pj.toml");
    fs::write(&conf, PJ_CONF).unwrap();
    let (gz, _) = small_targz(&d);
    let lower = d.join("lower");
    crate::corpus::extract(&gz, &lower);

    let plain = d.mkdir("plain");
    let (plain_s, _) = pjdfstest(&conf, &plain);

    let (overlay_s, _) = {
        let ov = Overlay::new(
            &lower,
            &d.join("ov-upper"),
            &d.join("ov-work"),
            &d.join("ov"),
        );
        pjdfstest(&conf, &ov.mnt)
    };

    let upper = d.join("upper");
    let m = Mount::with_args(
        &gz,
        &d.join("mnt"),
        &["-o", "allow_other", "--upper", upper.to_str().unwrap()],
    );
    let (snap_s, out) = pjdfstest(&conf, m.path());
    m.unmount();

    println!("pjdfstest 0.2.2      passed  failed  skipped");
    for (name, s) in [
        ("snapfs --upper", snap_s),
        ("overlayfs", overlay_s),
        ("plain dir", plain_s),
    ] {
        println!(
            "{name:<20} {:>6}  {:>6}  {:>7}",
            s.passed, s.failed, s.skipped
        );
    }
    assert_eq!(
        snap_s.failed,
        0,
        "pjdfstest failures in the view:\n{}",
        failures(&out).join("\n")
    );
    assert!(
        snap_s.skipped <= overlay_s.skipped,
        "the view skips {} tests, overlayfs {}",
        snap_s.skipped,
        overlay_s.skipped
    );
    // The view can still be cut after the whole suite ran in it.
    let cut = d.join("cut.tar");
    snapfs([
        "commit".as_ref(),
        gz.as_os_str(),
        "--upper".as_ref(),
        upper.as_os_str(),
        "-o".as_ref(),
        cut.as_os_str(),
    ])
    .assert_ok();
}

// ---------------------------------------------------------------- fsx

/// Weights of the operations that do not change the size (block mode).
const FSX_BLOCK: &str = r#"
blockmode = true
flen = 1048576
[weights]
close_open = 0
read = 10
write = 10
mapread = MAP
mapwrite = MAP
invalidate = INVALIDATE
truncate = 0
fsync = 1
fdatasync = 1
posix_fallocate = 0
punch_hole = 2
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
"#;

/// Every operation of the port (normal mode: the file is truncated when fsx opens it).
const FSX_ALL: &str = r#"
flen = 262144
[weights]
close_open = 1
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 3
fsync = 1
fdatasync = 1
posix_fallocate = 3
punch_hole = 3
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
"#;

const FSX_OPS: u32 = 35_000;

/// Runs fsx with `conf` on `file`, asserting it passed.
fn fsx(conf: &Path, file: &Path, seed: u64, artifacts: &Path) {
    let bin = tool("fsx", "0.3.2");
    fs::create_dir_all(artifacts).unwrap();
    let r = util::run_timeout(
        Command::new(bin)
            .arg("-q")
            .arg("-f")
            .arg(conf)
            .arg("-N")
            .arg(FSX_OPS.to_string())
            .arg("-S")
            .arg(seed.to_string())
            .arg("-P")
            .arg(artifacts)
            .arg(file),
        Duration::from_secs(900),
    );
    assert!(
        r.ok(),
        "fsx failed on {} (seed {seed}):\n{}\n{}",
        file.display(),
        r.stdout_str(),
        r.stderr_str()
    );
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

#[test]
fn fsx_on_partial_lower_files_matches_a_plain_copy_after_remount_and_commit() {
    let d = TestDir::new("fsx");
    let src = d.mkdir("src");
    // Three existing lower files, one per run, so every run starts with copy-up.
    let names = ["mmap.bin", "nommap.bin", "all.bin"];
    for (i, n) in names.iter().enumerate() {
        fs::write(src.join(n), util::random_bytes(4 << 20, 100 + i as u64)).unwrap();
    }
    let tar = d.join("f.tar");
    crate::corpus::gnu_tar(&src, &tar, "gnu", &[]);
    let gz = crate::corpus::compress(&tar, crate::corpus::Comp::Gzip);
    let plain = d.mkdir("plain");
    for n in names {
        fs::copy(src.join(n), plain.join(n)).unwrap();
    }
    let confs = [
        FSX_BLOCK.replace("MAP", "10").replace("INVALIDATE", "1"),
        FSX_BLOCK.replace("MAP", "0").replace("INVALIDATE", "0"),
        FSX_ALL.to_string(),
    ];
    let upper = d.join("upper");
    let up = upper.to_str().unwrap();
    let mnt = d.join("mnt");
    for (i, (name, conf)) in names.iter().zip(&confs).enumerate() {
        let cpath = d.join(format!("fsx-{i}.toml"));
        fs::write(&cpath, conf).unwrap();
        let seed = 1000 + i as u64;
        // The expected file: the same sequence on a plain copy.
        fsx(&cpath, &plain.join(name), seed, &d.join("art-plain"));
        {
            let m = Mount::with_args(&gz, &mnt, &["--upper", up]);
            fsx(&cpath, &m.join(name), seed, &d.join("art-view"));
            assert_same_file(&m.join(name), &plain.join(name));
            m.unmount();
        }
        let m = Mount::with_args(&gz, &mnt, &["--upper", up]);
        for n in &names[..=i] {
            assert_same_file(&m.join(n), &plain.join(n));
        }
        // Files not run yet still read as the archive's.
        for n in &names[i + 1..] {
            assert_same_file(&m.join(n), &src.join(n));
        }
        m.unmount();
    }
    println!(
        "fsx: {} operations on {} lower files",
        FSX_OPS * 3,
        names.len()
    );
    let full = d.join("full.tar.gz");
    snapfs([
        "commit".as_ref(),
        gz.as_os_str(),
        "--upper".as_ref(),
        upper.as_os_str(),
        "--full".as_ref(),
        "-o".as_ref(),
        full.as_os_str(),
    ])
    .assert_ok();
    let m = Mount::new(&full, &d.join("cut"));
    for n in names {
        assert_same_file(&m.join(n), &plain.join(n));
    }
}
