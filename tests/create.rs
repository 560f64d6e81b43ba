//! `snapfs create`: the standard corpus tree captured in each format is read by
//! GNU tar, gzip and zstd without a word, extracts to the same tree, mounts to the
//! same tree, and mounts without an indexing pass (the index is embedded).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::corpus::{self, shq};
use crate::tree::{self, CmpOpts};
use crate::util::{self, Mount, Run, TestDir};

fn create(src: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("create"),
        src.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    util::snapfs(args)
}

/// Runs a shell command; asserts exit 0 and an empty stderr.
fn silent_ok(script: &str) {
    let r = util::run(Command::new("sh").arg("-c").arg(script));
    assert!(
        r.ok() && r.stderr.is_empty(),
        "`{script}` exited {} with stderr:\n{}",
        r.status,
        r.stderr_str()
    );
}

/// The index a mount would write beside the archive.
fn beside_index(archive: &Path) -> PathBuf {
    let mut p = archive.canonicalize().unwrap().into_os_string();
    p.push(".snapfs-idx");
    PathBuf::from(p)
}

fn roundtrip(name: &str, file: &str, extra: &[&str]) {
    let td = TestDir::new(name);
    let src = td.join("src");
    corpus::build_std_tree(&src);
    let out = td.join(file);
    let r = create(&src, &out, extra);
    r.assert_ok();
    let line = r.stdout_str();
    assert_eq!(util::lines(&line).len(), 1, "one summary line: {line}");
    assert!(line.contains("sha256:"), "{line}");
    assert!(
        line.contains(&util::sha256_file(&out).unwrap()),
        "printed hash is the file's: {line}"
    );
    assert!(r.stderr.is_empty(), "create stderr: {}", r.stderr_str());

    // The standard tools accept it without warnings.
    let o = shq(&out);
    let (list, test) = match file.rsplit('.').next().unwrap() {
        "gz" | "tgz" => ("tar -tzvf", Some(format!("gzip -t {o}"))),
        "zst" | "tzst" => ("tar --zstd -tvf", Some(format!("zstd -q -t {o}"))),
        _ => ("tar -tvf", None),
    };
    silent_ok(&format!("{list} {o} > /dev/null"));
    silent_ok(&format!("tar -tf {o} > /dev/null"));
    if let Some(t) = test {
        silent_ok(&t);
    }

    // GNU tar extracts the source tree.
    let exp = td.join("x");
    let r = corpus::extract_raw(&out, &exp);
    assert!(
        r.ok() && r.stderr.is_empty(),
        "tar -x exited {}: {}",
        r.status,
        r.stderr_str()
    );
    let n = tree::assert_same_tree(&src, &exp, &CmpOpts::default());
    assert!(n > 330, "compared only {n} entries");

    // The mount shows the source tree, without building an index.
    let idx = beside_index(&out);
    let m = Mount::new(&out, &td.join("mnt"));
    tree::assert_same_tree(&src, m.path(), &CmpOpts::default());
    let root = fs::metadata(m.path()).unwrap();
    let src_root = fs::metadata(&src).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(root.mode(), src_root.mode(), "root mode from the ./ member");
    m.unmount();
    assert!(
        !idx.exists(),
        "mounting ran an indexing pass: {} exists",
        idx.display()
    );
}

#[test]
fn create_tar_roundtrip() {
    roundtrip("create-tar", "snap.tar", &[]);
}

#[test]
fn create_gzip_roundtrip() {
    roundtrip("create-gz", "snap.tar.gz", &[]);
}

#[test]
fn create_zstd_roundtrip() {
    roundtrip("create-zst", "snap.tar.zst", &[]);
}

#[test]
fn create_options_level_chunk_and_explicit_format() {
    roundtrip(
        "create-opts",
        "snap.tgz",
        &["--level", "1", "--chunk", "64K"],
    );
    roundtrip(
        "create-opts-zst",
        "snapshot.bin.zst",
        &["--format", "zst", "--level", "19", "--chunk", "1M"],
    );
}

#[test]
fn create_is_deterministic_and_skips_itself() {
    let td = TestDir::new("create-det");
    let src = td.join("src");
    corpus::build_small_tree(&src, 7);
    let a = td.join("a.tar.zst");
    let b = td.join("b.tar.zst");
    create(&src, &a, &[]).assert_ok();
    create(&src, &b, &[]).assert_ok();
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    // Written inside the captured directory: it does not contain itself.
    let inside = src.join("self.tar.gz");
    create(&src, &inside, &[]).assert_ok();
    let r = util::run_ok(Command::new("tar").arg("-tzf").arg(&inside));
    let names = r.stdout_str();
    assert!(!names.contains("self.tar.gz"), "{names}");
    assert!(!names.contains(".snapfs-create-"), "{names}");
    assert!(names.lines().any(|l| l == "./"), "root member: {names}");
}

#[test]
fn create_errors_are_one_line() {
    let td = TestDir::new("create-err");
    let src = td.mkdir("src");
    fs::write(src.join("f"), b"x").unwrap();
    let r = create(&td.join("missing"), &td.join("o.tar"), &[]);
    util::assert_one_line_error(&r, "missing");
    let r = create(&src, &td.join("o.zip"), &[]);
    util::assert_one_line_error(&r, "o.zip");
    let r = create(&src, &td.join("nodir/o.tar"), &[]);
    util::assert_one_line_error(&r, "nodir");
    let r = create(&src, &td.join("o.tar.gz"), &["--level", "12"]);
    util::assert_one_line_error(&r, "level");
    // A socket is skipped with a warning naming it.
    let r = util::run_ok(Command::new("python3").arg("-c").arg(format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.bind({:?})",
        src.join("sock").to_str().unwrap()
    )));
    drop(r);
    let out = td.join("o.tar");
    let r = create(&src, &out, &[]);
    r.assert_ok();
    assert!(r.stderr_str().contains("sock"), "{}", r.stderr_str());
    assert!(!util::list_dir(td.path())
        .iter()
        .any(|n| n.to_string_lossy().contains(".snapfs-create-")));
}

#[test]
fn create_killed_leaves_no_snapshot() {
    let td = TestDir::new("create-kill");
    let src = td.mkdir("src");
    for i in 0..8 {
        fs::write(
            src.join(format!("f{i}")),
            util::semi_compressible(16 << 20, i),
        )
        .unwrap();
    }
    let out = td.join("o.tar.gz");
    let mut child = Command::new(util::bin())
        .arg("create")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .arg("--level")
        .arg("9")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    assert!(!out.exists(), "a killed create left {}", out.display());
}
