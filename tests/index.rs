//! The persisted index: `snapfs index`, warm mounts that do not touch the
//! archive body, corrupted or foreign index files, changed archives.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::corpus::{self, Comp};
use crate::tree::{self, CmpOpts, WalkOpts};
use crate::util::{self, Mount, TestDir};

fn idx_of(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".snapfs-idx");
    PathBuf::from(s)
}

fn index(archive: &Path) -> util::Run {
    let r = util::snapfs([OsStr::new("index"), archive.as_os_str()]);
    r.assert_ok();
    r
}

fn set_mtime(p: &Path, secs: i64) {
    util::run_ok(
        Command::new("touch")
            .arg("-d")
            .arg(format!("@{secs}"))
            .arg(p),
    );
}

#[test]
fn index_command_writes_index_and_summary() {
    let td = TestDir::new("index-cmd");
    let tar = corpus::small_tar(td.path(), "a.tar", 1);
    let r = index(&tar);
    let idx = idx_of(&tar);
    let md = fs::metadata(&idx).unwrap_or_else(|e| panic!("{} not written: {e}", idx.display()));
    assert!(md.len() > 0, "index file is empty");
    let out = format!("{}{}", r.stdout_str(), r.stderr_str()).to_lowercase();
    assert!(
        out.contains("entr"),
        "summary should mention the entries:\n{out}"
    );
    // Warm mount from that index matches tar -x.
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m = Mount::new(&tar, &td.join("mnt"));
    let n = tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
    assert!(n > 40);
}

#[test]
fn index_command_gzip_and_zstd() {
    let td = TestDir::new("index-comp");
    let tar = corpus::small_tar(td.path(), "a.tar", 2);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    for comp in [Comp::Gzip, Comp::ZstdMulti] {
        let arch = corpus::compress(&tar, comp);
        index(&arch);
        assert!(
            idx_of(&arch).exists(),
            "no index next to {}",
            arch.display()
        );
        let m = Mount::new(&arch, &td.join(format!("mnt-{comp:?}")));
        tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
    }
}

#[test]
fn warm_mount_does_not_read_archive_body() {
    let td = TestDir::new("warm");
    let src = td.mkdir("src");
    for i in 0..160u64 {
        let p = src.join(format!("dir{}/file{i:03}", i % 8));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(
            &p,
            util::random_bytes(40_000 + (i as usize * 311) % 50_000, i),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("dir0/file000", src.join("link")).unwrap();
    fs::hard_link(src.join("dir1/file001"), src.join("hard")).unwrap();
    let tar = td.join("a.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    index(&tar);
    let m1 = Mount::new(&tar, &td.join("mnt1"));
    let l1 = tree::walk(m1.path(), &WalkOpts::listing());
    m1.unmount();
    assert!(
        l1.entries.len() > 160 && l1.problems.is_empty(),
        "first listing: {} entries, {:?}",
        l1.entries.len(),
        l1.problems
    );

    // Overwrite the middle of the archive, keep size, ends and mtime.
    let orig = td.join("orig.tar");
    util::run_ok(Command::new("cp").arg("-p").arg(&tar).arg(&orig));
    let len = fs::metadata(&tar).unwrap().len();
    let ino = fs::metadata(&tar).unwrap().ino();
    {
        let f = OpenOptions::new().write(true).open(&tar).unwrap();
        let mut off = 64 * 1024;
        let mut g = util::Lcg::new(5);
        while off < len - 64 * 1024 {
            let n = (len - 64 * 1024 - off).min(1 << 20);
            f.write_all_at(&util::random_bytes(n as usize, g.next_u64()), off)
                .unwrap();
            off += n;
        }
    }
    util::run_ok(Command::new("touch").arg("-r").arg(&orig).arg(&tar));
    let (a, o) = (fs::metadata(&tar).unwrap(), fs::metadata(&orig).unwrap());
    assert_eq!(
        (a.len(), a.mtime(), a.mtime_nsec(), a.ino()),
        (o.len(), o.mtime(), o.mtime_nsec(), ino)
    );
    // Sanity: the body really is garbage now.
    let t = util::run(Command::new("tar").arg("-tf").arg(&tar));
    assert!(
        !t.ok() || t.stdout_str().lines().count() < 20,
        "tar still reads the corrupted archive"
    );

    let m2 = Mount::new(&tar, &td.join("mnt2"));
    let l2 = tree::walk(m2.path(), &WalkOpts::listing());
    let d = tree::compare(
        &l1,
        &l2,
        &CmpOpts {
            skip_xattrs: true,
            ..Default::default()
        },
    );
    tree::assert_no_diff(
        "warm mount listing after the archive body was overwritten (index must be used)",
        &d,
    );
}

/// A damaged index file: a mount either rebuilds it at once (damage found at open:
/// header, lengths, the root, the small sections) or serves it, each entry right or
/// EIO (damage found where a record is first read; the daemon then removes the file).
/// The next mount serves the whole tree right.
fn corrupt_index_case(name: &str, corrupt: impl FnOnce(&Path, &TestDir)) {
    let td = TestDir::new(name);
    let tar = corpus::small_tar(td.path(), "a.tar", 3);
    index(&tar);
    let idx = idx_of(&tar);
    assert!(idx.exists());
    corrupt(&idx, &td);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let log_file = td.join("daemon.log");
    let m = Mount::with_args(
        &tar,
        &td.join("mnt"),
        &["--log-file", log_file.to_str().unwrap()],
    );
    let failed = read_all_or_eio(&exp, m.path());
    let log = fs::read_to_string(&log_file).unwrap_or_default();
    m.unmount();
    if failed > 0 {
        assert!(
            log.contains(&format!("index {}", idx.display())) && log.contains("inode"),
            "a log line names the index and the record:\n{log}"
        );
    }
    let m = Mount::new(&tar, &td.join("mnt2"));
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
}

/// Walks `root` (a mount of what `exp` holds): every entry listed exists in `exp`
/// with the same type and bytes, or fails with EIO. Returns how many failed.
fn read_all_or_eio(exp: &Path, root: &Path) -> usize {
    const EIO: i32 = 5;
    let mut failed = 0;
    let mut check = |r: std::io::Result<()>, rel: &Path| match r {
        Ok(()) => {}
        Err(e) if util::errno(&e) == EIO => failed += 1,
        Err(e) => panic!("{}: {e} (only EIO may fail)", rel.display()),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (got, want) = (root.join(&rel), exp.join(&rel));
        let r = fs::symlink_metadata(&got).and_then(|md| {
            let wmd = fs::symlink_metadata(&want)
                .unwrap_or_else(|e| panic!("{} is not in the archive: {e}", rel.display()));
            assert_eq!(md.file_type(), wmd.file_type(), "{}", rel.display());
            if md.is_dir() {
                for e in fs::read_dir(&got)? {
                    stack.push(rel.join(e?.file_name()));
                }
            } else if md.is_file() {
                assert!(
                    fs::read(&got)? == fs::read(&want).unwrap(),
                    "{}",
                    rel.display()
                );
            } else if md.file_type().is_symlink() {
                assert_eq!(fs::read_link(&got)?, fs::read_link(&want).unwrap());
            }
            Ok(())
        });
        check(r, &rel);
    }
    failed
}

#[test]
fn a_corrupt_record_fails_alone_and_the_index_is_rebuilt_next_time() {
    let td = TestDir::new("idx-lazy");
    let src = td.mkdir("src");
    for i in 0..400u32 {
        let p = src.join(format!("d{}/f{i:03}", i / 100));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("content of file {i}\n")).unwrap();
    }
    let tar = td.join("a.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    index(&tar);
    let idx = idx_of(&tar);
    // Inodes are numbered breadth first: root, d0..d3, then d0's files (6..105), d1's
    // (106..205)... Damage the record of d1/f150 (inode 156, in the 4th block).
    let b = fs::read(&idx).unwrap();
    let count = |i: usize| u64::from_le_bytes(b[72 + 8 * i..80 + 8 * i].try_into().unwrap());
    let blocks = (count(0) * 96 + count(1) * 12 + count(2)).div_ceil(4096);
    let body = (136 + 4 * blocks).next_multiple_of(8);
    assert_eq!(count(0), 405, "root, 4 dirs, 400 files");
    flip(&idx, |_| vec![body + 155 * 96 + 32]);

    let log_file = td.join("daemon.log");
    let m = Mount::with_args(
        &tar,
        &td.join("mnt"),
        &["--log-file", log_file.to_str().unwrap()],
    );
    assert_eq!(
        fs::read(m.join("d0/f000")).unwrap(),
        b"content of file 0\n",
        "a record in another block is served"
    );
    assert_eq!(fs::read_dir(m.join("d2")).unwrap().count(), 100);
    let e = fs::metadata(m.join("d1/f150")).unwrap_err();
    assert_eq!(util::errno(&e), 5, "EIO for the damaged record: {e}");
    let e = fs::read(m.join("d1/f150")).unwrap_err();
    assert_eq!(util::errno(&e), 5, "EIO again: {e}");
    let log = fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains(&format!("index {}: inode 156", idx.display())) && log.contains("checksum"),
        "one log line names the index and the record:\n{log}"
    );
    // Found once (then each failed request has its line from the FUSE adapter).
    let found = log.matches("index::lazy] index").count();
    assert_eq!(found, 1, "the damage is logged when found, once:\n{log}");
    assert!(!idx.exists(), "the damaged index is removed");
    m.unmount();
    let m = Mount::new(&tar, &td.join("mnt2"));
    assert_eq!(
        fs::read(m.join("d3/f399")).unwrap(),
        b"content of file 399\n"
    );
    assert!(idx.exists(), "rebuilt");
}

fn flip(idx: &Path, at: impl Fn(u64) -> Vec<u64>) {
    let mut b = fs::read(idx).unwrap();
    for pos in at(b.len() as u64) {
        let i = pos.min(b.len() as u64 - 1) as usize;
        b[i] ^= 0x5a;
    }
    // Keep the index's mtime: only the content is damaged.
    let md = fs::metadata(idx).unwrap();
    fs::write(idx, &b).unwrap();
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::new(md.mtime() as u64, md.mtime_nsec() as u32);
    fs::File::options()
        .write(true)
        .open(idx)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn corrupt_index_header_bytes_flipped() {
    corrupt_index_case("idx-flip-head", |idx, _| flip(idx, |_| vec![0, 3, 9, 17]));
}

#[test]
fn corrupt_index_middle_bytes_flipped() {
    corrupt_index_case("idx-flip-mid", |idx, _| {
        flip(idx, |n| {
            (0..16).map(|k| n / 3 + k * (n / 48).max(1)).collect()
        })
    });
}

#[test]
fn corrupt_index_single_byte_flipped_near_end() {
    corrupt_index_case("idx-flip-end", |idx, _| flip(idx, |n| vec![n - 5]));
}

#[test]
fn corrupt_index_truncated_to_half() {
    corrupt_index_case("idx-trunc", |idx, _| {
        let n = fs::metadata(idx).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(idx)
            .unwrap()
            .set_len(n / 2)
            .unwrap();
    });
}

#[test]
fn corrupt_index_empty_file() {
    corrupt_index_case("idx-empty", |idx, _| {
        fs::write(idx, b"").unwrap();
    });
}

#[test]
fn corrupt_index_random_garbage() {
    corrupt_index_case("idx-garbage", |idx, _| {
        let n = fs::metadata(idx).unwrap().len() as usize;
        fs::write(idx, util::random_bytes(n, 11)).unwrap();
    });
}

#[test]
fn index_of_another_archive_is_not_trusted() {
    corrupt_index_case("idx-foreign", |idx, td| {
        let other = corpus::small_tar(td.path(), "other.tar", 4);
        // Different size and content; same directory.
        fs::write(td.join("src-other.tar/extra"), b"more").unwrap();
        corpus::gnu_tar(&td.join("src-other.tar"), &other, "posix", &[]);
        index(&other);
        fs::copy(idx_of(&other), idx).unwrap();
    });
}

#[test]
fn changed_archive_appended_is_reindexed() {
    let td = TestDir::new("changed-append");
    let tar = corpus::small_tar(td.path(), "a.tar", 5);
    {
        let m = Mount::new(&tar, &td.join("mnt1"));
        assert!(m.join("readme").exists());
    }
    let old = fs::metadata(&tar).unwrap().mtime();
    let src = td.join("src-a.tar");
    fs::write(src.join("appended"), b"appended later\n").unwrap();
    util::run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&src)
            .arg("-rf")
            .arg(&tar)
            .arg("./appended"),
    );
    set_mtime(&tar, old + 100);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m = Mount::new(&tar, &td.join("mnt2"));
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
    assert_eq!(fs::read(m.join("appended")).unwrap(), b"appended later\n");
}

#[test]
fn changed_archive_same_size_is_reindexed() {
    let td = TestDir::new("changed-same-size");
    let src = td.mkdir("src");
    fs::write(src.join("fileA"), b"same length content A").unwrap();
    fs::write(src.join("other"), b"other").unwrap();
    let tar = td.join("a.tar");
    corpus::gnu_tar(&src, &tar, "gnu", &[]);
    {
        let m = Mount::new(&tar, &td.join("mnt1"));
        assert!(m.join("fileA").exists());
    }
    let (old_len, old_mtime) = {
        let md = fs::metadata(&tar).unwrap();
        (md.len(), md.mtime())
    };
    fs::rename(src.join("fileA"), src.join("fileB")).unwrap();
    fs::write(src.join("fileB"), b"same length content B").unwrap();
    let tar2 = td.join("b.tar");
    corpus::gnu_tar(&src, &tar2, "gnu", &[]);
    assert_eq!(fs::metadata(&tar2).unwrap().len(), old_len);
    fs::write(&tar, fs::read(&tar2).unwrap()).unwrap();
    set_mtime(&tar, old_mtime + 100);
    let m = Mount::new(&tar, &td.join("mnt2"));
    assert_eq!(
        util::list_dir(m.path()),
        vec![std::ffi::OsString::from("fileB"), "other".into()],
        "stale index used"
    );
    assert_eq!(fs::read(m.join("fileB")).unwrap(), b"same length content B");
}

#[test]
fn changed_gzip_archive_is_reindexed() {
    let td = TestDir::new("changed-gz");
    let tar = corpus::small_tar(td.path(), "a.tar", 6);
    let gz = corpus::compress(&tar, Comp::Gzip);
    {
        let m = Mount::new(&gz, &td.join("mnt1"));
        assert!(m.join("readme").exists());
    }
    let old = fs::metadata(&gz).unwrap().mtime();
    let src = td.join("src-a.tar");
    fs::write(src.join("readme"), b"rewritten readme with other content\n").unwrap();
    fs::write(src.join("d0/f000.dat"), util::random_bytes(30_000, 99)).unwrap();
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let gz2 = corpus::compress(&tar, Comp::Gzip);
    assert_eq!(gz2, gz);
    set_mtime(&gz, old + 100);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m = Mount::new(&gz, &td.join("mnt2"));
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
}

/// Rewrites a byte of an index file and fixes its checksums, so that only the
/// version check can reject it.
fn patch_with_valid_crc(idx: &Path, find: &[u8], skip: usize, value: u8) {
    util::python(
        r#"
import struct, sys, zlib
p, find, skip, value = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
b = bytearray(open(p, "rb").read())
at = b.index(find) + skip
b[at] = value
# Format 3: a CRC per block of the body, then one over the header.
counts = struct.unpack_from("<6Q", b, 72)
body_len = sum(c * s for c, s in zip(counts, [96, 12, 1, 16, 24, 1]))
bb = struct.unpack_from("<I", b, 128)[0]
n = (body_len + bb - 1) // bb
body = (136 + 4 * n + 7) // 8 * 8
for i in range(n):
    struct.pack_into("<I", b, 136 + 4 * i, zlib.crc32(bytes(b[body + i * bb:body + (i + 1) * bb])))
struct.pack_into("<I", b, 132, zlib.crc32(bytes(b[:132]) + bytes(b[136:body])))
open(p, "wb").write(bytes(b))
"#,
        [
            idx.as_os_str(),
            std::ffi::OsStr::new(&util::hex(find)),
            std::ffi::OsStr::new(&skip.to_string()),
            std::ffi::OsStr::new(&value.to_string()),
        ],
    );
}

#[test]
fn index_of_another_version_is_rebuilt() {
    // Format version 2 of the whole file, with a valid checksum.
    corrupt_index_case("idx-version", |idx, _| {
        patch_with_valid_crc(idx, b"SNAPFSIX", 8, 2)
    });
    // A gzip index whose seek table is version 1 (before the block CRCs).
    let td = TestDir::new("idx-table-version");
    let tar = corpus::small_tar(td.path(), "a.tar", 8);
    let gz = corpus::compress(&tar, Comp::Gzip);
    index(&gz);
    let idx = idx_of(&gz);
    patch_with_valid_crc(&idx, b"GZST", 4, 1);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let m = Mount::new(&gz, &td.join("mnt"));
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
    let b = fs::read(&idx).unwrap();
    let at = b.windows(4).position(|w| w == b"GZST").unwrap();
    assert_eq!(b[at + 4], 3, "the index was not rebuilt");
}

#[test]
fn embedded_index_of_another_version_is_ignored() {
    // A plain-tar snapshot from `snapfs create` whose embedded index claims format
    // version 99, from a future snapfs (all checksums fixed up): it is indexed the
    // ordinary way.
    let td = TestDir::new("embedded-version");
    let src = td.mkdir("src");
    fs::write(src.join("a"), b"alpha\n").unwrap();
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/b"), util::semi_compressible(100_000, 3)).unwrap();
    let snap = td.join("s.tar");
    util::snapfs([
        OsStr::new("create"),
        src.as_os_str(),
        OsStr::new("-o"),
        snap.as_os_str(),
        OsStr::new("--format"),
        OsStr::new("tar"),
    ])
    .assert_ok();
    util::python(
        r#"
import sys, zlib, struct
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
foot = len(b) - 512
off, n = struct.unpack_from("<QQ", b, foot + 24)
assert b[off:off + 8] == b"SNAPFSIX", b[off:off + 8]
b[off + 8:off + 12] = (99).to_bytes(4, "little")
b[off + n - 4:off + n] = zlib.crc32(bytes(b[off:off + n - 4])).to_bytes(4, "little")
b[foot + 56:foot + 60] = zlib.crc32(bytes(b[off:off + n])).to_bytes(4, "little")
b[foot + 508:foot + 512] = zlib.crc32(bytes(b[foot:foot + 508])).to_bytes(4, "little")
open(p, "wb").write(bytes(b))
"#,
        [snap.as_os_str()],
    );
    let m = Mount::new(&snap, &td.join("mnt"));
    assert_eq!(fs::read(m.join("a")).unwrap(), b"alpha\n");
    assert_eq!(
        fs::read(m.join("d/b")).unwrap(),
        util::semi_compressible(100_000, 3)
    );
    assert!(idx_of(&snap).exists(), "no ordinary index was built");
}
