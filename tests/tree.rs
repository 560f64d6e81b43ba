//! Walks two trees (a snapfs mount and GNU tar's extraction of the same
//! archive) and compares every entry. Produces a readable diff listing.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::util::{self, merge_ranges, seek_ranges, sha256_file, unhex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

pub fn kind_of(ft: &std::fs::FileType) -> Kind {
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        Kind::Char
    } else if ft.is_block_device() {
        Kind::Block
    } else {
        Kind::Socket
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub nlink: u64,
    pub rdev: u64,
    pub ino: u64,
    pub blocks: u64,
    pub target: Option<Vec<u8>>,
    pub sha: Option<String>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

pub struct Tree {
    pub root: PathBuf,
    pub entries: BTreeMap<PathBuf, Entry>,
    /// Errors met while walking (read errors, d_type mismatches, duplicates).
    pub problems: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct WalkOpts {
    /// Hash regular files (those not larger than `big`).
    pub content: bool,
    /// Collect xattrs.
    pub xattrs: bool,
    /// Files larger than this are compared range-wise (sparse aware), not hashed.
    pub big: u64,
}

impl Default for WalkOpts {
    fn default() -> Self {
        WalkOpts {
            content: true,
            xattrs: true,
            big: 4 << 20,
        }
    }
}

impl WalkOpts {
    /// Metadata only: no content reads, no xattrs.
    pub fn listing() -> Self {
        WalkOpts {
            content: false,
            xattrs: false,
            big: u64::MAX,
        }
    }
}

pub fn walk(root: &Path, o: &WalkOpts) -> Tree {
    let mut t = Tree {
        root: root.to_path_buf(),
        entries: BTreeMap::new(),
        problems: Vec::new(),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                t.problems
                    .push(format!("{}: read_dir failed: {e}", show(&rel)));
                continue;
            }
        };
        let mut seen = BTreeSet::new();
        for de in rd {
            let de = match de {
                Ok(d) => d,
                Err(e) => {
                    t.problems
                        .push(format!("{}: readdir entry error: {e}", show(&rel)));
                    continue;
                }
            };
            let name = de.file_name();
            let r = rel.join(&name);
            if !seen.insert(name.clone()) {
                t.problems
                    .push(format!("{}: listed twice by readdir", show(&r)));
                continue;
            }
            let p = root.join(&r);
            let md = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) => {
                    t.problems.push(format!("{}: lstat failed: {e}", show(&r)));
                    continue;
                }
            };
            let kind = kind_of(&md.file_type());
            if let Ok(dt) = de.file_type() {
                let dk = kind_of(&dt);
                if dk != kind {
                    t.problems.push(format!(
                        "{}: readdir type {dk:?} but lstat type {kind:?}",
                        show(&r)
                    ));
                }
            }
            let target = if kind == Kind::Symlink {
                match std::fs::read_link(&p) {
                    Ok(l) => Some(l.as_os_str().as_bytes().to_vec()),
                    Err(e) => {
                        t.problems
                            .push(format!("{}: readlink failed: {e}", show(&r)));
                        None
                    }
                }
            } else {
                None
            };
            let sha = if o.content && kind == Kind::File && md.size() <= o.big {
                match sha256_file(&p) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        t.problems.push(format!("{}: read failed: {e}", show(&r)));
                        None
                    }
                }
            } else {
                None
            };
            if kind == Kind::Dir {
                stack.push(r.clone());
            }
            t.entries.insert(
                r,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    size: md.size(),
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime: md.mtime(),
                    mtime_nsec: md.mtime_nsec(),
                    nlink: md.nlink(),
                    rdev: md.rdev(),
                    ino: md.ino(),
                    blocks: md.blocks(),
                    target,
                    sha,
                    xattrs: BTreeMap::new(),
                },
            );
        }
    }
    if o.xattrs {
        collect_xattrs(&mut t);
    }
    t
}

const XATTR_SCRIPT: &str = r#"
import os, sys
root = os.fsencode(sys.argv[1])
def emit(rel, p):
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError as e:
        if e.errno in (95, 61):
            return
        print("ERR", rel.hex(), "-", e.errno)
        return
    for n in names:
        nb = n.encode("utf-8", "surrogateescape")
        try:
            v = os.getxattr(p, n, follow_symlinks=False)
        except OSError as e:
            print("ERR", rel.hex(), nb.hex(), e.errno)
            continue
        print("X", rel.hex(), nb.hex(), v.hex() if v else "-")
for dp, dns, fns in os.walk(root):
    for n in dns + fns:
        p = os.path.join(dp, n)
        emit(os.path.relpath(p, root), p)
"#;

fn collect_xattrs(t: &mut Tree) {
    let r = util::python(XATTR_SCRIPT, [t.root.as_os_str()]);
    for line in r.stdout_str().lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 4 {
            t.problems.push(format!("bad xattr dump line {line:?}"));
            continue;
        }
        let rel = PathBuf::from(util::os(&unhex(parts[1])));
        if parts[0] == "ERR" {
            let name = if parts[2] == "-" {
                String::new()
            } else {
                String::from_utf8_lossy(&unhex(parts[2])).into_owned()
            };
            t.problems.push(format!(
                "{}: xattr {name:?} error errno {}",
                show(&rel),
                parts[3]
            ));
            continue;
        }
        let name = unhex(parts[2]);
        let val = if parts[3] == "-" {
            Vec::new()
        } else {
            unhex(parts[3])
        };
        match t.entries.get_mut(&rel) {
            Some(e) => {
                e.xattrs.insert(name, val);
            }
            None => t.problems.push(format!(
                "{}: xattrs on a path the walk did not see",
                show(&rel)
            )),
        }
    }
}

pub fn show(p: &Path) -> String {
    format!("{:?}", p.as_os_str())
}

fn show_bytes(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

#[derive(Clone, Debug, Default)]
pub struct CmpOpts {
    /// Paths the archive does not list (implicit parent dirs): owner and
    /// mtime are not compared.
    pub implicit: BTreeSet<PathBuf>,
    /// Also compare st_nlink of directories.
    pub dir_nlink: bool,
    /// Do not compare xattrs / content / inode identity.
    pub skip_xattrs: bool,
    pub skip_hardlinks: bool,
    /// Compare unhashed (big) regular files range-wise through the files.
    pub big_files: bool,
}

impl CmpOpts {
    pub fn with_implicit(implicit: BTreeSet<PathBuf>) -> Self {
        CmpOpts {
            implicit,
            ..Default::default()
        }
    }
}

/// Compares `actual` (the mount) against `expected` (tar -x output).
pub fn compare(expected: &Tree, actual: &Tree, o: &CmpOpts) -> Vec<String> {
    let mut d = Vec::new();
    for p in &expected.problems {
        d.push(format!("[expected tree problem] {p}"));
    }
    for p in &actual.problems {
        d.push(format!("[mount problem] {p}"));
    }
    for (path, e) in &expected.entries {
        let a = match actual.entries.get(path) {
            Some(a) => a,
            None => {
                d.push(format!(
                    "{}: missing in mount (expected {:?})",
                    show(path),
                    e.kind
                ));
                continue;
            }
        };
        let s = show(path);
        if e.kind != a.kind {
            d.push(format!("{s}: type {:?} != expected {:?}", a.kind, e.kind));
            continue;
        }
        if e.mode != a.mode {
            d.push(format!("{s}: mode {:o} != expected {:o}", a.mode, e.mode));
        }
        if e.kind != Kind::Dir && e.size != a.size {
            d.push(format!("{s}: size {} != expected {}", a.size, e.size));
        }
        if !o.implicit.contains(path) {
            if (e.uid, e.gid) != (a.uid, a.gid) {
                d.push(format!(
                    "{s}: uid:gid {}:{} != expected {}:{}",
                    a.uid, a.gid, e.uid, e.gid
                ));
            }
            if (e.mtime, e.mtime_nsec) != (a.mtime, a.mtime_nsec) {
                d.push(format!(
                    "{s}: mtime {}.{:09} != expected {}.{:09}",
                    a.mtime, a.mtime_nsec, e.mtime, e.mtime_nsec
                ));
            }
        }
        if e.target != a.target {
            d.push(format!(
                "{s}: symlink target {} != expected {}",
                show_bytes(a.target.as_deref().unwrap_or(b"")),
                show_bytes(e.target.as_deref().unwrap_or(b""))
            ));
        }
        if matches!(e.kind, Kind::Char | Kind::Block) && e.rdev != a.rdev {
            d.push(format!(
                "{s}: rdev {}:{} != expected {}:{}",
                major(a.rdev),
                minor(a.rdev),
                major(e.rdev),
                minor(e.rdev)
            ));
        }
        if (e.kind != Kind::Dir || o.dir_nlink) && e.nlink != a.nlink {
            d.push(format!("{s}: nlink {} != expected {}", a.nlink, e.nlink));
        }
        if let (Some(es), Some(as_)) = (&e.sha, &a.sha) {
            if es != as_ {
                d.push(format!("{s}: content sha256 {as_} != expected {es}"));
            }
        }
        if !o.skip_xattrs && e.xattrs != a.xattrs {
            let fmt = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
                m.iter()
                    .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), show_bytes(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            d.push(format!(
                "{s}: xattrs {{{}}} != expected {{{}}}",
                fmt(&a.xattrs),
                fmt(&e.xattrs)
            ));
        }
        if e.kind == Kind::File
            && e.sha.is_none()
            && a.sha.is_none()
            && e.size == a.size
            && e.size > 0
        {
            // Large file: compare by ranges (only when the walk wanted content).
            if o.big_files {
                compare_big(
                    &expected.root.join(path),
                    &actual.root.join(path),
                    e.size,
                    &s,
                    &mut d,
                );
            }
        }
    }
    for (path, a) in &actual.entries {
        if !expected.entries.contains_key(path) {
            d.push(format!("{}: extra in mount ({:?})", show(path), a.kind));
        }
    }
    if !o.skip_hardlinks {
        let ge = link_groups(expected);
        let ga = link_groups(actual);
        for g in ge.difference(&ga) {
            d.push(format!(
                "hardlink group in tar -x not in mount: {}",
                g.iter().map(|p| show(p)).collect::<Vec<_>>().join(" = ")
            ));
        }
        for g in ga.difference(&ge) {
            d.push(format!(
                "hardlink group in mount not in tar -x: {}",
                g.iter().map(|p| show(p)).collect::<Vec<_>>().join(" = ")
            ));
        }
    }
    d
}

/// Groups of non-directory paths sharing an inode (every entry is in one group).
fn link_groups(t: &Tree) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (p, e) in &t.entries {
        if e.kind != Kind::Dir {
            by_ino.entry(e.ino).or_default().push(p.clone());
        }
    }
    by_ino
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect()
}

/// Compares a big (possibly sparse) file: the data ranges of the expected
/// file byte for byte, plus samples inside its holes and at the end.
pub fn compare_big(exp: &Path, act: &Path, size: u64, s: &str, d: &mut Vec<String>) {
    let fe = match File::open(exp) {
        Ok(f) => f,
        Err(e) => return d.push(format!("{s}: cannot open expected: {e}")),
    };
    let fa = match File::open(act) {
        Ok(f) => f,
        Err(e) => return d.push(format!("{s}: cannot open in mount: {e}")),
    };
    let ranges = merge_ranges(seek_ranges(exp));
    let mut be = vec![0u8; 1 << 20];
    let mut ba = vec![0u8; 1 << 20];
    let mut check = |off: u64, len: usize, what: &str, d: &mut Vec<String>| -> bool {
        let ne = read_full_at(&fe, &mut be[..len], off);
        let na = read_full_at(&fa, &mut ba[..len], off);
        match (ne, na) {
            (Ok(ne), Ok(na)) => {
                if ne != na || be[..ne] != ba[..na] {
                    let first = be[..ne.min(na)]
                        .iter()
                        .zip(&ba[..ne.min(na)])
                        .position(|(x, y)| x != y);
                    d.push(format!(
                        "{s}: {what} bytes differ at offset {off} (+{len}): mount read {na} bytes, expected {ne}, first diff at +{first:?}"
                    ));
                    false
                } else {
                    true
                }
            }
            (_, Err(e)) => {
                d.push(format!("{s}: read in mount at {off} failed: {e}"));
                false
            }
            (Err(e), _) => {
                d.push(format!("{s}: read expected at {off} failed: {e}"));
                false
            }
        }
    };
    'outer: for &(a, b) in &ranges {
        let mut off = a;
        while off < b {
            let len = ((b - off) as usize).min(1 << 20);
            if !check(off, len, "data", d) {
                break 'outer;
            }
            off += len as u64;
        }
    }
    // Holes: complement of ranges.
    let mut holes = Vec::new();
    let mut pos = 0;
    for &(a, b) in &ranges {
        if a > pos {
            holes.push((pos, a));
        }
        pos = b;
    }
    if pos < size {
        holes.push((pos, size));
    }
    let mut g = util::Lcg::new(size);
    for &(a, b) in holes.iter().take(64) {
        let mut samples = vec![a, b.saturating_sub(4096).max(a), a + (b - a) / 2];
        samples.push(a + g.below(b - a));
        for off in samples {
            let len = (b - off).min(4096) as usize;
            if len > 0 && !check(off, len, "hole", d) {
                break;
            }
        }
    }
    // The tail and a read past EOF.
    let tail = size.saturating_sub(8192);
    check(tail, (size - tail) as usize, "tail", d);
    let mut one = [0u8; 16];
    match fa.read_at(&mut one, size) {
        Ok(0) => {}
        Ok(n) => d.push(format!("{s}: read at EOF returned {n} bytes")),
        Err(e) => d.push(format!("{s}: read at EOF failed: {e}")),
    }
}

pub fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

pub fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

/// Panics with a readable listing if `d` is not empty.
pub fn assert_no_diff(what: &str, d: &[String]) {
    if d.is_empty() {
        return;
    }
    let mut msg = format!("{what}: {} difference(s):\n", d.len());
    for line in d.iter().take(150) {
        msg.push_str("  ");
        msg.push_str(line);
        msg.push('\n');
    }
    if d.len() > 150 {
        msg.push_str(&format!("  … and {} more\n", d.len() - 150));
    }
    panic!("{msg}");
}

/// Walks both trees with full content and xattrs and asserts they match.
/// Returns the number of entries compared.
pub fn assert_same_tree(expected: &Path, mount: &Path, o: &CmpOpts) -> usize {
    let wo = WalkOpts::default();
    let e = walk(expected, &wo);
    let a = walk(mount, &wo);
    let mut o = o.clone();
    o.big_files = true;
    let d = compare(&e, &a, &o);
    assert_no_diff(
        &format!("mount {} vs tar -x {}", mount.display(), expected.display()),
        &d,
    );
    e.entries.len()
}
