//! FUSE passthrough of whole upper files (Linux 6.9+, root in the initial user
//! namespace): the kernel reads, writes and maps them itself, so the daemon's own
//! read and write byte counts (`/proc/PID/io`, `rchar` + `wchar`: every byte it
//! moves through /dev/fuse and the upper file) stay far below the bytes the test
//! moves. With `--no-passthrough`, and when the kernel refuses the backing file
//! (a test hook, and a user namespace), every byte goes through the daemon, with
//! one debug log line saying why. In every mode the bytes equal those of the same
//! operations on a plain file. The daemon clears set-id bits on writes for the
//! kernel (FUSE_HANDLE_KILLPRIV_V2), as a plain file system does.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use crate::corpus::shq;
use crate::util::{bin, python, random_bytes, run_ok, sha256_file, FgMount, TestDir};

/// The bytes written by [`OPS`] (pwrites and appends), at least.
const OPS_WRITTEN: u64 = 8 << 20;

/// Reads the file whole, pwrites at random offsets, appends (also with O_APPEND),
/// truncates shorter and longer, writes through a shared mapping, reads it whole
/// again; prints the sha256 of the result (read through a fresh descriptor).
const OPS: &str = r#"
import hashlib, mmap, os, random, sys
p = sys.argv[1]
r = random.Random(15)
fd = os.open(p, os.O_RDWR)
size = os.fstat(fd).st_size
while os.read(fd, 1 << 20):
    pass
written = 0
while written < 6 << 20:
    n = r.randrange(1, 128 << 10)
    os.pwrite(fd, r.randbytes(n), r.randrange(0, size))
    written += n
os.lseek(fd, 0, os.SEEK_END)
os.write(fd, r.randbytes(2 << 20))
os.close(fd)
fd = os.open(p, os.O_WRONLY | os.O_APPEND)
os.write(fd, b"appended " * 1000)
os.close(fd)
fd = os.open(p, os.O_RDWR)
size = os.fstat(fd).st_size
os.ftruncate(fd, size - 12345)
os.ftruncate(fd, size + 54321)
m = mmap.mmap(fd, 0)
for _ in range(64):
    off = r.randrange(0, len(m) - 4096)
    m[off:off + 4096] = r.randbytes(4096)
m.flush()
m.close()
os.close(fd)
with open(p, "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest())
"#;

/// Bytes the daemon `pid` has read and written through system calls so far.
fn daemon_io(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "rchar" | "wchar").then(|| v.trim().parse::<u64>().ok())?
        })
        .sum()
}

/// A tar with `big.bin` (8 MiB) and `small.txt`, and a plain directory with the same
/// files (the reference).
fn fixture(d: &TestDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = d.mkdir("src");
    std::fs::write(src.join("big.bin"), random_bytes(8 << 20, 15)).expect("write big.bin");
    std::fs::write(src.join("small.txt"), b"small\n").expect("write small.txt");
    let tar = d.join("a.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&tar)
            .args(["big.bin", "small.txt"]),
    );
    (tar, src)
}

/// Mounts `tar` writable in the foreground with debug logs and `args`, `env`.
fn mount(d: &TestDir, tar: &Path, args: &[&str], env: &[(&str, &str)]) -> FgMount {
    let upper = d.join("upper");
    let mut a = vec!["--upper", upper.to_str().expect("utf-8 test path")];
    a.extend_from_slice(args);
    let mut e = vec![("RUST_LOG", "snapfs=debug")];
    e.extend_from_slice(env);
    FgMount::start(tar, &d.join("mnt"), &a, &e)
}

/// Makes `big.bin` of the view a whole upper file (copied up, every byte rewritten
/// through the view), and `new.bin` a new one; the same on the reference.
fn make_whole(m: &FgMount, reference: &Path) {
    let big = m.join("big.bin");
    let bytes = std::fs::read(&big).expect("read big.bin");
    let f = File::options()
        .write(true)
        .open(&big)
        .expect("open big.bin");
    f.write_all_at(&bytes, 0).expect("rewrite big.bin");
    drop(f);
    let new = random_bytes(3 << 20, 16);
    std::fs::write(m.join("new.bin"), &new).expect("create new.bin");
    std::fs::write(reference.join("new.bin"), &new).expect("create reference new.bin");
}

/// Runs [`OPS`] on `name` in the view and in the reference; asserts equal results
/// (also by a read through the view afterwards) and returns the bytes the daemon
/// moved meanwhile.
fn ops_moved(m: &FgMount, reference: &Path, name: &str) -> u64 {
    let before = daemon_io(m.pid());
    let got = python(OPS, [m.join(name)]).stdout_str();
    let moved = daemon_io(m.pid()) - before;
    let want = python(OPS, [reference.join(name)]).stdout_str();
    assert_eq!(
        got, want,
        "{name}: the view and a plain file differ after OPS"
    );
    assert_eq!(
        sha256_file(&m.join(name)).expect("hash view file"),
        sha256_file(&reference.join(name)).expect("hash reference file"),
        "{name}"
    );
    let (vm, rm) = (
        std::fs::metadata(m.join(name)).expect("stat view file"),
        std::fs::metadata(reference.join(name)).expect("stat reference"),
    );
    assert_eq!(vm.len(), rm.len(), "{name}: size after OPS");
    moved
}

#[test]
fn passthrough_reads_and_writes_of_whole_upper_files_skip_the_daemon() {
    let d = TestDir::new("passthrough-on");
    let (tar, reference) = fixture(&d);
    let m = mount(&d, &tar, &[], &[]);
    make_whole(&m, &reference);
    for name in ["big.bin", "new.bin"] {
        let moved = ops_moved(&m, &reference, name);
        assert!(
            moved < OPS_WRITTEN / 8,
            "{name}: the daemon moved {moved} bytes for passthrough reads and writes"
        );
    }
    // A partial file (copied up, one range written) is served by the daemon.
    let small = m.join("small.txt");
    let f = File::options()
        .write(true)
        .open(&small)
        .expect("open small");
    f.write_all_at(b"S", 0).expect("write small");
    drop(f);
    assert_eq!(std::fs::read(&small).expect("read small"), b"Small\n");
    let log = m.log_text();
    assert!(log.contains("FUSE passthrough on"), "log:\n{log}");
    assert!(!log.contains("unavailable"), "log:\n{log}");
}

#[test]
fn no_passthrough_serves_every_byte_through_the_daemon() {
    let d = TestDir::new("passthrough-off");
    let (tar, reference) = fixture(&d);
    let m = mount(&d, &tar, &["--no-passthrough"], &[]);
    make_whole(&m, &reference);
    let moved = ops_moved(&m, &reference, "big.bin");
    assert!(moved >= OPS_WRITTEN, "the daemon moved only {moved} bytes");
    let log = m.log_text();
    assert!(!log.contains("FUSE passthrough"), "log:\n{log}");
}

#[test]
fn passthrough_falls_back_once_when_the_kernel_refuses_the_backing_file() {
    let d = TestDir::new("passthrough-fallback");
    let (tar, reference) = fixture(&d);
    let m = mount(&d, &tar, &[], &[("SNAPFS_TEST_NO_BACKING", "1")]);
    make_whole(&m, &reference);
    for name in ["big.bin", "new.bin"] {
        let moved = ops_moved(&m, &reference, name);
        assert!(
            moved >= OPS_WRITTEN,
            "{name}: the daemon moved only {moved} bytes"
        );
    }
    let log = m.log_text();
    let lines = log.matches("FUSE passthrough unavailable").count();
    assert_eq!(lines, 1, "one fallback line expected, log:\n{log}");
}

/// Waits (a bounded number of tries) until an open of `path` is passed through: the
/// kernel sends RELEASE for a closed handle in the background, so right after the
/// last daemon-served handle of a file is closed the daemon may not have seen it yet
/// (seen under the full suite's load), and it serves the next open as it must. A
/// probe reads 1 MiB with O_DIRECT: through a passed-through handle the daemon moves
/// none of it.
fn wait_until_passed_through(m: &FgMount, path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    for _ in 0..200 {
        let probe = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .expect("open a probe");
        let mut buf = AlignedMiB::new();
        let before = daemon_io(m.pid());
        probe.read_exact_at(buf.bytes(), 0).expect("probe read");
        if daemon_io(m.pid()) - before < (1 << 20) / 8 {
            return;
        }
        drop(probe);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} is still served through the daemon", path.display());
}

/// A 1 MiB buffer aligned for O_DIRECT.
struct AlignedMiB(Vec<u8>, usize);

impl AlignedMiB {
    fn new() -> Self {
        let v = vec![0u8; (1 << 20) + 4096];
        let skip = v.as_ptr().align_offset(4096);
        AlignedMiB(v, skip)
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.0[self.1..self.1 + (1 << 20)]
    }
}

#[test]
fn passthrough_and_daemon_served_handles_of_one_file_never_mix() {
    let d = TestDir::new("passthrough-modes");
    let (tar, _) = fixture(&d);
    let m = mount(&d, &tar, &[], &[]);
    let big = m.join("big.bin");
    let mut want = std::fs::read(&big).expect("read big.bin");
    // A daemon-served handle (the lower file) stays open while the file is copied
    // up and made whole, and while it is opened again: that open must be served
    // too (the kernel fails a passthrough open of an inode in cached mode).
    let held = File::open(&big).expect("open big.bin");
    let w = File::options()
        .write(true)
        .open(&big)
        .expect("open for writing");
    w.write_all_at(&want, 0).expect("rewrite big.bin");
    want[..4].copy_from_slice(b"MIX1");
    w.write_all_at(b"MIX1", 0).expect("write");
    drop(w);
    let again = File::open(&big).expect("open big.bin while a served handle is open");
    let mut buf = vec![0u8; 4];
    again.read_exact_at(&mut buf, 0).expect("read");
    assert_eq!(buf, b"MIX1");
    held.read_exact_at(&mut buf, 0).expect("read held");
    assert_eq!(buf, b"MIX1");
    drop(again);
    drop(held);
    wait_until_passed_through(&m, &big);
    // Now every handle is passed through: two at once share one backing file, and
    // the view's attributes follow the kernel's writes.
    let a = File::options()
        .read(true)
        .write(true)
        .open(&big)
        .expect("open");
    let before = daemon_io(m.pid());
    let b = File::open(&big).expect("second open while passed through");
    let tail = random_bytes(4 << 20, 17);
    let end = want.len() as u64;
    a.write_all_at(&tail, end).expect("append through a");
    want.extend_from_slice(&tail);
    let mut got = vec![0u8; want.len()];
    b.read_exact_at(&mut got, 0).expect("read through b");
    assert!(got == want, "the second handle reads what the first wrote");
    let moved = daemon_io(m.pid()) - before;
    assert!(moved < (4 << 20) / 8, "the daemon moved {moved} bytes");
    let meta = std::fs::metadata(&big).expect("stat big.bin");
    assert_eq!(meta.len(), want.len() as u64, "size seen through the view");
    assert_eq!(
        a.metadata().expect("fstat").len(),
        want.len() as u64,
        "size seen through the handle"
    );
    // Renamed and truncated while open: the handles follow.
    std::fs::rename(&big, m.join("renamed.bin")).expect("rename");
    a.set_len(1000).expect("truncate");
    want.truncate(1000);
    let mut got = vec![0u8; 2000];
    let n = b.read_at(&mut got, 0).expect("read after truncate");
    assert_eq!(&got[..n], &want[..], "read after truncate");
    drop((a, b));
    assert_eq!(
        std::fs::read(m.join("renamed.bin")).expect("read renamed"),
        want
    );
}

#[test]
fn passthrough_falls_back_in_a_user_namespace() {
    // Root of a new user namespace may mount FUSE, but has no CAP_SYS_ADMIN in the
    // initial one: the kernel refuses every backing file.
    let d = TestDir::new("passthrough-userns");
    let (tar, reference) = fixture(&d);
    let ops = d.join("ops.py");
    std::fs::write(&ops, OPS).expect("write ops.py");
    let mnt = d.mkdir("mnt");
    let log = d.join("log");
    let script = format!(
        r#"set -e
RUST_LOG=snapfs=debug {b} mount --upper {u} --log-file {l} --pid-file {p} {t} {m}
trap "{b} umount {m}" EXIT
dd if={m}/big.bin of={m}/big.bin bs=1M conv=notrunc status=none
io() {{ awk '/^[rw]char/ {{ s += $2 }} END {{ print s }}' /proc/$(cat {p})/io; }}
before=$(io)
python3 {o} {m}/big.bin
echo moved $(( $(io) - before ))
"#,
        b = shq(Path::new(bin())),
        u = shq(&d.join("upper")),
        l = shq(&log),
        p = shq(&d.join("pid")),
        t = shq(&tar),
        m = shq(&mnt),
        o = shq(&ops),
    );
    let r = run_ok(Command::new("unshare").args(["-Urm", "sh", "-c", &script]));
    let out = r.stdout_str();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "output: {out}");
    let want = python(OPS, [reference.join("big.bin")]).stdout_str();
    assert_eq!(
        lines[0],
        want.trim(),
        "the view and a plain file differ after OPS"
    );
    let moved: u64 = lines[1]
        .strip_prefix("moved ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad output line {:?}", lines[1]));
    assert!(moved >= OPS_WRITTEN, "the daemon moved only {moved} bytes");
    let log = std::fs::read_to_string(&log).expect("read daemon log");
    assert_eq!(
        log.matches("FUSE passthrough unavailable").count(),
        1,
        "log:\n{log}"
    );
    assert!(log.contains("CAP_SYS_ADMIN"), "log:\n{log}");
}

/// Writes and truncations of set-id files by an unprivileged user and by root; prints
/// the mode after each step. Run in a directory holding `old.bin` (in the view: from
/// the archive, copied up by the first change) and `new.bin` (a whole upper file,
/// passed through unless set-id).
const SETID_STEPS: &str = r#"
nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups sh -c "$1"; }
for f in old.bin new.bin; do
  chmod 6777 $f; nobody "printf x >> $f"; echo "$f nobody-write $(stat -c %a $f)"
  chmod 6777 $f; printf x >> $f; echo "$f root-write $(stat -c %a $f)"
  chmod 6777 $f; nobody "truncate -s 100 $f"; echo "$f nobody-truncate $(stat -c %a $f)"
  chmod 6777 $f; truncate -s 200 $f; echo "$f root-truncate $(stat -c %a $f)"
  chmod 2767 $f; nobody "printf x >> $f"; echo "$f nobody-write-sgid-noexec $(stat -c %a $f)"
  chmod 4777 $f; nobody "dd if=/dev/zero of=$f bs=1 count=1 seek=5 conv=notrunc 2>/dev/null"
  echo "$f nobody-pwrite $(stat -c %a $f)"
done
"#;

#[test]
fn writes_clear_set_id_bits_as_on_a_plain_file_system() {
    let d = TestDir::new("killpriv");
    let (tar, reference) = fixture(&d);
    std::fs::rename(reference.join("big.bin"), reference.join("old.bin")).expect("rename");
    std::fs::write(reference.join("new.bin"), b"new").expect("write new.bin");
    // allow_other: the unprivileged user may use the mount at all.
    let m = mount(&d, &tar, &["-o", "allow_other"], &[]);
    std::fs::rename(m.join("big.bin"), m.join("old.bin")).expect("rename in the view");
    std::fs::write(m.join("new.bin"), b"new").expect("write new.bin in the view");
    let steps = |dir: &Path| {
        run_ok(
            Command::new("sh")
                .args(["-c", SETID_STEPS])
                .current_dir(dir),
        )
        .stdout_str()
    };
    let want = steps(&reference);
    assert!(
        want.contains("old.bin nobody-write 777\n")
            && want.contains("old.bin root-write 6777\n")
            && want.contains("old.bin nobody-truncate 777\n")
            && want.contains("old.bin nobody-write-sgid-noexec 767\n")
            && want.contains("old.bin nobody-pwrite 777\n"),
        "the plain file system behaved unexpectedly:\n{want}"
    );
    assert_eq!(steps(&m.join("")), want, "modes in the view");
    let log = m.log_text();
    assert!(log.contains("FUSE_HANDLE_KILLPRIV_V2 on"), "log:\n{log}");
    assert_eq!(
        sha256_file(&m.join("new.bin")).expect("hash view file"),
        sha256_file(&reference.join("new.bin")).expect("hash reference"),
    );
}
