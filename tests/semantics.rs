//! GNU-tar extraction semantics on crafted archives (python tarfile): long
//! names, hardlinks, duplicates, implicit dirs, times, modes, devices,
//! xattrs, sparse seeking, EROFS, empty and very large archives.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::corpus::{self, crafted_case, Comp};
use crate::tree::{self, major, minor, CmpOpts, WalkOpts};
use crate::util::{self, errno, Mount, TestDir};

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .ino()
}

#[test]
fn pax_long_names_and_link_targets() {
    let long_dir = format!(
        "{}/{}/{}",
        "a".repeat(100),
        "b".repeat(100),
        "c".repeat(100)
    );
    let body = format!(
        r#"
tf = open_tar("pax")
f(tf, "{long_dir}/file-in-a-long-path", "long path content")
f(tf, "{c255}", "255-byte name")
sl(tf, "longlink", "{target}")
hl(tf, "hard-to-long", "{long_dir}/file-in-a-long-path")
sl(tf, "{long_dir}/link-in-long-dir", "../../../{c255}")
tf.close()
"#,
        c255 = "z".repeat(255),
        target = "t/".repeat(175) + "end"
    );
    let c = crafted_case("pax-long", &body);
    let p = c.m.join(&long_dir).join("file-in-a-long-path");
    assert_eq!(read(&p), b"long path content");
    assert_eq!(ino(&p), ino(&c.m.join("hard-to-long")));
    let t = fs::read_link(c.m.join("longlink")).unwrap();
    assert_eq!(t.as_os_str().len(), 353);
    assert_eq!(read(&c.m.join("z".repeat(255))), b"255-byte name");
}

#[test]
fn gnu_longname_longlink_and_base256() {
    let long_dir = format!("{}/{}", "g".repeat(120), "h".repeat(120));
    let body = format!(
        r#"
tf = open_tar("gnu")
d(tf, "{long_dir}", mode=0o750)
f(tf, "{long_dir}/gnu-long-file", "gnu long", uid=3000000, gid=4000000)
sl(tf, "gnu-longlink", "{target}")
f(tf, "future", "future mtime", mtime=10**10 + 7)
f(tf, "bad\udcffname", "non-utf8 name")
tf.close()
"#,
        target = "x".repeat(200)
    );
    let c = crafted_case("gnu-long", &body);
    let md = fs::metadata(c.m.join(&long_dir).join("gnu-long-file")).unwrap();
    assert_eq!((md.uid(), md.gid()), (3000000, 4000000));
    assert_eq!(
        fs::symlink_metadata(c.m.join("future")).unwrap().mtime(),
        10_000_000_007
    );
    assert_eq!(read(&c.m.join(util::os(b"bad\xffname"))), b"non-utf8 name");
}

#[test]
fn hardlinks_share_inode_and_count() {
    let c = crafted_case(
        "hardlinks",
        r#"
tf = open_tar("pax")
f(tf, "a", "shared content\n", mode=0o640, uid=5, gid=6)
hl(tf, "h1", "a")
hl(tf, "h2", "h1")
d(tf, "sub")
hl(tf, "sub/h3", "a")
f(tf, "lonely", "not linked\n")
tf.close()
"#,
    );
    let names = ["a", "h1", "h2", "sub/h3"];
    let i0 = ino(&c.m.join("a"));
    for n in names {
        let md = fs::symlink_metadata(c.m.join(n)).unwrap();
        assert_eq!(md.ino(), i0, "{n} should share a's inode");
        assert_eq!(md.nlink(), 4, "{n} nlink");
        assert_eq!(read(&c.m.join(n)), b"shared content\n");
    }
    assert_eq!(fs::metadata(c.m.join("lonely")).unwrap().nlink(), 1);
    assert_ne!(ino(&c.m.join("lonely")), i0);
}

#[test]
fn hardlink_whose_target_is_overwritten_later() {
    // tar -x: `ht` links to the first `t`; the second `t` replaces only `t`.
    let c = crafted_case(
        "hl-overwritten",
        r#"
tf = open_tar("pax")
f(tf, "t", "one")
hl(tf, "ht", "t")
f(tf, "t", "two, longer")
tf.close()
"#,
    );
    assert_eq!(read(&c.m.join("ht")), b"one");
    assert_eq!(read(&c.m.join("t")), b"two, longer");
    assert_eq!(fs::metadata(c.m.join("ht")).unwrap().nlink(), 1);
    assert_eq!(fs::metadata(c.m.join("t")).unwrap().nlink(), 1);
    assert_ne!(ino(&c.m.join("t")), ino(&c.m.join("ht")));
}

#[test]
fn duplicates_last_wins() {
    let c = crafted_case(
        "duplicates",
        r#"
tf = open_tar("pax")
f(tf, "dup", "first version", mode=0o600, mtime=1000000000)
f(tf, "dup", "second, longer version", mode=0o644, mtime=1000000100)
f(tf, "fd", "a file that becomes a dir")
d(tf, "fd", mode=0o711)
f(tf, "fd/inner", "inner")
d(tf, "df", mode=0o700)
f(tf, "df", "an empty dir that becomes a file")
sl(tf, "sf", "somewhere")
f(tf, "sf", "symlink replaced by a file")
d(tf, "twice", mode=0o700, mtime=1100000000)
d(tf, "twice", mode=0o750, mtime=1200000000)
tf.close()
"#,
    );
    assert_eq!(read(&c.m.join("dup")), b"second, longer version");
    assert!(fs::symlink_metadata(c.m.join("fd")).unwrap().is_dir());
    assert_eq!(read(&c.m.join("fd/inner")), b"inner");
    assert!(fs::symlink_metadata(c.m.join("df")).unwrap().is_file());
    assert!(fs::symlink_metadata(c.m.join("sf")).unwrap().is_file());
    let tw = fs::symlink_metadata(c.m.join("twice")).unwrap();
    assert_eq!((tw.mode() & 0o7777, tw.mtime()), (0o750, 1200000000));
}

#[test]
fn directory_listed_after_its_children() {
    let c = crafted_case(
        "dir-late",
        r#"
tf = open_tar("pax")
f(tf, "late/child", "c")
f(tf, "late/sub/x", "x")
d(tf, "late", mode=0o710, mtime=1111111111, uid=7, gid=8, pax={"mtime": "1111111111.5"})
tf.close()
"#,
    );
    let md = fs::symlink_metadata(c.m.join("late")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o710);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1111111111, 500_000_000));
    assert_eq!((md.uid(), md.gid()), (7, 8));
    // late/sub is implicit: mode 0755.
    assert_eq!(
        fs::symlink_metadata(c.m.join("late/sub")).unwrap().mode() & 0o7777,
        0o755
    );
}

#[test]
fn dot_prefixes_and_trailing_slashes() {
    let c = corpus::crafted_case_skip_times(
        "prefixes",
        r#"
tf = open_tar("gnu")
d(tf, "./pre/", mode=0o751)
f(tf, "./pre/a", "a")
f(tf, "pre//b", "b")
f(tf, "pre/./c", "c")
d(tf, "./././pre/d/", mode=0o701)
f(tf, "./pre/d/e", "e")
tf.close()
"#,
        &["pre", "pre/d"],
    );
    assert_eq!(
        fs::symlink_metadata(c.m.join("pre")).unwrap().mtime(),
        1600000000
    );
    assert_eq!(
        util::list_dir(&c.m.join("pre")),
        ["a", "b", "c", "d"].map(std::ffi::OsString::from).to_vec()
    );
    assert_eq!(
        util::list_dir(c.m.path()),
        vec![std::ffi::OsString::from("pre")]
    );
    assert_eq!(
        fs::symlink_metadata(c.m.join("pre/d")).unwrap().mode() & 0o7777,
        0o701
    );
}

#[test]
fn mtime_nanoseconds_and_extremes() {
    let c = crafted_case(
        "mtimes",
        r#"
tf = open_tar("pax")
f(tf, "ns", "ns", pax={"mtime": "1700000000.123456789"})
f(tf, "half", "half", pax={"mtime": "1700000000.5"})
d(tf, "nsdir", pax={"mtime": "1600000000.000000001"})
sl(tf, "nslink", "ns", pax={"mtime": "1650000000.987654321"})
f(tf, "old", "before 1970", pax={"mtime": "-86400.25"})
f(tf, "zero", "epoch", mtime=0)
f(tf, "future", "year 2300", pax={"mtime": "10413792000.1"})
tf.close()
"#,
    );
    let t = |n: &str| {
        let md = fs::symlink_metadata(c.m.join(n)).unwrap();
        (md.mtime(), md.mtime_nsec())
    };
    assert_eq!(t("ns"), (1700000000, 123456789));
    assert_eq!(t("half"), (1700000000, 500000000));
    assert_eq!(t("nsdir"), (1600000000, 1));
    assert_eq!(t("nslink"), (1650000000, 987654321));
    assert_eq!(t("zero"), (0, 0));
    assert_eq!(t("future"), (10413792000, 100000000));
}

#[test]
fn devices_fifos_and_special_modes() {
    let c = crafted_case(
        "special",
        r#"
tf = open_tar("pax")
chrdev(tf, "dev/null_like", 1, 3, mode=0o666)
blkdev(tf, "dev/sda1_like", 8, 1, mode=0o660, gid=6)
chrdev(tf, "dev/big", 4095, 1048575, mode=0o600)
fifo(tf, "dev/fifo", mode=0o620)
f(tf, "suid", "x", mode=0o4755)
f(tf, "sgid", "x", mode=0o2711)
f(tf, "all", "x", mode=0o7777)
d(tf, "sticky", mode=0o1777)
f(tf, "none", "x", mode=0)
tf.close()
"#,
    );
    let md = fs::symlink_metadata(c.m.join("dev/null_like")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!((major(md.rdev()), minor(md.rdev())), (1, 3));
    let md = fs::symlink_metadata(c.m.join("dev/sda1_like")).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!((major(md.rdev()), minor(md.rdev())), (8, 1));
    let md = fs::symlink_metadata(c.m.join("dev/big")).unwrap();
    assert_eq!((major(md.rdev()), minor(md.rdev())), (4095, 1048575));
    assert!(fs::symlink_metadata(c.m.join("dev/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::symlink_metadata(c.m.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::symlink_metadata(c.m.join("all")).unwrap().mode() & 0o7777,
        0o7777
    );
    assert_eq!(
        fs::symlink_metadata(c.m.join("sticky")).unwrap().mode() & 0o7777,
        0o1777
    );
}

fn xattrs_of(p: &Path) -> Vec<(String, Vec<u8>)> {
    let r = util::python(
        r#"
import os, sys
p = sys.argv[1]
for n in sorted(os.listxattr(p, follow_symlinks=False)):
    print(n.encode("utf-8", "surrogateescape").hex(), os.getxattr(p, n, follow_symlinks=False).hex())
"#,
        [p.as_os_str()],
    );
    r.stdout_str()
        .lines()
        .map(|l| {
            let (n, v) = l.split_once(' ').unwrap();
            (String::from_utf8(util::unhex(n)).unwrap(), util::unhex(v))
        })
        .collect()
}

#[test]
fn pax_schily_xattrs() {
    let c = crafted_case(
        "schily",
        r#"
tf = open_tar("pax")
f(tf, "x", "xattrs here", pax={"SCHILY.xattr.user.alpha": "beta", "SCHILY.xattr.user.spaced name": "v=1 =2", "SCHILY.xattr.user.empty": ""})
d(tf, "xd", pax={"SCHILY.xattr.user.ondir": "dirvalue"})
f(tf, "plain", "no xattrs")
tf.close()
"#,
    );
    let x = xattrs_of(&c.m.join("x"));
    assert_eq!(
        x,
        vec![
            ("user.alpha".to_string(), b"beta".to_vec()),
            ("user.empty".to_string(), b"".to_vec()),
            ("user.spaced name".to_string(), b"v=1 =2".to_vec()),
        ]
    );
    assert_eq!(
        xattrs_of(&c.m.join("xd")),
        vec![("user.ondir".to_string(), b"dirvalue".to_vec())]
    );
    assert!(xattrs_of(&c.m.join("plain")).is_empty());
    // getfattr agrees (a second, independent reader).
    let g = util::run_ok(
        Command::new("getfattr")
            .args(["-d", "-m", "-", "--absolute-names", "-e", "hex"])
            .arg(c.m.join("x")),
    );
    assert!(
        g.stdout_str().contains("user.alpha=0x62657461"),
        "getfattr output: {}",
        g.stdout_str()
    );
}

#[test]
fn pax_record_values_with_newlines() {
    // PAX records are length-prefixed; a value may contain '\n'.
    let c = crafted_case(
        "pax-newline",
        r#"
tf = open_tar("pax")
f(tf, "nl", "newline in a pax value", pax={"SCHILY.xattr.user.multi": "line1\nline2\n", "comment": "a\nb"})
sl(tf, "nl-link", "target\nwith newline")
tf.close()
"#,
    );
    assert_eq!(
        xattrs_of(&c.m.join("nl")),
        vec![("user.multi".to_string(), b"line1\nline2\n".to_vec())]
    );
    assert_eq!(
        fs::read_link(c.m.join("nl-link")).unwrap(),
        Path::new("target\nwith newline")
    );
}

#[test]
fn libarchive_xattrs() {
    // LIBARCHIVE.xattr.<url-encoded name>=<base64 value>. GNU tar does not
    // read these, so the expectation is explicit.
    let td = TestDir::new("libarchive-xattr");
    let tar = td.join("a.tar");
    corpus::py_tar(
        &tar,
        r#"
tf = open_tar("pax")
b64 = lambda b: base64.b64encode(b).decode()
f(tf, "la", "libarchive style", pax={
    "LIBARCHIVE.xattr.user.lib%20attr": b64(b"hello world"),
    "LIBARCHIVE.xattr.user.bin": b64(bytes([0, 255, 16])),
    "LIBARCHIVE.xattr.user.pct%25": b64(b"abc"),
})
f(tf, "plain", "none")
tf.close()
"#,
    );
    let m = Mount::new(&tar, &td.join("mnt"));
    assert_eq!(
        xattrs_of(&m.join("la")),
        vec![
            ("user.bin".to_string(), vec![0, 255, 16]),
            ("user.lib attr".to_string(), b"hello world".to_vec()),
            ("user.pct%".to_string(), b"abc".to_vec()),
        ]
    );
    assert_eq!(read(&m.join("la")), b"libarchive style");
    assert!(xattrs_of(&m.join("plain")).is_empty());
}

#[test]
fn unicode_names() {
    let c = crafted_case(
        "unicode",
        r#"
tf = open_tar("pax")
f(tf, "héllo wörld.txt", "e")
f(tf, "日本語/ファイル.txt", "j")
f(tf, "emoji_🦀/🦀.txt", "crab")
f(tf, "ünïcödé/" + "é" * 120, "long utf-8 name (240 bytes)")
sl(tf, "lien", "日本語/ファイル.txt")
tf.close()
"#,
    );
    assert_eq!(read(&c.m.join("日本語/ファイル.txt")), b"j");
    assert_eq!(read(&c.m.join("lien")), b"j");
    assert_eq!(read(&c.m.join("emoji_🦀/🦀.txt")), b"crab");
}

#[test]
fn implicit_parent_directories() {
    let c = crafted_case(
        "implicit",
        r#"
tf = open_tar("ustar")
f(tf, "a/b/c/file", "deep", uid=12, gid=34)
f(tf, "a/other", "o")
sl(tf, "x/y/link", "../../a/other")
tf.close()
"#,
    );
    for d in ["a", "a/b", "a/b/c", "x", "x/y"] {
        let md = fs::symlink_metadata(c.m.join(d)).unwrap();
        assert!(md.is_dir(), "{d} should be an implicit directory");
        assert_eq!(md.mode() & 0o7777, 0o755, "{d} implicit mode");
    }
    assert_eq!(read(&c.m.join("x/y/link")), b"o");
}

#[test]
fn directory_nlink_counts_subdirs() {
    let c = crafted_case(
        "dir-nlink",
        r#"
tf = open_tar("pax")
d(tf, "p")
d(tf, "p/s1")
d(tf, "p/s2")
f(tf, "p/file", "f")
f(tf, "q/r/implicit", "i")
tf.close()
"#,
    );
    let e = tree::walk(&c.exp, &WalkOpts::listing());
    let a = tree::walk(c.m.path(), &WalkOpts::listing());
    let d = tree::compare(
        &e,
        &a,
        &CmpOpts {
            dir_nlink: true,
            implicit: corpus::implicit_dirs(&corpus::listed_names(&c.tar)),
            ..Default::default()
        },
    );
    tree::assert_no_diff("directory nlink (2 + subdirs, as on disk)", &d);
    assert_eq!(fs::metadata(c.m.join("p")).unwrap().nlink(), 4);
}

#[test]
fn large_directory_readdir() {
    // 5000 entries with long names need many readdir buffers.
    let c = crafted_case(
        "bigdir",
        r#"
tf = open_tar("pax")
for i in range(5000):
    f(tf, "big/entry-with-a-rather-long-name-to-fill-readdir-buffers-%05d" % i, "%d" % i)
tf.close()
"#,
    );
    let names = util::list_dir(&c.m.join("big"));
    assert_eq!(names.len(), 5000);
    let set: BTreeSet<_> = names.iter().collect();
    assert_eq!(set.len(), 5000, "readdir returned duplicates");
    assert_eq!(
        read(&c.m.join("big/entry-with-a-rather-long-name-to-fill-readdir-buffers-04321")),
        b"4321"
    );
}

#[test]
fn sparse_seek_data_and_hole() {
    let td = TestDir::new("sparse-seek");
    let (tar, _) = corpus::std_archive(td.path(), "posix", Comp::None);
    let m = Mount::new(&tar, &td.join("mnt"));
    // Probe lseek semantics directly: (whence, offset) -> result or -errno.
    let probe = |p: &Path, probes: &[(&str, u64)]| -> Vec<i64> {
        let args: Vec<String> = probes.iter().map(|(w, o)| format!("{w}:{o}")).collect();
        let r = util::python(
            r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for a in sys.argv[2:]:
    w, o = a.split(":")
    try:
        print(os.lseek(fd, int(o), os.SEEK_DATA if w == "D" else os.SEEK_HOLE))
    except OSError as e:
        print(-e.errno)
"#,
            std::iter::once(p.as_os_str().to_owned()).chain(args.iter().map(|s| s.into())),
        );
        r.stdout_str().lines().map(|l| l.parse().unwrap()).collect()
    };
    let mib = 1u64 << 20;
    let enxio = -(util::ENXIO as i64);
    // s1: data [0,8K), [5M,5M+4K), around 17M+1000, [32M-4K,32M).
    let s1 = m.join("sparse/s1");
    let got = probe(
        &s1,
        &[
            ("D", 0),
            ("H", 0),
            ("D", 8192),
            ("H", 5 * mib),
            ("D", 32 * mib - 1),
            ("H", 32 * mib - 4096),
            ("D", 32 * mib),
        ],
    );
    assert_eq!(got[0], 0, "SEEK_DATA(0)");
    assert_eq!(got[1], 8192, "SEEK_HOLE(0)");
    assert_eq!(got[2], (5 * mib) as i64, "SEEK_DATA(8192)");
    assert_eq!(got[3], (5 * mib + 4096) as i64, "SEEK_HOLE(5M)");
    assert_eq!(got[4], (32 * mib - 1) as i64, "SEEK_DATA(size-1)");
    assert_eq!(got[5], (32 * mib) as i64, "SEEK_HOLE(size-4096)");
    assert_eq!(got[6], enxio, "SEEK_DATA(size) must be ENXIO");
    let hole = m.join("sparse/all_hole");
    assert_eq!(
        probe(&hole, &[("D", 0), ("H", 0), ("H", 100)]),
        vec![enxio, 0, 100]
    );
    let tail = m.join("sparse/hole_then_tail");
    assert_eq!(probe(&tail, &[("D", 0)]), vec![(6 * mib - 4096) as i64]);
    // Blocks and holes read as zeros.
    let md = fs::metadata(&s1).unwrap();
    assert!(
        md.blocks() * 512 <= 64 * 1024,
        "st_blocks {} for a file with ~20 KiB of data",
        md.blocks()
    );
    assert_eq!(
        fs::metadata(&hole).unwrap().blocks(),
        0,
        "all-hole file should use no blocks"
    );
    let all = read(&hole);
    assert!(all.len() == 8 << 20 && all.iter().all(|b| *b == 0));
}

// ------------------------------------------------------------ read-only

#[test]
fn modifying_calls_fail_with_erofs() {
    let td = TestDir::new("erofs");
    let tar = corpus::small_tar(td.path(), "a.tar", 1);
    let m = Mount::new(&tar, &td.join("mnt"));
    let existing = m.join("readme");
    let before = read(&existing);
    let mut bad = Vec::new();
    let mut expect = |what: &str, r: std::io::Result<()>| match r {
        Err(e) if errno(&e) == util::EROFS => {}
        Err(e) => bad.push(format!("{what}: {e} (want EROFS)")),
        Ok(()) => bad.push(format!("{what}: succeeded (want EROFS)")),
    };
    expect("create", File::create(m.join("newfile")).map(|_| ()));
    expect("mkdir", fs::create_dir(m.join("newdir")));
    expect("unlink", fs::remove_file(&existing));
    expect("rmdir", fs::remove_dir(m.join("emptydir")));
    expect(
        "chmod",
        fs::set_permissions(&existing, fs::Permissions::from_mode(0o600)),
    );
    expect(
        "chown",
        std::os::unix::fs::chown(&existing, Some(1), Some(1)),
    );
    expect(
        "open for write",
        OpenOptions::new().write(true).open(&existing).map(|_| ()),
    );
    expect(
        "open for append",
        OpenOptions::new().append(true).open(&existing).map(|_| ()),
    );
    expect(
        "open with O_TRUNC",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&existing)
            .map(|_| ()),
    );
    expect("rename", fs::rename(&existing, m.join("renamed")));
    expect(
        "symlink",
        std::os::unix::fs::symlink("x", m.join("newlink")),
    );
    expect("hard link", fs::hard_link(&existing, m.join("newhard")));
    let ex = existing.as_os_str();
    let touched = m.join("touched");
    let cmds: Vec<(&str, &str, Vec<&std::ffi::OsStr>)> = vec![
        ("touch existing", "touch", vec![ex]),
        ("touch new", "touch", vec![touched.as_os_str()]),
        (
            "setfattr",
            "setfattr",
            vec![
                "-n".as_ref(),
                "user.new".as_ref(),
                "-v".as_ref(),
                "1".as_ref(),
                ex,
            ],
        ),
        (
            "truncate",
            "truncate",
            vec!["-s".as_ref(), "0".as_ref(), ex],
        ),
    ];
    for (what, prog, args) in cmds {
        let r = util::run(Command::new(prog).args(args));
        if r.ok() || !r.stderr_str().contains("Read-only file system") {
            bad.push(format!(
                "{what}: status {} stderr {:?} (want 'Read-only file system')",
                r.status,
                r.stderr_str()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "modifying calls that did not fail with EROFS:\n{}",
        bad.join("\n")
    );
    assert_eq!(read(&existing), before);
    let mi = util::mount_at(m.path()).unwrap();
    assert!(
        mi.mount_opts.split(',').any(|o| o == "ro"),
        "mount options {:?} lack ro",
        mi.mount_opts
    );
    assert!(mi.fstype.starts_with("fuse"), "fstype {}", mi.fstype);
    let r = util::python(
        "import os,sys; print(os.statvfs(sys.argv[1]).f_flag & os.ST_RDONLY)",
        [m.path().as_os_str()],
    );
    assert_eq!(r.stdout_str().trim(), "1", "statvfs lacks ST_RDONLY");
}

// ------------------------------------------------------------ empty / huge

fn assert_mounts_empty(name: &str, make: &str) {
    let td = TestDir::new(name);
    util::sh(td.path(), make);
    let arch = fs::read_dir(td.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file())
        .unwrap();
    let m = Mount::new(&arch, &td.join("mnt"));
    let md = fs::metadata(m.path()).unwrap();
    assert!(md.is_dir());
    assert!(
        util::list_dir(m.path()).is_empty(),
        "empty archive should mount as an empty dir"
    );
}

#[test]
fn empty_archive_1024_zero_bytes() {
    assert_mounts_empty("empty-1024", "head -c 1024 /dev/zero > e.tar");
}

#[test]
fn empty_archive_gnu_tar_no_members() {
    assert_mounts_empty("empty-gnu", "tar -cf e.tar -T /dev/null");
}

#[test]
fn empty_archive_gzip() {
    assert_mounts_empty("empty-gz", "tar -cf - -T /dev/null | gzip -c > e.tar.gz");
}

#[test]
fn empty_archive_zstd() {
    assert_mounts_empty(
        "empty-zst",
        "tar -cf - -T /dev/null | zstd -q -c > e.tar.zst",
    );
}

#[test]
fn hundred_thousand_entries() {
    // slow
    let td = TestDir::new("100k");
    let tar = td.join("big.tar");
    corpus::py_tar(
        &tar,
        r#"
tf = open_tar("gnu")
for i in range(100000):
    data = b"file %d\n" % i
    f(tf, "d%03d/f%05d" % (i // 100, i), data, mtime=1600000000 + i)
tf.close()
"#,
    );
    let m = Mount::new(&tar, &td.join("mnt"));
    let t = tree::walk(m.path(), &WalkOpts::listing());
    assert!(
        t.problems.is_empty(),
        "walk problems: {:?}",
        &t.problems[..t.problems.len().min(20)]
    );
    let files = t
        .entries
        .values()
        .filter(|e| e.kind == tree::Kind::File)
        .count();
    let dirs = t
        .entries
        .values()
        .filter(|e| e.kind == tree::Kind::Dir)
        .count();
    assert_eq!((files, dirs), (100000, 1000));
    for i in [0u64, 1, 4242, 55555, 99999] {
        let p: PathBuf = m.join(format!("d{:03}/f{i:05}", i / 100));
        let md = fs::metadata(&p).unwrap();
        assert_eq!(md.mtime(), 1600000000 + i as i64);
        assert_eq!(read(&p), format!("file {i}\n").as_bytes());
    }
    assert!(fs::metadata(m.join("d999/f12345")).is_err());
}

#[test]
fn lookup_and_read_errors() {
    let td = TestDir::new("errors");
    let tar = corpus::small_tar(td.path(), "a.tar", 21);
    let m = Mount::new(&tar, &td.join("mnt"));
    let e = fs::metadata(m.join("no-such-file")).unwrap_err();
    assert_eq!(errno(&e), util::ENOENT);
    let e = fs::metadata(m.join("readme/below-a-file")).unwrap_err();
    assert_eq!(errno(&e), 20, "ENOTDIR expected, got {e}");
    let e = fs::read(m.join("d0")).unwrap_err();
    assert_eq!(errno(&e), 21, "EISDIR expected, got {e}");
    let r = util::python(
        r#"
import os, sys
try:
    os.getxattr(os.path.join(sys.argv[1], "readme"), "user.nope")
    print("ok")
except OSError as e:
    print(e.errno)
print(os.getxattr(os.path.join(sys.argv[1], "readme"), "user.small").decode())
"#,
        [m.path().as_os_str()],
    );
    assert_eq!(
        r.stdout_str(),
        "61\ntree\n",
        "missing xattr should be ENODATA; existing one readable"
    );
    // Reading at and past EOF.
    let f = File::open(m.join("readme")).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        std::os::unix::fs::FileExt::read_at(&f, &mut buf, 7).unwrap(),
        1
    );
    assert_eq!(
        std::os::unix::fs::FileExt::read_at(&f, &mut buf, 1 << 40).unwrap(),
        0
    );
}
