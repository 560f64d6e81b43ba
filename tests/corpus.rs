//! Builds archives at test time: a standard source tree archived with GNU tar
//! (gnu/posix, sparse, xattrs) and compressed in several ways, and crafted
//! archives written with python3's tarfile.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, lchown, symlink, FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::util::{self, python, random_bytes, run_ok, semi_compressible, sh};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    /// pigz -b 128: one member, many independently flushed blocks.
    Pigz,
    /// Several gzip members concatenated (cat a.gz b.gz), incl. an empty one.
    GzipConcat,
    ZstdSingle,
    /// Several zstd frames concatenated.
    ZstdMulti,
    /// pzstd -p 2: frames preceded by skippable frames.
    Pzstd,
    /// xz -T2 --block-size=1MiB: one stream of 1 MiB blocks.
    XzMulti,
    /// Plain xz (-T1): one block.
    XzSingle,
    /// Several xz streams concatenated, with stream padding and an empty stream.
    XzConcat,
    /// bzip2 -9: 900 kB blocks in one stream.
    Bzip2Best,
    /// bzip2 -1: 100 kB blocks.
    Bzip2Fast,
    /// pbzip2 -p2: one stream per block.
    Pbzip2,
    /// lbzip2 -n2: one stream, blocks compressed in parallel.
    Lbzip2,
    /// Separately compressed parts concatenated (cat a.bz2 b.bz2).
    Bzip2Concat,
}

impl Comp {
    pub fn ext(self) -> &'static str {
        match self {
            Comp::None => "tar",
            Comp::Gzip | Comp::Pigz | Comp::GzipConcat => "tar.gz",
            Comp::ZstdSingle | Comp::ZstdMulti | Comp::Pzstd => "tar.zst",
            Comp::XzMulti | Comp::XzSingle | Comp::XzConcat => "tar.xz",
            Comp::Bzip2Best | Comp::Bzip2Fast | Comp::Pbzip2 | Comp::Lbzip2 | Comp::Bzip2Concat => {
                "tar.bz2"
            }
        }
    }
}

/// Compresses `tar` next to itself; returns the compressed archive path.
pub fn compress(tar: &Path, comp: Comp) -> PathBuf {
    if comp == Comp::None {
        return tar.to_path_buf();
    }
    let dir = tar.parent().unwrap();
    let stem = tar.file_stem().unwrap().to_string_lossy().into_owned();
    let out = dir.join(format!("{stem}-{comp:?}.{}", comp.ext()).to_lowercase());
    let t = shq(tar);
    let o = shq(&out);
    let chunks = dir.join(format!("{stem}-chunks-{comp:?}"));
    let c = shq(&chunks);
    let script = match comp {
        Comp::None => unreachable!(),
        Comp::Gzip => format!("gzip -6 -c {t} > {o}"),
        Comp::Pigz => format!("pigz -b 128 -p 2 -c {t} > {o}"),
        Comp::GzipConcat => format!(
            "mkdir {c}; split -b 777777 -d -a 4 {t} {c}/p.\n: > {o}\nfirst=1\nfor p in {c}/p.*; do gzip -c \"$p\" >> {o}; if [ $first = 1 ]; then printf '' | gzip -c >> {o}; first=0; fi; done\nrm -r {c}"
        ),
        Comp::ZstdSingle => format!("zstd -q -3 -c {t} > {o}"),
        Comp::ZstdMulti => format!(
            "mkdir {c}; split -b 655360 -d -a 4 {t} {c}/p.\n: > {o}\nfor p in {c}/p.*; do zstd -q -c \"$p\" >> {o}; done\nrm -r {c}"
        ),
        Comp::Pzstd => format!("pzstd -q -p 2 -c {t} > {o} 2>/dev/null"),
        Comp::XzMulti => format!("xz -q -2 -T2 --block-size=1MiB -c {t} > {o}"),
        Comp::XzSingle => format!("xz -q -2 -T1 -c {t} > {o}"),
        Comp::XzConcat => format!(
            "mkdir {c}; split -b 1500000 -d -a 4 {t} {c}/p.\n: > {o}\nfirst=1\nfor p in {c}/p.*; do xz -q -2 -T2 --block-size=512KiB -c \"$p\" >> {o}; if [ $first = 1 ]; then printf '' | xz -q -c >> {o}; printf '\\0\\0\\0\\0\\0\\0\\0\\0' >> {o}; first=0; fi; done\nrm -r {c}"
        ),
        Comp::Bzip2Best => format!("bzip2 -9 -c {t} > {o}"),
        Comp::Bzip2Fast => format!("bzip2 -1 -c {t} > {o}"),
        Comp::Pbzip2 => format!("pbzip2 -9 -p2 -c {t} > {o}"),
        Comp::Lbzip2 => format!("lbzip2 -9 -n2 -c {t} > {o}"),
        Comp::Bzip2Concat => format!(
            "mkdir {c}; split -b 1234567 -d -a 4 {t} {c}/p.\n: > {o}\nfor p in {c}/p.*; do bzip2 -5 -c \"$p\" >> {o}; done\nrm -r {c}"
        ),
    };
    sh(dir, &script);
    out
}

/// Shell-quotes a path.
pub fn shq(p: &Path) -> String {
    let s = p.to_str().expect("test paths are UTF-8");
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// GNU tar create of the *contents* of `src` (members are `./...`).
pub fn gnu_tar(src: &Path, out: &Path, format: &str, extra: &[&str]) {
    run_ok(
        Command::new("tar")
            .arg(format!("--format={format}"))
            .args([
                "--sparse",
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--sort=name",
            ])
            .args(extra)
            .arg("-C")
            .arg(src)
            .arg("-cf")
            .arg(out)
            .arg("."),
    );
}

/// The reference: GNU tar extraction as root. Asserts tar succeeded.
pub fn extract(archive: &Path, dest: &Path) {
    let r = extract_raw(archive, dest);
    r.assert_ok();
}

pub fn extract_raw(archive: &Path, dest: &Path) -> util::Run {
    fs::create_dir_all(dest).unwrap();
    util::run(Command::new("sh").arg("-c").arg(format!(
        "umask 022; exec tar --numeric-owner --xattrs --xattrs-include='*' -xpf {} -C {}",
        shq(archive),
        shq(dest)
    )))
}

/// Member names of a tar as python's tarfile reads them, cleaned like GNU tar
/// does (leading `/` and `./` stripped, `.` components dropped); members with
/// `..` components are left out.
pub fn listed_names(tar: &Path) -> BTreeSet<PathBuf> {
    const SCRIPT: &str = r#"
import sys, tarfile
with tarfile.open(sys.argv[1]) as tf:
    for m in tf:
        sys.stdout.buffer.write(m.name.encode("utf-8", "surrogateescape") + b"\0")
"#;
    let r = python(SCRIPT, [tar.as_os_str()]);
    let mut set = BTreeSet::new();
    for raw in r.stdout.split(|b| *b == 0) {
        if raw.is_empty() {
            continue;
        }
        if let Some(p) = clean(raw) {
            set.insert(p);
        }
    }
    set
}

pub fn clean(raw: &[u8]) -> Option<PathBuf> {
    let p = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => return None,
            _ => {}
        }
    }
    if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    }
}

/// Ancestors of listed paths that are not listed themselves.
pub fn implicit_dirs(listed: &BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
    let mut set = BTreeSet::new();
    for p in listed {
        let mut a = p.parent();
        while let Some(x) = a {
            if x.as_os_str().is_empty() {
                break;
            }
            if !listed.contains(x) {
                set.insert(x.to_path_buf());
            }
            a = x.parent();
        }
    }
    set
}

// ------------------------------------------------------------ python tarfile

/// Helpers available to crafted-archive scripts. The output path is `OUT`.
const PY_PRELUDE: &str = r#"
import tarfile, io, sys, base64
OUT = sys.argv[1]
FMT = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
def open_tar(fmt="pax"):
    return tarfile.open(OUT, "w", format=FMT[fmt], encoding="utf-8", errors="surrogateescape")
def ti(name, type=tarfile.REGTYPE, mode=0o644, mtime=1600000000, uid=0, gid=0, pax=None, **kw):
    t = tarfile.TarInfo(name)
    t.type = type
    t.mode = mode
    t.mtime = mtime
    t.uid = uid
    t.gid = gid
    t.uname = ""
    t.gname = ""
    if pax:
        t.pax_headers = dict(pax)
    for k, v in kw.items():
        setattr(t, k, v)
    return t
def f(tf, name, data=b"", **kw):
    if isinstance(data, str):
        data = data.encode()
    t = ti(name, **kw)
    t.size = len(data)
    tf.addfile(t, io.BytesIO(data))
def d(tf, name, mode=0o755, **kw):
    tf.addfile(ti(name, type=tarfile.DIRTYPE, mode=mode, **kw))
def sl(tf, name, target, **kw):
    kw.setdefault("mode", 0o777)
    tf.addfile(ti(name, type=tarfile.SYMTYPE, linkname=target, **kw))
def hl(tf, name, target, **kw):
    tf.addfile(ti(name, type=tarfile.LNKTYPE, linkname=target, **kw))
def chrdev(tf, name, ma, mi, **kw):
    tf.addfile(ti(name, type=tarfile.CHRTYPE, devmajor=ma, devminor=mi, **kw))
def blkdev(tf, name, ma, mi, **kw):
    tf.addfile(ti(name, type=tarfile.BLKTYPE, devmajor=ma, devminor=mi, **kw))
def fifo(tf, name, **kw):
    tf.addfile(ti(name, type=tarfile.FIFOTYPE, **kw))
"#;

/// Writes a tar at `out` with python3 tarfile; `body` uses the prelude helpers.
pub fn py_tar(out: &Path, body: &str) {
    let script = format!("{PY_PRELUDE}\n{body}\n");
    python(&script, [out.as_os_str()]);
}

// ------------------------------------------------------------ standard tree

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A source tree exercising most entry kinds. Needs root (chown, mknod) and
/// user xattrs on the temp filesystem.
pub fn build_std_tree(src: &Path) {
    fs::create_dir_all(src).unwrap();
    let j = |s: &str| src.join(s);
    // Regular files of awkward sizes.
    write(&j("empty"), b"");
    write(&j("one"), b"x");
    write(&j("block512"), &semi_compressible(512, 1));
    write(&j("block513"), &semi_compressible(513, 2));
    write(&j("text.txt"), b"hello snapfs\n");
    write(&j("data/big1.bin"), &semi_compressible(3 << 20, 3));
    write(&j("data/big2.bin"), &random_bytes((1 << 20) + 12345, 4));
    write(&j("data/zeros.bin"), &vec![0u8; 300_000]);
    write(&j("dir/sub/deeper/file"), b"deep\n");
    fs::create_dir_all(j("dir/emptydir")).unwrap();
    // Symlinks.
    symlink("text.txt", j("sym_rel")).unwrap();
    symlink("nowhere/at/all", j("sym_dangling")).unwrap();
    symlink("/etc/hostname", j("sym_abs")).unwrap();
    symlink("../text.txt", j("dir/sym_up")).unwrap();
    symlink("dir", j("sym_dir")).unwrap();
    // Hardlinks (3 names, across directories).
    write(&j("hl/a"), b"hardlinked content\n");
    fs::hard_link(j("hl/a"), j("hl/b")).unwrap();
    fs::create_dir_all(j("hl/other")).unwrap();
    fs::hard_link(j("hl/a"), j("hl/other/c")).unwrap();
    // Owners.
    write(&j("owned/f"), b"owned\n");
    chown(j("owned/f"), Some(1234), Some(5678)).unwrap();
    fs::create_dir_all(j("owned/d")).unwrap();
    chown(j("owned/d"), Some(4321), Some(8765)).unwrap();
    symlink("f", j("owned/l")).unwrap();
    lchown(j("owned/l"), Some(42), Some(43)).unwrap();
    write(&j("owned/big_uid"), b"big uid\n");
    chown(j("owned/big_uid"), Some(3_000_000), Some(4_000_000)).unwrap();
    // Modes (after chown, which clears setuid).
    write(&j("modes/setuid"), b"#!/bin/sh\n");
    chmod(&j("modes/setuid"), 0o4755);
    write(&j("modes/setgid"), b"sg\n");
    chmod(&j("modes/setgid"), 0o2750);
    write(&j("modes/ro"), b"ro\n");
    chmod(&j("modes/ro"), 0o444);
    write(&j("modes/none"), b"none\n");
    chmod(&j("modes/none"), 0o000);
    fs::create_dir_all(j("modes/sticky")).unwrap();
    chmod(&j("modes/sticky"), 0o1777);
    write(&j("modes/d700/inside"), b"in\n");
    chmod(&j("modes/d700"), 0o700);
    // Special files.
    sh(src, "mkfifo fifo\nmkdir dev\nmknod dev/null_like c 1 3\nmknod dev/blk b 8 1\nmknod dev/bignum c 4000 1000000");
    // Xattrs (user namespace; binary and empty values; on a dir too).
    write(&j("xattr/f"), b"has xattrs\n");
    sh(
        src,
        "setfattr -n user.test -v hello xattr/f\nsetfattr -n user.bin -v 0x00ff10 xattr/f\nsetfattr -n user.empty xattr/f\nsetfattr -n user.dirattr -v d xattr",
    );
    // Unicode and awkward names.
    write(&j("unicode/héllo wörld.txt"), "ünï\n".as_bytes());
    write(&j("unicode/日本語/ファイル.txt"), "日本\n".as_bytes());
    write(&j("unicode/emoji_🦀.txt"), b"crab\n");
    write(&j("weird/new\nline"), b"nl\n");
    write(&j("weird/back\\slash"), b"bs\n");
    write(&j("weird/ spaces "), b"sp\n");
    write(&j("weird/-dash"), b"dash\n");
    write(&j("weird/star*?"), b"glob\n");
    // Many entries in one directory (readdir paging).
    for i in 0..300 {
        write(
            &j(&format!("many/file-with-a-fairly-long-name-{i:05}")),
            format!("{i}\n").as_bytes(),
        );
    }
    // Sparse files.
    {
        let p = j("sparse/s1");
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let f = File::create(&p).unwrap();
        f.set_len(32 << 20).unwrap();
        f.write_all_at(&random_bytes(8192, 5), 0).unwrap();
        f.write_all_at(&random_bytes(4096, 6), 5 << 20).unwrap();
        f.write_all_at(b"not block aligned", (17 << 20) + 1000)
            .unwrap();
        f.write_all_at(&random_bytes(4096, 7), (32 << 20) - 4096)
            .unwrap();
        let h = File::create(j("sparse/all_hole")).unwrap();
        h.set_len(8 << 20).unwrap();
        let t = File::create(j("sparse/hole_then_tail")).unwrap();
        t.set_len(6 << 20).unwrap();
        t.write_all_at(b"tail", (6 << 20) - 4).unwrap();
    }
    // Deterministic mtimes with nanoseconds, symlinks included; dirs last.
    python(
        r#"
import os, sys
root = os.fsencode(sys.argv[1])
items = []
for dp, dns, fns in os.walk(root):
    for n in sorted(dns + fns):
        items.append(os.path.join(dp, n))
items.sort(key=lambda p: -p.count(b"/"))
for i, p in enumerate(items):
    t = (1500000000 + i * 1009) * 10**9 + (i * 123456789) % 10**9
    os.utime(p, ns=(t, t), follow_symlinks=False)
"#,
        [src.as_os_str()],
    );
}

/// Builds `src` tree and archives it: returns (plain tar, archive to mount).
pub fn std_archive(dir: &Path, format: &str, comp: Comp) -> (PathBuf, PathBuf) {
    let src = dir.join("src");
    build_std_tree(&src);
    let tar = dir.join(format!("std-{format}.tar"));
    gnu_tar(&src, &tar, format, &[]);
    let arch = compress(&tar, comp);
    (tar, arch)
}

/// A 9 GiB sparse file with 30 data blocks spread over it (some past 8 GiB).
pub fn build_huge_sparse(src: &Path) -> PathBuf {
    fs::create_dir_all(src).unwrap();
    let p = src.join("huge.img");
    let f = File::create(&p).unwrap();
    let size: u64 = 9 << 30;
    f.set_len(size).unwrap();
    let mut g = util::Lcg::new(99);
    for i in 0..30u64 {
        // Spread offsets, 4 KiB aligned, plus a few fixed ones.
        let off = match i {
            0 => 0,
            1 => (8 << 30) + (4 << 20),
            2 => size - 4096,
            _ => (g.below(size / 4096 - 2)) * 4096,
        };
        let len = 4096 * (1 + g.below(3)) as usize;
        let len = len.min((size - off) as usize);
        f.write_all_at(&random_bytes(len, 1000 + i), off).unwrap();
    }
    f.write_all_at(b"unaligned", (3 << 30) + 77).unwrap();
    drop(f);
    // A normal file next to it.
    write(&src.join("small"), b"small file next to a huge one\n");
    p
}

/// A small tree: dirs, ~40 files, a symlink, a hardlink, an xattr.
pub fn build_small_tree(src: &Path, seed: u64) {
    fs::create_dir_all(src).unwrap();
    for i in 0..40u64 {
        let p = src.join(format!("d{}/f{i:03}.dat", i % 5));
        write(
            &p,
            &semi_compressible(1000 + (i as usize * 997) % 20000, seed * 100 + i),
        );
    }
    write(&src.join("readme"), format!("seed {seed}\n").as_bytes());
    symlink("readme", src.join("link")).unwrap();
    fs::hard_link(src.join("readme"), src.join("hard")).unwrap();
    sh(src, "setfattr -n user.small -v tree readme");
    fs::create_dir_all(src.join("emptydir")).unwrap();
}

/// Small tree archived as posix tar at `dir/name`.
pub fn small_tar(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let src = dir.join(format!("src-{name}"));
    build_small_tree(&src, seed);
    let tar = dir.join(name);
    gnu_tar(&src, &tar, "posix", &[]);
    tar
}

pub struct Case {
    // Field order matters: the mount is dropped before the temp dir.
    pub m: util::Mount,
    pub tar: PathBuf,
    pub exp: PathBuf,
    pub td: util::TestDir,
}

/// Crafted archive (python tarfile `body`) → tar -x (must succeed) → mount →
/// tree comparison (implicit dirs derived from the member list).
pub fn crafted_case(name: &str, body: &str) -> Case {
    crafted_case_skip_times(name, body, &[])
}

/// Like `crafted_case`, but owner/mtime of `tar_quirk_dirs` are not compared:
/// GNU tar itself leaves them at extraction time in some cases (it restores
/// a directory's times, then modifies the directory again when it creates
/// delayed symlinks or meets a differently spelled path of the same dir).
/// Callers assert those attributes explicitly.
pub fn crafted_case_skip_times(name: &str, body: &str, tar_quirk_dirs: &[&str]) -> Case {
    let td = util::TestDir::new(name);
    let tar = td.join("a.tar");
    py_tar(&tar, body);
    let exp = td.join("x");
    extract(&tar, &exp);
    let mut implicit = implicit_dirs(&listed_names(&tar));
    implicit.extend(tar_quirk_dirs.iter().map(PathBuf::from));
    let m = util::Mount::new(&tar, &td.join("mnt"));
    crate::tree::assert_same_tree(
        &exp,
        m.path(),
        &crate::tree::CmpOpts::with_implicit(implicit),
    );
    Case { m, tar, exp, td }
}
