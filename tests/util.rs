//! Test plumbing: per-test temp dirs, running commands with bounded waits,
//! the `Mount` guard, mountinfo parsing, python3 helpers, deterministic data.

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_snapfs")
}

/// A per-test temporary directory (removed on drop). Declare it *before*
/// any `Mount` so that the mount is dropped (unmounted) first.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("snapfs-it-{name}-"))
            .tempdir()
            .expect("create tempdir");
        TestDir { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.dir.path().join(p)
    }
    /// Creates (and returns) an empty sub directory.
    pub fn mkdir<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        let d = self.join(p);
        std::fs::create_dir_all(&d).expect("mkdir in testdir");
        d
    }
}

/// Result of a finished command.
pub struct Run {
    pub desc: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    pub fn assert_ok(&self) -> &Run {
        assert!(
            self.status.success(),
            "command failed ({}): {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.desc,
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }
    pub fn assert_fail(&self) -> &Run {
        assert!(
            !self.status.success(),
            "command unexpectedly succeeded: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.len() > 300 {
            s.push_str(&a[..a.char_indices().nth(100).map(|x| x.0).unwrap_or(a.len())]);
            s.push('…');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs a command with stdout/stderr captured into (anonymous) files, so that
/// a daemon that keeps inherited descriptors open cannot block us. Waits at
/// most `timeout`; kills and panics past it.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Run {
    try_run_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Run, String> {
    let desc = describe(cmd);
    let mut out = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut err = tempfile::tempfile().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(err.try_clone().map_err(|e| e.to_string())?))
        .env_remove("RUST_LOG");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot spawn {desc}: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(format!("wait {desc}: {e}")),
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("command timed out after {timeout:?}: {desc}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    out.seek(SeekFrom::Start(0)).unwrap();
    out.read_to_end(&mut stdout).unwrap();
    err.seek(SeekFrom::Start(0)).unwrap();
    err.read_to_end(&mut stderr).unwrap();
    Ok(Run {
        desc,
        status,
        stdout,
        stderr,
    })
}

/// Runs a command (5 minute bound).
pub fn run(cmd: &mut Command) -> Run {
    run_timeout(cmd, Duration::from_secs(300))
}

/// Runs a command and asserts it succeeded.
pub fn run_ok(cmd: &mut Command) -> Run {
    let r = run(cmd);
    r.assert_ok();
    r
}

/// `sh -ec script` with `umask 022`, in `cwd`.
pub fn sh(cwd: &Path, script: &str) -> Run {
    let full = format!("umask 022\n{script}");
    run_ok(Command::new("sh").arg("-ec").arg(full).current_dir(cwd))
}

/// `python3 -c script args...`, asserting success.
pub fn python<I, S>(script: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_ok(Command::new("python3").arg("-c").arg(script).args(args))
}

/// An entry of [`owned_tar`]: name, uid, gid, mode, and content (`None`: a directory).
pub type OwnedEntry<'a> = (&'a str, u32, u32, u32, Option<&'a str>);

/// Writes a PAX tar at `path` (python's tarfile) with entries of the given owners and
/// modes, all with mtime 1600000000.
pub fn owned_tar(path: &Path, entries: &[OwnedEntry]) {
    let list: Vec<String> = entries
        .iter()
        .map(|(name, uid, gid, mode, data)| match data {
            Some(d) => format!("[{name:?}, {uid}, {gid}, {mode}, {d:?}]"),
            None => format!("[{name:?}, {uid}, {gid}, {mode}, null]"),
        })
        .collect();
    python(
        r#"
import io, json, sys, tarfile
t = tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT)
for name, uid, gid, mode, data in json.loads(sys.argv[2]):
    i = tarfile.TarInfo(name); i.uid, i.gid, i.mode, i.mtime = uid, gid, mode, 1600000000
    if data is None:
        i.type = tarfile.DIRTYPE; t.addfile(i)
    else:
        b = data.encode(); i.size = len(b); t.addfile(i, io.BytesIO(b))
t.close()
"#,
        [path.display().to_string(), format!("[{}]", list.join(", "))],
    )
    .assert_ok();
}

/// (uid, gid) of `p` itself (a symlink is not followed).
pub fn owner_of(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

/// `snapfs <args>`.
pub fn snapfs<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_timeout(Command::new(bin()).args(args), Duration::from_secs(300))
}

// ---------------------------------------------------------------- mountinfo

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub mount_opts: String,
    pub fstype: String,
    pub source: String,
    pub super_opts: String,
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64
                    + (oct[1] - b'0') as u32 * 8
                    + (oct[2] - b'0') as u32;
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

pub fn mountinfo() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut v = Vec::new();
    for line in text.lines() {
        let (left, right) = match line.split_once(" - ") {
            Some(x) => x,
            None => continue,
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 {
            continue;
        }
        v.push(MountInfo {
            mount_point: unescape_mountinfo(l[4]),
            mount_opts: l[5].to_string(),
            fstype: r[0].to_string(),
            source: r[1].to_string(),
            super_opts: r[2].to_string(),
        });
    }
    v
}

pub fn mount_at(p: &Path) -> Option<MountInfo> {
    mountinfo().into_iter().rev().find(|m| m.mount_point == p)
}

pub fn is_mounted(p: &Path) -> bool {
    mount_at(p).is_some()
}

/// Bounded poll until `cond` holds; returns whether it did.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------- Mount guard

/// A live snapfs mount; unmounted (and checked gone) on drop.
pub struct Mount {
    pub mnt: PathBuf,
    pub archive: PathBuf,
    /// What `snapfs mount` printed on stderr (warnings).
    pub stderr: String,
    pub stdout: String,
    done: bool,
}

impl Mount {
    pub fn new(archive: &Path, mnt: &Path) -> Mount {
        Self::with_args(archive, mnt, &[])
    }

    pub fn with_args(archive: &Path, mnt: &Path, args: &[&str]) -> Mount {
        match Self::try_with_args(archive, mnt, args) {
            Ok(m) => m,
            Err(r) => panic!(
                "snapfs mount failed ({}): {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                r.status,
                r.desc,
                r.stdout_str(),
                r.stderr_str()
            ),
        }
    }

    /// Runs `snapfs mount`; on success waits for the mount to show up in
    /// mountinfo (panics if it never does); on failure returns the run.
    pub fn try_with_args(archive: &Path, mnt: &Path, args: &[&str]) -> Result<Mount, Run> {
        Self::try_with_env(archive, mnt, args, &[])
    }

    /// [`Mount::try_with_args`] with extra environment variables for `snapfs mount`
    /// (and so its daemon).
    pub fn try_with_env(
        archive: &Path,
        mnt: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<Mount, Run> {
        std::fs::create_dir_all(mnt).expect("create mountpoint");
        let mnt = mnt.canonicalize().expect("canonicalize mountpoint");
        let r = run_timeout(
            Command::new(bin())
                .arg("mount")
                .args(args)
                .arg(archive)
                .arg(&mnt)
                .envs(env.iter().map(|(k, v)| (k, v))),
            Duration::from_secs(300),
        );
        if !r.ok() {
            // A failed mount must not leave anything behind.
            if is_mounted(&mnt) {
                let _ = Command::new("umount").arg("-l").arg(&mnt).status();
                panic!("snapfs mount failed but left a mount at {}", mnt.display());
            }
            return Err(r);
        }
        let up = poll_until(Duration::from_secs(60), || is_mounted(&mnt));
        assert!(
            up,
            "snapfs mount exited 0 but {} never appeared in /proc/self/mountinfo\nstderr: {}",
            mnt.display(),
            r.stderr_str()
        );
        Ok(Mount {
            mnt,
            archive: archive.to_path_buf(),
            stderr: r.stderr_str(),
            stdout: r.stdout_str(),
            done: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.mnt.join(p)
    }

    fn do_unmount(&mut self) -> Result<(), String> {
        self.done = true;
        if !is_mounted(&self.mnt) {
            return Ok(());
        }
        let mut problem = None;
        match try_run_timeout(
            Command::new(bin()).arg("umount").arg(&self.mnt),
            Duration::from_secs(60),
        ) {
            Ok(r) if r.ok() => {}
            Ok(r) => {
                problem = Some(format!(
                    "snapfs umount {} failed ({}): {}",
                    self.mnt.display(),
                    r.status,
                    r.stderr_str()
                ))
            }
            Err(e) => problem = Some(e),
        }
        if problem.is_some() && is_mounted(&self.mnt) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let gone = poll_until(Duration::from_secs(20), || !is_mounted(&self.mnt));
        if !gone {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            return Err(format!(
                "{} still mounted after unmount ({})",
                self.mnt.display(),
                problem.unwrap_or_default()
            ));
        }
        match problem {
            Some(p) => Err(p),
            None => Ok(()),
        }
    }

    /// Unmounts now, asserting that `snapfs umount` worked.
    pub fn unmount(mut self) {
        if let Err(e) = self.do_unmount() {
            panic!("{e}");
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = self.do_unmount() {
            if std::thread::panicking() {
                eprintln!("(while panicking) {e}");
            } else {
                panic!("{e}");
            }
        }
    }
}

/// Pids of processes whose command line mentions `needle` (exact substring),
/// excluding this test process.
pub fn pids_with_arg(needle: &Path) -> Vec<u32> {
    let me = std::process::id();
    let mut v = Vec::new();
    let n = needle.as_os_str().as_bytes();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let pid: u32 = match e.file_name().to_str().and_then(|s| s.parse().ok()) {
                Some(p) => p,
                None => continue,
            };
            if pid == me {
                continue;
            }
            let cmdline = match std::fs::read(e.path().join("cmdline")) {
                Ok(c) => c,
                Err(_) => continue,
            };
            if cmdline
                .split(|b| *b == 0)
                .any(|arg| arg.windows(n.len().max(1)).any(|w| w == n))
            {
                // zombies have an empty cmdline, so this is a live process
                v.push(pid);
            }
        }
    }
    v
}

pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the ")".
            let st = s.rsplit_once(')').map(|x| x.1.trim_start()).unwrap_or("");
            !st.starts_with('Z') && !st.starts_with('X')
        }
        Err(_) => false,
    }
}

// ---------------------------------------------------------------- data

/// Deterministic 64-bit LCG (Knuth MMIX constants).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 ^ (self.0 >> 29)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// `len` bytes of semi-compressible data (16-letter alphabet, ~2:1 with gzip).
pub fn semi_compressible(len: usize, seed: u64) -> Vec<u8> {
    const ALPHA: &[u8; 16] = b"etaoinshrdlu \n.,";
    let mut g = Lcg::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        let x = g.next_u64();
        for i in 0..8 {
            v.push(ALPHA[((x >> (i * 8)) & 15) as usize]);
        }
    }
    v.truncate(len);
    v
}

/// `len` bytes of incompressible data.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut g = Lcg::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&g.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex(&h.finalize()))
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub fn unhex(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let v = |c: u8| -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("bad hex {s:?}"),
        }
    };
    b.chunks(2).map(|p| v(p[0]) * 16 + v(p[1])).collect()
}

pub fn os(b: &[u8]) -> OsString {
    OsString::from_vec(b.to_vec())
}

/// Raw OS error of an io::Error (0 if none).
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

pub const EROFS: i32 = 30;
pub const ENOENT: i32 = 2;
pub const ENXIO: i32 = 6;
pub const ENOTCONN: i32 = 107;

/// Data ranges of a file as reported by lseek(SEEK_DATA/SEEK_HOLE)
/// (via python3). Returns `Err(errno_text)` if lseek itself failed.
pub fn seek_ranges(p: &Path) -> Vec<(u64, u64)> {
    const SCRIPT: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
off = 0
while off < size:
    try:
        d = os.lseek(fd, off, os.SEEK_DATA)
    except OSError as e:
        if e.errno == 6:
            break
        raise
    h = os.lseek(fd, d, os.SEEK_HOLE)
    print(d, h)
    if h <= d:
        print("BAD", d, h)
        break
    off = h
"#;
    let r = python(SCRIPT, [p.as_os_str()]);
    let mut v = Vec::new();
    for line in r.stdout_str().lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert!(
            parts[0] != "BAD",
            "lseek loop on {} made no progress: {line}",
            p.display()
        );
        v.push((parts[0].parse().unwrap(), parts[1].parse().unwrap()));
    }
    v
}

/// Merge adjacent/overlapping ranges.
pub fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        if let Some(last) = out.last_mut() {
            if a <= last.1 {
                last.1 = last.1.max(b);
                continue;
            }
        }
        out.push((a, b));
    }
    out
}

/// Lists names directly inside a directory.
pub fn list_dir(p: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = std::fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| e.expect("dirent").file_name())
        .collect();
    v.sort();
    v
}

/// Whether `s` appears in `hay` (bytes).
pub fn contains_bytes(hay: &[u8], s: &[u8]) -> bool {
    s.is_empty() || hay.windows(s.len()).any(|w| w == s)
}

impl Mount {
    /// Takes ownership of a mount made outside the guard (for cleanup).
    pub fn adopt(archive: &Path, mnt: &Path) -> Mount {
        Mount {
            mnt: mnt.to_path_buf(),
            archive: archive.to_path_buf(),
            stderr: String::new(),
            stdout: String::new(),
            done: false,
        }
    }
}

/// Non-empty lines of a text.
pub fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Asserts a failed snapfs run printed exactly one readable error line
/// mentioning `needle`, and no panic.
pub fn assert_one_line_error(r: &Run, needle: &str) {
    r.assert_fail();
    assert!(
        r.status.code().is_some(),
        "{} was killed by a signal: {}",
        r.desc,
        r.status
    );
    let err = r.stderr_str();
    let l = lines(&err);
    assert_eq!(
        l.len(),
        1,
        "expected exactly one error line from `{}`, got:\n{err}",
        r.desc
    );
    assert!(
        l[0].contains(needle),
        "error line {:?} does not name {needle:?}",
        l[0]
    );
    assert!(!err.contains("panicked"), "panic in `{}`: {err}", r.desc);
}

/// The daemon serving `mnt` (matched by its command line), if unique.
pub fn daemon_pid(mnt: &Path, archive: &Path) -> u32 {
    let mut p = pids_with_arg(mnt);
    if p.is_empty() {
        p = pids_with_arg(archive);
    }
    p.retain(|pid| process_alive(*pid));
    assert_eq!(
        p.len(),
        1,
        "expected exactly one snapfs daemon for {}, found pids {p:?}",
        mnt.display()
    );
    p[0]
}

// ---------------------------------------------------------------- foreground daemon

/// A `snapfs mount -f` daemon whose log (stderr) goes to a file, for tests that check
/// what the daemon logs. Drop unmounts (through the `Mount` guard), then reaps the
/// daemon (killing it if it does not exit).
pub struct FgMount {
    pub mount: Option<Mount>,
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl FgMount {
    /// Starts `snapfs mount -f ARGS ARCHIVE MNT` with `env` and waits for the mount.
    pub fn start(archive: &Path, mnt: &Path, args: &[&str], env: &[(&str, &str)]) -> FgMount {
        std::fs::create_dir_all(mnt).expect("create mountpoint");
        let mnt = mnt.canonicalize().expect("canonicalize mountpoint");
        let log = mnt.with_extension("log");
        let mut cmd = Command::new(bin());
        cmd.arg("mount")
            .arg("-f")
            .args(args)
            .arg(archive)
            .arg(&mnt)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create daemon log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn snapfs mount -f");
        let up = poll_until(Duration::from_secs(120), || {
            is_mounted(&mnt) || matches!(child.try_wait(), Ok(Some(_)))
        });
        if !(up && is_mounted(&mnt)) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "foreground mount of {} never came up:\n{}",
                archive.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        FgMount {
            mount: Some(Mount::adopt(archive, &mnt)),
            child,
            log,
        }
    }

    pub fn path(&self) -> &Path {
        self.mount.as_ref().map(|m| m.path()).expect("mounted")
    }

    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.path().join(p)
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the daemon process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FgMount {
    fn drop(&mut self) {
        drop(self.mount.take());
        let exited = poll_until(Duration::from_secs(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- tmpfs

/// A small tmpfs (root only), unmounted on drop: a disk that fills up.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn new(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create tmpfs mountpoint");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("tmpfs")
                .arg(path),
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// The value (in kB) of a `/proc/PID/status` field such as `VmHWM`.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Every path in a tree (not following symlinks), relative, plus every symlink's
/// target; asserts that no path has a `..` component.
pub fn assert_confined(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let e = e.expect("dirent");
            let name = e.file_name();
            assert!(
                name != ".." && name != "." && !name.as_bytes().contains(&b'/'),
                "bad name {name:?} in {}",
                d.display()
            );
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).expect("lstat");
            assert!(p.starts_with(root));
            if md.is_dir() {
                stack.push(p);
            }
            n += 1;
        }
    }
    n
}

// ---------------------------------------------------------------- snapfs service

/// A `snapfs serve` started by a test, with its own root and socket and its log in a
/// file. Drop stops it by its pid (SIGTERM, then SIGKILL if it does not exit), then
/// detaches any mount it left under `base` (the test dir), so nothing stays behind.
pub struct Service {
    pub child: std::process::Child,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    base: PathBuf,
}

impl Service {
    /// Starts `snapfs serve --root ROOT --socket SOCKET ARGS` and waits until it
    /// answers `status` (it answers only once every recorded view is back).
    pub fn start(base: &Path, root: &Path, socket: &Path, args: &[&str]) -> Service {
        let log = root.with_extension(format!("{}.log", std::process::id()));
        let log = unique_log(&log);
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("SNAPFS_SERVICE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create service log"));
        let child = cmd.spawn().expect("spawn snapfs serve");
        let mut s = Service {
            child,
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            log,
            base: base.to_path_buf(),
        };
        let up = poll_until(Duration::from_secs(120), || {
            s.try_request(r#"{"op":"status"}"#).is_ok() || !s.alive()
        });
        assert!(
            up && s.alive(),
            "snapfs serve never answered:\n{}",
            s.log_text()
        );
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one raw request line; the parsed response.
    pub fn try_request(&self, line: &str) -> Result<serde_json::Value, String> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket)
            .map_err(|e| format!("connect {}: {e}", self.socket.display()))?;
        s.write_all(line.as_bytes())
            .and_then(|_| s.write_all(b"\n"))
            .map_err(|e| e.to_string())?;
        let mut resp = String::new();
        BufReader::new(&s)
            .read_line(&mut resp)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&resp).map_err(|e| format!("bad response {resp:?}: {e}"))
    }

    /// Sends a request and returns the response (panics if there is none).
    pub fn request(&self, req: &serde_json::Value) -> serde_json::Value {
        self.try_request(&req.to_string())
            .unwrap_or_else(|e| panic!("{e}\nservice log:\n{}", self.log_text()))
    }

    /// Sends a request that must succeed.
    pub fn ok(&self, req: &serde_json::Value) -> serde_json::Value {
        let r = self.request(req);
        assert_eq!(
            r["ok"],
            true,
            "request {req} refused: {r}\nservice log:\n{}",
            self.log_text()
        );
        r
    }

    /// The `status` response's `status`.
    pub fn status(&self) -> serde_json::Value {
        self.ok(&serde_json::json!({"op": "status"}))["status"].clone()
    }

    /// Bytes read so far from the source at `path` (0 if it is not open).
    pub fn bytes_read(&self, path: &Path) -> u64 {
        let st = self.status();
        st["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["path"].as_str() == path.to_str())
            .and_then(|s| s["bytes_read"].as_u64())
            .unwrap_or(0)
    }

    /// Adds a view through the socket and waits for its mount.
    pub fn add(&self, view: serde_json::Value) -> serde_json::Value {
        let mp = PathBuf::from(view["mountpoint"].as_str().expect("mountpoint"));
        let r = self.ok(&serde_json::json!({"op": "add", "view": view}));
        assert!(
            poll_until(Duration::from_secs(20), || is_mounted(&mp)),
            "{} not mounted after add",
            mp.display()
        );
        r
    }

    /// Sends `sig` and waits (bounded) for the process to exit; whether it did.
    pub fn signal_and_wait(&mut self, sig: i32, limit: Duration) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        poll_until(limit, || matches!(self.child.try_wait(), Ok(Some(_))))
    }

    /// Stops the service with SIGTERM and asserts it exited cleanly.
    pub fn stop(mut self) {
        assert!(
            self.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)),
            "snapfs serve did not exit on SIGTERM:\n{}",
            self.log_text()
        );
        let status = self.child.wait().expect("wait");
        assert!(
            status.success(),
            "snapfs serve exited with {status}:\n{}",
            self.log_text()
        );
    }

    /// Kills the service with SIGKILL and waits until it is gone.
    pub fn kill9(mut self) {
        assert!(
            self.signal_and_wait(libc::SIGKILL, Duration::from_secs(30)),
            "snapfs serve survived SIGKILL"
        );
        let _ = self.child.wait();
        // Drop only checks it is gone; the stale mounts stay for the restart.
        self.base = PathBuf::new();
    }
}

fn unique_log(p: &Path) -> PathBuf {
    let mut n = 0;
    loop {
        let c = p.with_extension(format!("{n}.log"));
        if !c.exists() {
            return c;
        }
        n += 1;
    }
}

/// Mountpoints under `base` in mountinfo.
pub fn mounts_under(base: &Path) -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(base))
        .collect()
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None))
            && !self.signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
        {
            self.signal_and_wait(libc::SIGKILL, Duration::from_secs(30));
        }
        let _ = self.child.wait();
        if self.base.as_os_str().is_empty() {
            return;
        }
        for mp in mounts_under(&self.base).into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&mp).status();
        }
    }
}

/// Detaches, on drop, every mount left under a directory (declare it right after the
/// `TestDir`, so it runs after the guards declared later).
pub struct NoMountsLeft(pub PathBuf);

impl Drop for NoMountsLeft {
    fn drop(&mut self) {
        for mp in mounts_under(&self.0).into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&mp).status();
        }
    }
}
