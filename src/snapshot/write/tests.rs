use super::*;

use std::io::Cursor;

use crate::archive::tar::{MemberReader, ReadStream};
use crate::archive::{gzip, zstd as zs, Archive, StreamReader};
use crate::index::build::{build_index, BuildOptions};
use crate::snapshot::format::{read_embedded, Footer, GZIP_FOOTER_LEN, ZSTD_FOOTER_LEN};

const COMPS: [OutputCompression; 3] = [
    OutputCompression::None,
    OutputCompression::Gzip { level: 6 },
    OutputCompression::Zstd { level: 3 },
];

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            b"abcdefghijklmnop"[(x >> 60) as usize]
        })
        .collect()
}

/// A description of one test entry (data kept to compare).
struct Spec {
    path: Vec<u8>,
    kind: EntryKind,
    content: Vec<u8>,
    link: Vec<u8>,
    mtime: i64,
    nsec: u32,
    uid: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    dev: (u32, u32),
}

fn spec(path: &[u8], kind: EntryKind) -> Spec {
    Spec {
        path: path.to_vec(),
        kind,
        content: Vec::new(),
        link: Vec::new(),
        mtime: 1_600_000_000,
        nsec: 0,
        uid: 1000,
        xattrs: Vec::new(),
        dev: (0, 0),
    }
}

fn specs() -> Vec<Spec> {
    let long_dir = "d".repeat(90);
    let long_name = format!("{long_dir}/{}", "f".repeat(80));
    let mut v = vec![spec(b"", EntryKind::Dir), spec(b"a", EntryKind::Dir)];
    let mut f = spec(b"a/big", EntryKind::File);
    f.content = data(50_000, 1);
    f.nsec = 123_456_789;
    f.xattrs = vec![
        (b"user.bin".to_vec(), vec![0, 255, b'\n', b'=']),
        (b"user.empty".to_vec(), Vec::new()),
    ];
    v.push(f);
    let mut e = spec(b"a/empty", EntryKind::File);
    e.mtime = -5;
    e.nsec = 500_000_000;
    v.push(e);
    let mut h = spec(b"a/hard", EntryKind::Hardlink);
    h.link = b"a/big".to_vec();
    v.push(h);
    let mut s = spec(b"a/sym", EntryKind::Symlink);
    s.link = "t/".repeat(80).into_bytes();
    v.push(s);
    let mut c = spec(b"a/chr", EntryKind::Char);
    c.dev = (4000, 1_000_000);
    v.push(c);
    let mut b = spec(b"a/blk", EntryKind::Block);
    b.dev = (8, 1);
    v.push(b);
    v.push(spec(b"a/fifo", EntryKind::Fifo));
    v.push(spec(long_dir.as_bytes(), EntryKind::Dir));
    let mut l = spec(long_name.as_bytes(), EntryKind::File);
    l.content = data(513, 2);
    l.uid = 3_000_000_000;
    v.push(l);
    let mut u = spec("ünï/日本\nx".as_bytes(), EntryKind::File);
    u.content = b"unicode".to_vec();
    u.mtime = 1 << 40;
    v.push(u);
    let mut z = spec(b"zzz", EntryKind::File);
    z.content = data(20_000, 3);
    v.push(z);
    v
}

fn entry(s: &Spec) -> SnapshotEntry {
    let mut e = SnapshotEntry::new(s.path.clone(), s.kind);
    e.mode = if s.kind == EntryKind::Dir {
        0o755
    } else {
        0o640
    };
    e.uid = s.uid;
    e.gid = 7;
    e.mtime = s.mtime;
    e.mtime_nsec = s.nsec;
    e.atime = Some((s.mtime.saturating_add(1), 5));
    e.ctime = Some((s.mtime.saturating_sub(1), 999_999_999));
    e.link = s.link.clone();
    e.xattrs = s.xattrs.clone();
    e.dev_major = s.dev.0;
    e.dev_minor = s.dev.1;
    if s.kind == EntryKind::File {
        e.size = s.content.len() as u64;
        e.data = Some(Box::new(Cursor::new(s.content.clone())));
    }
    e
}

fn write(path: &Path, comp: OutputCompression, chunk: u64) -> SnapshotSummary {
    let mut w = SnapshotWriter::create(
        path,
        WriterOptions {
            compression: comp,
            chunk_bytes: chunk,
            ..Default::default()
        },
    )
    .unwrap();
    for s in specs() {
        w.add(entry(&s)).unwrap();
    }
    w.finish().unwrap()
}

fn decompress(path: &Path, comp: OutputCompression) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    match comp {
        OutputCompression::None => raw,
        OutputCompression::Gzip { .. } => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        OutputCompression::Zstd { .. } => ::zstd::decode_all(&raw[..]).unwrap(),
    }
}

#[test]
fn round_trip_through_member_reader_index_and_seek_table() {
    let dir = tempfile::tempdir().unwrap();
    for comp in COMPS {
        let path = dir.path().join(format!("s-{:?}.tar", comp.kind()));
        let sum = write(&path, comp, 4096);
        assert_eq!(sum.entries, specs().len() as u64);
        assert_eq!(sum.bytes, std::fs::metadata(&path).unwrap().len());
        let stream = decompress(&path, comp);
        assert_eq!(stream.len() % 512, 0);

        // The tar members, as the reader sees them.
        let mut r = MemberReader::new(ReadStream(&stream[..]), &path);
        let mut n = 0;
        for s in specs() {
            let m = r.next_member().unwrap().expect("member");
            n += 1;
            let mut want_path = if s.path.is_empty() {
                b"./".to_vec()
            } else {
                s.path.clone()
            };
            if s.kind == EntryKind::Dir && !s.path.is_empty() {
                want_path.push(b'/');
            }
            assert_eq!(m.path, want_path);
            assert_eq!(m.link, s.link);
            assert_eq!((m.mtime, m.mtime_nsec), (s.mtime, s.nsec), "{:?}", s.path);
            assert_eq!(m.atime, Some((s.mtime.saturating_add(1), 5)));
            assert_eq!(m.ctime, Some((s.mtime.saturating_sub(1), 999_999_999)));
            assert_eq!(m.uid, s.uid);
            assert_eq!(m.gid, 7);
            assert_eq!(m.xattrs, s.xattrs);
            assert_eq!((m.dev_major, m.dev_minor), s.dev);
            if let Data::Contiguous(off) = m.data {
                let off = off as usize;
                assert_eq!(&stream[off..off + m.size as usize], &s.content[..]);
            } else {
                panic!("not contiguous");
            }
        }
        assert!(r.next_member().unwrap().is_none());
        assert_eq!(n, specs().len());
        // The reader stops after the first zero block of the end marker.
        let tar_end = r.position() + 512;
        assert_eq!(sum.stream_bytes, tar_end);

        // The embedded index equals what an indexing pass builds.
        let archive = Archive::open(&path).unwrap();
        let idx = read_embedded(&archive).unwrap().expect("embedded index");
        assert_eq!(idx.id, archive.id);
        assert_eq!(idx.stream_size, tar_end);
        let built = build_index(&archive, &BuildOptions::default(), &Default::default()).unwrap();
        assert_eq!(idx.inodes, built.inodes);
        assert_eq!(idx.dirents, built.dirents);
        assert_eq!(idx.names, built.names);
        assert_eq!(idx.xattrs, built.xattrs);
        assert_eq!(idx.skipped, 0);
        let root = &idx.inodes[0];
        assert_eq!((root.atime, root.atime_nsec), (root.mtime + 1, 5));
        assert_eq!((root.ctime, root.ctime_nsec), (root.mtime - 1, 999_999_999));

        // Every span of the seek table decodes to its slice of the stream.
        let file = File::open(&path).unwrap();
        let mut out = Vec::new();
        match &*idx.table {
            SeekTable::Plain => assert_eq!(comp, OutputCompression::None),
            SeekTable::Gzip(t) => {
                assert!(t.span_count() > 10);
                for i in 0..t.span_count() {
                    gzip::decode_span(&file, t, i, &mut out).unwrap();
                    let (a, b) = t.span_range(i);
                    assert_eq!(out, stream[a as usize..b as usize]);
                }
            }
            SeekTable::Zstd(t) => {
                assert!(t.span_count() > 10);
                for i in 0..t.span_count() {
                    zs::decode_span(&file, t, i, &mut out).unwrap();
                    let (a, b) = t.span_range(i);
                    assert_eq!(out, stream[a as usize..b as usize]);
                }
            }
            SeekTable::Xz(_) | SeekTable::Bzip2(_) => panic!("snapfs writes no xz or bzip2"),
        }
        // Reading files through the index and the stream reader.
        let reader = StreamReader::new(Arc::new(file), idx.table.clone(), 1 << 20);
        for rec in idx.inodes.iter().filter(|r| r.file_type() == libc::S_IFREG) {
            let mut buf = vec![0u8; rec.size as usize];
            reader.read_exact_at(&mut buf, rec.data).unwrap();
            assert!(specs().iter().any(|s| s.content == buf));
        }
    }
}

#[test]
fn output_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    for comp in COMPS {
        let a = write(&dir.path().join("a"), comp, 1 << 20);
        let b = write(&dir.path().join("b"), comp, 1 << 20);
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(
            std::fs::read(dir.path().join("a")).unwrap(),
            std::fs::read(dir.path().join("b")).unwrap()
        );
    }
}

#[test]
fn footers_have_fixed_sizes_and_decode_with_standard_tools() {
    let dir = tempfile::tempdir().unwrap();
    for comp in COMPS {
        let path = dir.path().join("f");
        write(&path, comp, 1 << 20);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(footer_block(&raw, comp).len(), 512);
        let (len, block) = match comp {
            OutputCompression::None => (512, raw[raw.len() - 512..].to_vec()),
            OutputCompression::Gzip { .. } => {
                let tail = &raw[raw.len() - GZIP_FOOTER_LEN..];
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(tail)
                    .read_to_end(&mut out)
                    .unwrap();
                (GZIP_FOOTER_LEN, out)
            }
            OutputCompression::Zstd { .. } => {
                let tail = &raw[raw.len() - ZSTD_FOOTER_LEN..];
                (ZSTD_FOOTER_LEN, ::zstd::decode_all(tail).unwrap())
            }
        };
        assert!(len >= 512);
        assert_eq!(block.len(), 512);
        assert_eq!(&block[..16], b"SNAPFS-EMBEDDED\0");
    }
}

#[test]
fn hostile_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    for comp in COMPS {
        let path = dir.path().join("h");
        write(&path, comp, 1 << 20);
        let good = std::fs::read(&path).unwrap();
        let probe = |bytes: &[u8]| {
            let p = dir.path().join("probe");
            std::fs::write(&p, bytes).unwrap();
            let archive = Archive::open(&p).unwrap();
            read_embedded(&archive).map(|o| o.is_some())
        };
        assert!(probe(&good).unwrap());
        // Truncations: no footer (None) or, rarely, an error; never a panic.
        for cut in [0, 1, 100, 511, 512, good.len() / 2, good.len() - 1] {
            assert!(!matches!(probe(&good[..cut]), Ok(true)), "cut {cut}");
        }
        // A flip anywhere in the index or the footer: an error (or no footer).
        let block = footer_block(&good, comp);
        let f = Footer::decode(&block).unwrap().unwrap();
        let start = f.compressed_offset as usize;
        for i in start..good.len() {
            if comp != OutputCompression::None && (start + 4..start + 10).contains(&i) {
                continue; // gzip MTIME/XFL/OS and zstd header bytes flagged below
            }
            let mut b = good.clone();
            b[i] ^= 0x41;
            if let Ok(true) = probe(&b) {
                panic!("flip at {i} of {} accepted ({comp:?})", good.len());
            }
        }
        // A footer claiming a huge index is refused without allocating it.
        let mut b = good.clone();
        let fstart = match comp {
            OutputCompression::Gzip { .. } => b.len() - 8 - 512,
            _ => b.len() - 512,
        };
        b[fstart + 32..fstart + 40].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let crc = crc32fast::hash(&b[fstart..fstart + 508]);
        b[fstart + 508..fstart + 512].copy_from_slice(&crc.to_le_bytes());
        if let OutputCompression::Gzip { .. } = comp {
            let c = crc32fast::hash(&b[fstart..fstart + 512]);
            let l = b.len();
            b[l - 8..l - 4].copy_from_slice(&c.to_le_bytes());
        }
        assert!(probe(&b).is_err());
        // An ordinary archive of the same kind has no footer.
        let plain = tar_bytes();
        let other = match comp {
            OutputCompression::None => plain,
            OutputCompression::Gzip { .. } => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&plain).unwrap();
                e.finish().unwrap()
            }
            OutputCompression::Zstd { .. } => ::zstd::encode_all(&plain[..], 3).unwrap(),
        };
        assert!(!probe(&other).unwrap());
    }
}

fn footer_block(raw: &[u8], comp: OutputCompression) -> [u8; 512] {
    let start = match comp {
        OutputCompression::None => raw.len() - 512,
        OutputCompression::Gzip { .. } => raw.len() - 8 - 512,
        OutputCompression::Zstd { .. } => raw.len() - 512,
    };
    raw[start..start + 512].try_into().unwrap()
}

fn tar_bytes() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "x", &b"abc"[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn wrong_sizes_and_bad_entries_are_errors_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.tar.gz");
    for (size, content) in [(10u64, vec![1u8; 5]), (3, vec![1u8; 5])] {
        let mut w = SnapshotWriter::create(&path, WriterOptions::default()).unwrap();
        let mut e = SnapshotEntry::new(b"dir/file".to_vec(), EntryKind::File);
        e.size = size;
        e.data = Some(Box::new(Cursor::new(content)));
        let err = w.add(e).unwrap_err().to_string();
        assert!(err.contains("dir/file"), "{err}");
        assert!(w.finish().is_err());
        assert!(!path.exists());
    }
    let mut w = SnapshotWriter::create(&path, WriterOptions::default()).unwrap();
    for bad in [&b"/abs"[..], b"a/../b", b"a//b", b"./a", b"a/"] {
        assert!(w
            .add(SnapshotEntry::new(bad.to_vec(), EntryKind::Dir))
            .is_err());
        w.failed = false;
    }
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn pax_helpers() {
    let mut v = Vec::new();
    pax_record(&mut v, b"path", b"abc");
    assert_eq!(v, b"12 path=abc\n");
    v.clear();
    // 9 + 2 digits = 11? no: the length must count its own digits.
    pax_record(&mut v, b"k", &[b'x'; 95]);
    assert_eq!(v.len(), 102);
    assert!(v.starts_with(b"102 k="));
    assert_eq!(pax_time(5, 0), "5.000000000");
    assert_eq!(pax_time(-2, 500_000_000), "-1.500000000");
    assert_eq!(pax_time(-1, 1), "-0.999999999");
}
