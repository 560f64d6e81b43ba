//! Hostile archives: absolute paths, `..` members, symlink traversal,
//! malformed headers, truncation, trailing garbage.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::corpus::{self, crafted_case, Comp};
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
    assert!(
        c.m.stderr.contains("removing leading '/'"),
        "no warning for the absolute names:\n{}",
        c.m.stderr
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
                    if let Err(e) = std::io::Read::read(&mut f, &mut buf) {
                        assert_eq!(util::errno(&e), 5, "{}: {e}", p.display());
                    }
                }
            }
            assert!(!m.stderr.contains("panicked"), "{}", m.stderr);
            // The daemon is still there after reading everything, and nothing is
            // outside the root.
            assert!(fs::metadata(m.path()).unwrap().is_dir());
            util::assert_confined(m.path());
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
            assert!(
                r.stderr_str().contains("bad.tar"),
                "the error does not name the archive: {}",
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
    hostile_pax_negative_size: "tf = open_tar('pax')\nf(tf, 'neg', 'abc', pax={'size': '-1'})\nf(tf, 'after', 'a')\ntf.close()";
    hostile_pax_size_smaller_than_data: "tf = open_tar('pax')\nf(tf, 'liar', b'L' * 3000, pax={'size': '10'})\nf(tf, 'after', 'a')\ntf.close()";
    hostile_pax_size_past_the_end: "tf = open_tar('pax')\nf(tf, 'liar', 'short', pax={'size': '1000000000'})\nf(tf, 'after', 'a')\ntf.close()";
    hostile_pax_size_overflows_offsets: "tf = open_tar('pax')\nf(tf, 'liar', 'short', pax={'size': '18446744073709551615'})\ntf.close()";
    hostile_pax_record_length_too_short: "tf = open_tar('pax')\nf(tf, 'p', 'p', pax={'comment': 'x' * 40})\ntf.close()\nrewrite(lambda b: b.__setitem__(slice(512, 514), b'05'))";
    hostile_pax_record_length_negative: "tf = open_tar('pax')\nf(tf, 'p', 'p', pax={'comment': 'x' * 40})\ntf.close()\nrewrite(lambda b: b.__setitem__(slice(512, 515), b'-99'))";
    hostile_truncated_mid_header: "tf = open_tar('gnu')\nf(tf, 'ok', 'fine')\nf(tf, 'next', 'n')\ntf.close()\nrewrite(lambda b: b.__delitem__(slice(1024 + 200, None)))";
    hostile_all_garbage_after_first_header: "tf = open_tar('gnu')\nf(tf, 'a', 'a' * 600)\ntf.close()\nrewrite(lambda b: b.__setitem__(slice(1536, len(b)), bytes((i * 7) & 255 for i in range(len(b) - 1536))))";
}

// ------------------------------------------------------------ issue 6 additions

/// `snapfs mount` refuses `archive` with one error line naming it and `why`, leaves no
/// mount and no daemon behind.
fn refused(archive: &Path, mnt: &Path, why: &str) {
    match Mount::try_with_args(archive, mnt, &[]) {
        Ok(m) => panic!(
            "{} mounted, want a refusal ({why}); it shows {:?}",
            archive.display(),
            util::list_dir(m.path())
        ),
        Err(r) => {
            let name = archive.file_name().unwrap().to_string_lossy().into_owned();
            util::assert_one_line_error(&r, &name);
            assert!(
                r.stderr_str().contains(why),
                "error for {name} does not say {why:?}: {}",
                r.stderr_str()
            );
        }
    }
    let mnt = mnt.canonicalize().unwrap();
    assert!(!util::is_mounted(&mnt));
    assert!(util::poll_until(Duration::from_secs(10), || {
        util::pids_with_arg(&mnt)
            .into_iter()
            .all(|p| !util::process_alive(p))
    }));
}

#[test]
fn hardlinks_to_later_entries_and_cycles_are_skipped_with_warnings() {
    let td = TestDir::new("hardlink-order");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        r#"
tf = open_tar("pax")
hl(tf, "early", "later")
f(tf, "later", "L")
hl(tf, "c1", "c2")
hl(tf, "c2", "c1")
hl(tf, "c3", "c4")
hl(tf, "c4", "c5")
hl(tf, "c5", "c3")
hl(tf, "after", "later")
tf.close()
"#,
    );
    let m = Mount::new(&tar, &td.join("mnt"));
    for name in ["early", "c1", "c2", "c3", "c4", "c5"] {
        assert!(
            m.stderr.contains(&format!("skipping member \"{name}\"")),
            "no warning for {name}:\n{}",
            m.stderr
        );
    }
    assert_eq!(mount_paths(m.path()), set(&["after", "later"]));
    assert_eq!(fs::read(m.join("after")).unwrap(), b"L");
    assert_eq!(
        fs::metadata(m.join("after")).unwrap().ino(),
        fs::metadata(m.join("later")).unwrap().ino()
    );
    util::assert_confined(m.path());
}

#[test]
fn truncated_archives_are_refused_naming_the_archive() {
    let td = TestDir::new("truncated");
    let tar = corpus::small_tar(td.path(), "a.tar", 31);
    let bytes = fs::read(&tar).unwrap();
    let cut = |name: &str, data: &[u8]| -> PathBuf {
        let p = td.join(name);
        fs::write(&p, data).unwrap();
        p
    };
    // Plain tar: inside the second header, inside member data.
    refused(
        &cut("mid-header.tar", &bytes[..512 + 1024 + 100]),
        &td.join("m1"),
        "truncated",
    );
    let big = (bytes.len() / 2) & !511;
    refused(
        &cut("mid-data.tar", &bytes[..big + 100]),
        &td.join("m2"),
        "truncated",
    );
    for comp in [
        Comp::Gzip,
        Comp::ZstdMulti,
        Comp::XzMulti,
        Comp::Bzip2Best,
        Comp::Pbzip2,
    ] {
        let c = fs::read(corpus::compress(&tar, comp)).unwrap();
        let name = format!("half-{comp:?}.{}", comp.ext()).to_lowercase();
        refused(
            &cut(&name, &c[..c.len() / 2]),
            &td.join(format!("m-{comp:?}")),
            "truncated",
        );
    }
}

#[test]
fn corrupt_gzip_is_refused_before_anything_is_served() {
    // A cold mount inflates the whole stream once and checks every member's CRC-32:
    // damage anywhere is found before the mount exists.
    let td = TestDir::new("gzip-corrupt");
    let tar = corpus::small_tar(td.path(), "a.tar", 32);
    let gz = fs::read(corpus::compress(&tar, Comp::Gzip)).unwrap();
    let n = gz.len();
    let mut crc = gz.clone();
    crc[n - 8] ^= 0xff;
    let p = td.join("crc.tar.gz");
    fs::write(&p, &crc).unwrap();
    refused(&p, &td.join("m1"), "incorrect data check");
    let mut mid = gz.clone();
    for b in &mut mid[n / 2..n / 2 + 512] {
        *b = 0xff;
    }
    let p = td.join("mid.tar.gz");
    fs::write(&p, &mid).unwrap();
    refused(&p, &td.join("m2"), "gzip");
}

#[test]
fn zero_byte_and_non_archive_files_are_refused() {
    let td = TestDir::new("not-archives");
    let zero = td.join("zero.tar");
    fs::write(&zero, b"").unwrap();
    refused(&zero, &td.join("m1"), "empty file");
    let text = td.join("notes.txt");
    fs::write(&text, b"just some text, not an archive\n").unwrap();
    refused(&text, &td.join("m2"), "truncated");
    let elf = td.join("binary.tar");
    fs::copy(util::bin(), &elf).unwrap();
    refused(&elf, &td.join("m3"), "binary.tar");
}

/// Runs a python3 script with the mountpoint as argv[1]; returns its stdout.
fn py_in_mount(mnt: &Path, script: &str) -> String {
    util::python(script, [mnt.as_os_str()]).stdout_str()
}

#[test]
fn nesting_4096_deep() {
    let td = TestDir::new("deep4096");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        &format!(
            "tf = open_tar('pax')\nf(tf, '{}leaf', 'deep leaf')\nf(tf, 'top', 't')\ntf.close()\n",
            "d/".repeat(4096)
        ),
    );
    let m = Mount::new(&tar, &td.join("mnt"));
    assert_eq!(mount_paths_shallow(m.path()), set(&["d", "top"]));
    // Paths this deep exceed PATH_MAX: walk down one directory at a time.
    let out = py_in_mount(
        m.path(),
        r#"
import os, sys
os.chdir(os.path.join(sys.argv[1], "d"))
depth = 1
while os.listdir(".") == ["d"]:
    os.chdir("d")
    depth += 1
print(depth, sorted(os.listdir(".")), open("leaf").read())
"#,
    );
    assert_eq!(out.trim(), "4096 ['leaf'] deep leaf");
    assert!(fs::metadata(m.path()).unwrap().is_dir(), "daemon gone");
}

/// Names directly in `dir` (no recursion: for trees too deep to walk by path).
fn mount_paths_shallow(dir: &Path) -> BTreeSet<String> {
    util::list_dir(dir)
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn names_of_64_kib() {
    let td = TestDir::new("name64k");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        r#"
tf = open_tar("pax")
f(tf, "n" * 65536, "one component of 64 KiB")
f(tf, "/".join(["abcdefg"] * 8192) + "/leaf", "a 64 KiB path")
sl(tf, "longlink", "t" * 65536)
f(tf, "ok", "ok")
tf.close()
"#,
    );
    let m = Mount::new(&tar, &td.join("mnt"));
    assert!(
        m.stderr.contains("longer than 255 bytes") && m.stderr.contains("longer than 4095 bytes"),
        "no warnings for the unnameable members:\n{}",
        m.stderr
    );
    assert_eq!(mount_paths_shallow(m.path()), set(&["abcdefg", "ok"]));
    assert_eq!(fs::read(m.join("ok")).unwrap(), b"ok");
    let out = py_in_mount(
        m.path(),
        r#"
import os, sys
os.chdir(os.path.join(sys.argv[1], "abcdefg"))
depth = 1
while os.listdir(".") == ["abcdefg"]:
    os.chdir("abcdefg")
    depth += 1
print(depth, open("leaf").read())
"#,
    );
    assert_eq!(out.trim(), "8192 a 64 KiB path");
    assert!(fs::metadata(m.path()).unwrap().is_dir(), "daemon gone");
}

/// Slow (~1 min): one directory with 1,000,000 entries, written as raw ustar headers
/// into a gzip stream; listed and looked up through the mount.
#[test]
fn slow_one_million_entries_in_one_directory() {
    let td = TestDir::new("million");
    let gz = td.join("million.tar.gz");
    util::python(
        r#"
import sys, zlib
out = open(sys.argv[1], "wb")
z = zlib.compressobj(1, zlib.DEFLATED, 31)
def header(name):
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"00000000000\0"
    h[136:148] = b"13400000000\0"
    h[148:156] = b"        "
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)
buf = []
for i in range(1000000):
    buf.append(header(b"d/f%07d" % i))
    if len(buf) == 4096:
        out.write(z.compress(b"".join(buf)))
        buf = []
out.write(z.compress(b"".join(buf) + bytes(1024)))
out.write(z.flush())
out.close()
"#,
        [gz.as_os_str()],
    );
    let m = Mount::with_args(&gz, &td.join("mnt"), &["--cache-size", "64M"]);
    let out = py_in_mount(
        m.path(),
        r#"
import os, sys
d = os.path.join(sys.argv[1], "d")
n = 0
with os.scandir(d) as it:
    for e in it:
        n += 1
print(n)
for i in (0, 1, 499999, 999999):
    st = os.stat(os.path.join(d, "f%07d" % i))
    assert st.st_size == 0, st
try:
    os.stat(os.path.join(d, "f1000000"))
    print("found a name that is not there")
except FileNotFoundError:
    pass
"#,
    );
    assert_eq!(out.trim(), "1000000");
    assert!(fs::metadata(m.path()).unwrap().is_dir(), "daemon gone");
}

#[test]
fn corrupt_gzip_after_indexing_reads_eio_only_in_the_damaged_span() {
    // The index was built before the damage and still matches the archive's size,
    // mtime and first and last 64 KiB, so it is used. The damaged range inflates to
    // garbage without an inflate error; the seek table's block CRCs catch it.
    damaged_after_indexing(Comp::Gzip);
}

#[test]
fn corrupt_zstd_after_indexing_reads_eio_only_in_the_damaged_frame() {
    // zstd frames written by the zstd tool carry a checksum, checked on decode.
    damaged_after_indexing(Comp::ZstdMulti);
}

#[test]
fn corrupt_xz_block_after_indexing_reads_eio_only_in_the_damaged_block() {
    // Every block decode checks the block's CRC-64 (xz's default check).
    damaged_after_indexing(Comp::XzMulti);
}

#[test]
fn corrupt_bzip2_block_after_indexing_reads_eio_only_in_the_damaged_block() {
    // Every block decode checks the block's CRC.
    damaged_after_indexing(Comp::Bzip2Best);
}

#[test]
fn damaged_xz_index_footer_or_tail_is_refused() {
    // xz's own index is the seek table: it is read from the end of the file and every
    // field is checked (CRC-32s, sizes against the file, header against footer).
    let td = TestDir::new("xz-damaged-index");
    let tar = corpus::small_tar(td.path(), "a.tar", 33);
    let xz = fs::read(corpus::compress(&tar, Comp::XzMulti)).unwrap();
    let n = xz.len();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("footer.tar.xz", flip(&xz, n - 8), "footer"),
        ("footer-magic.tar.xz", flip(&xz, n - 1), "truncated"),
        ("index.tar.xz", flip(&xz, n - 17), "index"),
        (
            "garbage.tar.xz",
            [&xz[..], b"garbage!"].concat(),
            "truncated",
        ),
        ("header.tar.xz", flip(&xz, 7), "xz"),
    ];
    for (i, (name, bytes, why)) in cases.into_iter().enumerate() {
        let p = td.join(name);
        fs::write(&p, bytes).unwrap();
        refused(&p, &td.join(format!("m{i}")), why);
    }
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x41;
    b
}

#[test]
fn garbage_after_a_bzip2_stream_is_ignored_with_a_warning_as_bzip2_does() {
    let td = TestDir::new("bzip2-garbage");
    let tar = corpus::small_tar(td.path(), "a.tar", 34);
    let bz = corpus::compress(&tar, Comp::Bzip2Best);
    let mut bytes = fs::read(&bz).unwrap();
    bytes.extend_from_slice(b"this is not bzip2, just garbage after the stream\n");
    fs::write(&bz, &bytes).unwrap();
    // GNU tar (through bzip2, which warns and ignores it) extracts the file.
    let exp = td.join("x");
    corpus::extract(&bz, &exp);
    let m = Mount::new(&bz, &td.join("mnt"));
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
    assert!(
        m.stderr.contains("trailing garbage"),
        "no warning for the garbage:\n{}",
        m.stderr
    );
    // What starts like another stream is one, and a broken one is refused.
    let mut bytes = fs::read(corpus::compress(&tar, Comp::Bzip2Best)).unwrap();
    bytes.extend_from_slice(b"BZh9 and then garbage");
    let bad = td.join("second.tar.bz2");
    fs::write(&bad, &bytes).unwrap();
    refused(&bad, &td.join("m2"), "bzip2");
}

#[test]
fn hostile_xz_and_bzip2_seek_tables_in_an_index_file_are_rebuilt() {
    // An index file whose seek table lies (its CRCs fixed up, so only `validate` and the
    // table decoders stand in the way) is refused on load and rebuilt, never trusted.
    let td = TestDir::new("hostile-block-tables");
    let tar = corpus::small_tar(td.path(), "a.tar", 35);
    let src = td.join("src-a.tar");
    for (comp, magic) in [
        (Comp::Bzip2Fast, &b"SNBZ2v1\0"[..]),
        (Comp::XzConcat, &b"SNXZ1\0\0\0"[..]),
    ] {
        let arch = corpus::compress(&tar, comp);
        util::snapfs([std::ffi::OsStr::new("index"), arch.as_os_str()]).assert_ok();
        let mut side = arch.clone().into_os_string();
        side.push(".snapfs-idx");
        let side = PathBuf::from(side);
        let good = fs::read(&side).unwrap();
        let at = good
            .windows(magic.len())
            .position(|w| w == magic)
            .expect("seek table magic in the index file");
        // Header: magic, size, streams, count; then the first block's first field.
        let block0 = at + 32;
        let lies: [(usize, u64); 4] = [
            (at + 8, 12345),                     // stream size
            (at + 24, u64::MAX),                 // block count
            (block0, u64::MAX - 3),              // first block's offset (xz) / bit offset (bzip2)
            (block0 + 8, 0x7fff_ffff_ffff_ffff), // unpadded size (xz) / lengths (bzip2)
        ];
        for (k, (field, value)) in lies.into_iter().enumerate() {
            let mut bad = good.clone();
            bad[field..field + 8].copy_from_slice(&value.to_le_bytes());
            assert!(snapfs::index::format::reseal(&mut bad));
            fs::write(&side, &bad).unwrap();
            let m = Mount::new(&arch, &td.join(format!("mnt-{comp:?}-{k}")));
            assert_eq!(fs::read(m.join("readme")).unwrap(), b"seed 35\n");
            assert_eq!(
                fs::read(m.join("d1/f001.dat")).unwrap(),
                fs::read(src.join("d1/f001.dat")).unwrap()
            );
            assert!(!m.stderr.contains("panicked"), "{}", m.stderr);
            drop(m);
            assert_ne!(fs::read(&side).unwrap(), bad, "the lying index was kept");
        }
    }
}

fn damaged_after_indexing(comp: Comp) {
    let td = TestDir::new(&format!("damaged-later-{comp:?}"));
    let src = td.mkdir("src");
    for i in 0..10u64 {
        fs::write(
            src.join(format!("f{i}")),
            util::semi_compressible(600_000, 40 + i),
        )
        .unwrap();
    }
    let tar = td.join("a.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let gz = corpus::compress(&tar, comp);
    util::snapfs([
        std::ffi::OsStr::new("index"),
        std::ffi::OsStr::new("--span"),
        std::ffi::OsStr::new("1M"),
        gz.as_os_str(),
    ])
    .assert_ok();
    let mtime = fs::metadata(&gz).unwrap().modified().unwrap();
    let mut bytes = fs::read(&gz).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 4096].fill(0xff);
    fs::write(&gz, &bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(&gz)
        .unwrap()
        .set_modified(mtime)
        .unwrap();

    let mut m = util::FgMount::start(&gz, &td.join("mnt"), &["--span", "1M"], &[]);
    let (mut good, mut eio) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let name = format!("f{i}");
        match fs::read(m.join(&name)) {
            Ok(got) => {
                assert!(
                    got == fs::read(src.join(&name)).unwrap(),
                    "{name}: wrong bytes served from a damaged archive"
                );
                good.push(name);
            }
            Err(e) => {
                assert_eq!(util::errno(&e), 5, "{name}: {e}");
                eio.push(name);
            }
        }
    }
    assert!(!eio.is_empty(), "the damage went unnoticed");
    assert!(
        good.len() >= 6,
        "too much collateral damage: EIO for {eio:?}"
    );
    assert!(m.alive() && fs::metadata(m.path()).unwrap().is_dir());
    let log = m.log_text();
    for name in &eio {
        assert!(
            log.lines()
                .any(|l| l.contains(gz.file_name().unwrap().to_str().unwrap())
                    && l.contains(&format!("entry \"{name}\""))
                    && (l.contains("corrupt") || l.contains("failed"))),
            "no log line naming the archive and {name}:\n{log}"
        );
    }
}
