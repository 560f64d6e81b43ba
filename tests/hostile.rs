//! Hostile archives: absolute paths, `..` members, symlink traversal,
//! malformed headers, truncation, trailing garbage.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::corpus::{self, crafted_case};
use crate::tree::{self, CmpOpts, Kind, WalkOpts};
use crate::util::{self, Mount, TestDir};

fn unique() -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{n}", std::process::id())
}

/// Every path under `dir` (not following symlinks, not entering `skip`).
fn all_paths(dir: &Path, skip: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if skip.contains(&p) {
                continue;
            }
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

fn mount_paths(m: &Path) -> BTreeSet<String> {
    let t = tree::walk(m, &WalkOpts::listing());
    assert!(t.problems.is_empty(), "walk problems: {:?}", t.problems);
    t.entries
        .keys()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn absolute_paths_are_stripped() {
    let c = corpus::crafted_case_skip_times(
        "absolute",
        r#"
tf = open_tar("pax")
d(tf, "/absdir", mode=0o750)
f(tf, "/absdir/file", "A")
f(tf, "//double/slash", "D")
sl(tf, "/absdir/link", "/etc/passwd")
tf.close()
"#,
        &["absdir"],
    );
    let md = fs::symlink_metadata(c.m.join("absdir")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o750, 1600000000));
    assert_eq!(fs::read(c.m.join("absdir/file")).unwrap(), b"A");
    assert_eq!(fs::read(c.m.join("double/slash")).unwrap(), b"D");
    assert_eq!(
        fs::read_link(c.m.join("absdir/link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        mount_paths(c.m.path()),
        set(&[
            "absdir",
            "absdir/file",
            "absdir/link",
            "double",
            "double/slash"
        ])
    );
}

#[test]
fn dotdot_members_are_skipped_with_warnings() {
    let td = TestDir::new("dotdot");
    let tok = unique();
    let escape = format!("../../../../../../../../../tmp/snapfs-evil-{tok}");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        &format!(
            r#"
tf = open_tar("pax")
f(tf, "b", "legit")
f(tf, "x/../b", "evil-shadow")
f(tf, "../evil-{tok}", "evil")
f(tf, "a/../../evil2-{tok}", "evil")
d(tf, "dd/..")
f(tf, "{escape}", "evil")
f(tf, "ok/file", "fine")
tf.close()
"#
        ),
    );
    let before = all_paths(td.path(), &[]);
    let r = util::snapfs([std::ffi::OsStr::new("index"), tar.as_os_str()]);
    r.assert_ok();
    let err = r.stderr_str();
    for name in [
        "x/../b",
        &format!("../evil-{tok}"),
        &format!("a/../../evil2-{tok}"),
        "dd/..",
        &escape,
    ] {
        assert!(
            err.contains(name),
            "`snapfs index` stderr does not name skipped member {name:?}:\n{err}"
        );
    }
    let m = Mount::new(&tar, &td.join("mnt"));
    assert_eq!(mount_paths(m.path()), set(&["b", "ok", "ok/file"]));
    assert_eq!(
        fs::read(m.join("b")).unwrap(),
        b"legit",
        "a skipped `..` member shadowed the legit entry"
    );
    // Nothing created outside the test dir; inside it only the index and the mountpoint.
    assert!(!Path::new(&format!("/tmp/snapfs-evil-{tok}")).exists());
    assert!(!td
        .path()
        .parent()
        .unwrap()
        .join(format!("evil-{tok}"))
        .exists());
    assert!(!td
        .path()
        .parent()
        .unwrap()
        .join(format!("evil2-{tok}"))
        .exists());
    let after = all_paths(td.path(), &[m.path().to_path_buf()]);
    let new: Vec<_> = after.difference(&before).collect();
    let allowed = [td.join("a.tar.snapfs-idx"), td.join("mnt")];
    for p in &new {
        assert!(
            allowed.contains(p),
            "unexpected file created: {}",
            p.display()
        );
    }

    // A cold `snapfs mount` warns too.
    let tar2 = td.join("cold.tar");
    fs::copy(&tar, &tar2).unwrap();
    let m2 = Mount::new(&tar2, &td.join("mnt2"));
    assert!(
        m2.stderr.contains(&format!("../evil-{tok}")) && m2.stderr.contains("x/../b"),
        "cold `snapfs mount` stderr does not name the skipped members:\n{}",
        m2.stderr
    );
}

#[test]
fn members_through_archive_symlinks_are_skipped() {
    let td = TestDir::new("symlink-traversal");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        r#"
tf = open_tar("pax")
sl(tf, "link", "/etc")
f(tf, "link/passwd", "pwned\n")
sl(tf, "rel", "../../..")
f(tf, "rel/escape", "x")
sl(tf, "deep/link2", "/tmp")
f(tf, "deep/link2/x/y", "deep")
f(tf, "normal", "n")
tf.close()
"#,
    );
    let passwd = fs::read("/etc/passwd").unwrap();
    let before = all_paths(td.path(), &[]);
    let r = util::snapfs([std::ffi::OsStr::new("index"), tar.as_os_str()]);
    r.assert_ok();
    for name in ["link/passwd", "rel/escape", "deep/link2/x/y"] {
        assert!(
            r.stderr_str().contains(name),
            "`snapfs index` stderr does not name {name:?}:\n{}",
            r.stderr_str()
        );
    }
    let m = Mount::new(&tar, &td.join("mnt"));
    assert_eq!(
        mount_paths(m.path()),
        set(&["deep", "deep/link2", "link", "normal", "rel"])
    );
    let md = fs::symlink_metadata(m.join("link")).unwrap();
    assert!(
        md.file_type().is_symlink(),
        "`link` must still be the symlink"
    );
    assert_eq!(fs::read_link(m.join("link")).unwrap(), Path::new("/etc"));
    assert_eq!(fs::read_link(m.join("rel")).unwrap(), Path::new("../../.."));
    assert_eq!(fs::read("/etc/passwd").unwrap(), passwd);
    let after = all_paths(td.path(), &[m.path().to_path_buf()]);
    for p in after.difference(&before) {
        assert!(
            [td.join("a.tar.snapfs-idx"), td.join("mnt")].contains(p),
            "unexpected file created: {}",
            p.display()
        );
    }
    assert!(!Path::new("/tmp/x/y").exists() || fs::read("/tmp/x/y").unwrap() != b"deep");
}

#[test]
fn symlink_loops_and_weird_links() {
    let c = crafted_case(
        "symlink-loops",
        r#"
tf = open_tar("pax")
sl(tf, "loop_a", "loop_b")
sl(tf, "loop_b", "loop_a")
sl(tf, "self", "self")
sl(tf, "dots", "./../.././x")
f(tf, "real", "r")
tf.close()
"#,
    );
    assert_eq!(
        fs::read_link(c.m.join("loop_a")).unwrap(),
        Path::new("loop_b")
    );
    assert_eq!(
        fs::read_link(c.m.join("dots")).unwrap(),
        Path::new("./../.././x")
    );
    let e = fs::metadata(c.m.join("self")).unwrap_err();
    assert_eq!(
        util::errno(&e),
        40,
        "stat through a self-loop should be ELOOP"
    );
}

#[test]
fn deeply_nested_path() {
    let body = format!(
        r#"
tf = open_tar("pax")
f(tf, "{}leaf", "deep leaf")
tf.close()
"#,
        "d/".repeat(300)
    );
    let c = crafted_case("deep", &body);
    assert_eq!(
        fs::read(c.m.join(format!("{}leaf", "d/".repeat(300)))).unwrap(),
        b"deep leaf"
    );
}

#[test]
fn missing_eof_marker() {
    // A tar that just ends after the last member (no zero blocks).
    let td = TestDir::new("no-eof");
    let tar = td.join("full.tar");
    corpus::py_tar(
        &tar,
        "tf = open_tar('gnu')\nf(tf, 'a', 'aaa')\nf(tf, 'b/c', 'ccc')\ntf.close()\n",
    );
    let bytes = fs::read(&tar).unwrap();
    let cut = td.join("cut.tar");
    fs::write(&cut, &bytes[..512 * 4]).unwrap(); // a: hdr+data, b/c: hdr+data
    let exp = td.join("x");
    corpus::extract(&cut, &exp);
    let m = Mount::new(&cut, &td.join("mnt"));
    tree::assert_same_tree(
        &exp,
        m.path(),
        &CmpOpts::with_implicit(corpus::implicit_dirs(&corpus::listed_names(&cut))),
    );
    assert_eq!(fs::read(m.join("b/c")).unwrap(), b"ccc");
}

#[test]
fn trailing_garbage_after_eof_marker() {
    let td = TestDir::new("trailing");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        "tf = open_tar('gnu')\nf(tf, 'a', 'aaa')\ntf.close()\n",
    );
    let mut bytes = fs::read(&tar).unwrap();
    bytes.extend_from_slice(&util::random_bytes(100_000, 3));
    fs::write(&tar, &bytes).unwrap();
    let m = Mount::new(&tar, &td.join("mnt"));
    assert_eq!(mount_paths(m.path()), set(&["a"]));
    assert_eq!(fs::read(m.join("a")).unwrap(), b"aaa");
}

#[test]
fn root_dir_entries_and_dot_file() {
    // "./" with a mode, and a regular file named "." must not replace the root.
    let td = TestDir::new("dot");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        "tf = open_tar('gnu')\nd(tf, './', mode=0o700)\nf(tf, '.', 'root as a file?')\nf(tf, 'kept', 'k')\ntf.close()\n",
    );
    let m = Mount::new(&tar, &td.join("mnt"));
    assert!(fs::metadata(m.path()).unwrap().is_dir());
    assert_eq!(fs::read(m.join("kept")).unwrap(), b"k");
}

#[test]
fn bad_hardlinks_are_skipped() {
    let td = TestDir::new("bad-hardlinks");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        r#"
tf = open_tar("pax")
d(tf, "somedir")
f(tf, "good", "g")
hl(tf, "to_missing", "does/not/exist")
hl(tf, "to_self", "to_self")
hl(tf, "to_dir", "somedir")
hl(tf, "to_good", "good")
tf.close()
"#,
    );
    let m = Mount::new(&tar, &td.join("mnt"));
    let t = tree::walk(m.path(), &WalkOpts::default());
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    for bad in ["to_missing", "to_self", "to_dir"] {
        if let Some(e) = t.entries.get(Path::new(bad)) {
            panic!("{bad} should be skipped (GNU tar cannot create it), but the mount shows {e:?}");
        }
    }
    assert_eq!(t.entries[Path::new("to_good")].kind, Kind::File);
    assert_eq!(
        fs::metadata(m.join("to_good")).unwrap().ino(),
        fs::metadata(m.join("good")).unwrap().ino()
    );
}

/// Malformed archives: snapfs must neither panic nor hang. It may refuse the
/// archive (one error line, no mount) or mount what it could read.
fn no_panic_case(name: &str, patch_py: &str) {
    let td = TestDir::new(name);
    let tar = td.join("bad.tar");
    corpus::py_tar(&tar, patch_py);
    let r = util::run_timeout(
        std::process::Command::new(util::bin())
            .arg("index")
            .arg(&tar),
        Duration::from_secs(60),
    );
    assert!(
        r.status.code().is_some(),
        "snapfs index killed by a signal ({}): {}",
        r.status,
        r.stderr_str()
    );
    assert!(
        !r.stderr_str().contains("panicked"),
        "snapfs index panicked:\n{}",
        r.stderr_str()
    );
    if !r.ok() {
        assert!(
            !util::lines(&r.stderr_str()).is_empty(),
            "snapfs index failed silently"
        );
    }
    let _ = fs::remove_file(td.join("bad.tar.snapfs-idx"));
    match Mount::try_with_args(&tar, &td.join("mnt"), &[]) {
        Ok(m) => {
            // Whatever it shows must be walkable and readable without errors
            // other than EIO on damaged data.
            let t = tree::walk(
                m.path(),
                &WalkOpts {
                    content: false,
                    xattrs: false,
                    big: 0,
                },
            );
            assert!(t.problems.is_empty(), "walk problems: {:?}", t.problems);
            for (p, e) in &t.entries {
                if e.kind == Kind::File {
                    let mut f = fs::File::open(m.join(p)).unwrap();
                    let mut buf = vec![0u8; 1 << 16];
                    let _ = std::io::Read::read(&mut f, &mut buf);
                }
            }
            assert!(!m.stderr.contains("panicked"), "{}", m.stderr);
        }
        Err(r) => {
            assert!(
                r.status.code().is_some(),
                "snapfs mount killed by a signal: {}",
                r.stderr_str()
            );
            assert!(
                !r.stderr_str().contains("panicked"),
                "snapfs mount panicked:\n{}",
                r.stderr_str()
            );
            assert_eq!(
                util::lines(&r.stderr_str()).len(),
                1,
                "want one error line:\n{}",
                r.stderr_str()
            );
            assert!(!util::is_mounted(&td.join("mnt").canonicalize().unwrap()));
        }
    }
}

/// Python helpers to patch raw header fields after writing.
const PATCH: &str = r#"
def rewrite(mut):
    buf = bytearray(open(OUT, "rb").read())
    mut(buf)
    open(OUT, "wb").write(bytes(buf))
def set_field(buf, hdr, off, raw):
    buf[hdr + off: hdr + off + len(raw)] = raw
    buf[hdr + 148: hdr + 156] = b" " * 8
    s = sum(buf[hdr: hdr + 512])
    buf[hdr + 148: hdr + 156] = b"%06o\0 " % s
"#;

macro_rules! no_panic_tests {
    ($($name:ident: $body:expr;)*) => {$(
        #[test]
        fn $name() {
            no_panic_case(stringify!($name), &format!("{PATCH}\n{}", $body));
        }
    )*};
}

no_panic_tests! {
    hostile_truncated_member_data: "tf = open_tar('gnu')\nf(tf, 'ok', 'fine')\nf(tf, 'big', b'x' * 100000)\ntf.close()\nrewrite(lambda b: b.__delitem__(slice(3000, None)))";
    hostile_huge_base256_size: "tf = open_tar('gnu')\nf(tf, 'ok', 'fine')\nf(tf, 'huge', '')\ntf.close()\nrewrite(lambda b: set_field(b, 1024, 124, b'\\x80' + (2**62).to_bytes(11, 'big')))";
    hostile_negative_base256_size: "tf = open_tar('gnu')\nf(tf, 'neg', '')\nf(tf, 'after', 'a')\ntf.close()\nrewrite(lambda b: set_field(b, 0, 124, b'\\xff' * 12))";
    hostile_octal_size_garbage: "tf = open_tar('gnu')\nf(tf, 'g', 'abc')\ntf.close()\nrewrite(lambda b: set_field(b, 0, 124, b'99999999999\\0'))";
    hostile_bad_checksum_mid_archive: "tf = open_tar('gnu')\nf(tf, 'a', 'a')\nf(tf, 'b', 'b')\nf(tf, 'c', 'c')\ntf.close()\nrewrite(lambda b: b.__setitem__(slice(1024 + 148, 1024 + 156), b'0000000\\0'))";
    hostile_pax_absurd_record_length: "tf = open_tar('pax')\nf(tf, 'p', 'p', pax={'comment': 'x'})\ntf.close()\nrewrite(lambda b: b.__setitem__(slice(512, 520), b'99999999'))";
    hostile_pax_huge_size_record: "tf = open_tar('pax')\nf(tf, 'p', 'p', pax={'size': '99999999999999999999'})\ntf.close()";
    hostile_pax_path_with_nul: "tf = open_tar('pax')\nf(tf, 'p', 'p', pax={'path': 'a\\x00b'})\nf(tf, 'q', 'q')\ntf.close()";
    hostile_pax_sparse_bogus_map: "tf = open_tar('pax')\nf(tf, 's', b'd' * 512, pax={'GNU.sparse.major': '1', 'GNU.sparse.minor': '0', 'GNU.sparse.name': 's', 'GNU.sparse.realsize': '9223372036854775807'})\ntf.close()\nrewrite(lambda b: b.__setitem__(slice(1536, 1536 + 40), b'99999999999999\\n0\\n512\\n'.ljust(40, b'0')))";
    hostile_gnu_sparse_overlapping_map: "tf = open_tar('gnu')\nf(tf, 's', b'd' * 1024)\ntf.close()\nrewrite(lambda b: (set_field(b, 0, 156, b'S'), set_field(b, 0, 386, b'%011o\\0%011o\\0%011o\\0%011o\\0' % (4096, 1024, 0, 4096)), set_field(b, 0, 483, b'%011o\\0' % (1 << 32))))";
    hostile_gnu_longname_truncated: "tf = open_tar('gnu')\nf(tf, 'n' * 300, 'x')\ntf.close()\nrewrite(lambda b: (set_field(b, 0, 124, b'%011o\\0' % (1 << 30)), b.__delitem__(slice(2048, None))))";
    hostile_all_garbage_after_first_header: "tf = open_tar('gnu')\nf(tf, 'a', 'a' * 600)\ntf.close()\nrewrite(lambda b: b.__setitem__(slice(1536, len(b)), bytes((i * 7) & 255 for i in range(len(b) - 1536))))";
}
