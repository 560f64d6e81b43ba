//! One indexing pass: decompress (recording seek points), read tar members, clean their
//! paths once (GNU tar rules), apply last-wins, implicit parents, hardlinks and sparse
//! maps, and emit a compact [`Index`].

use std::collections::{HashMap, VecDeque};
use std::io::BufReader;
use std::path::Path;

use crate::archive::bzip2::Bz2Indexer;
use crate::archive::gzip::GzipIndexer;
use crate::archive::tar::{Data, FileStream, Member, MemberKind, MemberReader, ReadStream};
use crate::archive::xz::XzIndexer;
use crate::archive::zstd::ZstdIndexer;
use crate::archive::{pipe, Archive, Compression, CountingReader, Progress, SeekTable};
use crate::error::{Error, Result};
use crate::index::{DirentRecord, Index, InodeRecord, XattrRecord, FLAG_IMPLICIT, FLAG_SPARSE};
use crate::source::SourceReader;

/// Uncompressed bytes between seek points unless told otherwise: 1 MiB, so that a cold
/// random read inflates half a MiB on average (sparse windows keep the index as small
/// as it was with 4 MiB spans and whole windows).
pub const DEFAULT_SPAN: u64 = 1 << 20;

/// Options that shape an index (stored in it; a change means a rebuild).
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Uncompressed bytes between seek points.
    pub span_bytes: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            span_bytes: DEFAULT_SPAN,
        }
    }
}

/// Reads the whole archive once and builds its index. `progress` receives the number
/// of archive bytes consumed so far.
pub fn build_index(archive: &Archive, opts: &BuildOptions, progress: &Progress) -> Result<Index> {
    if archive.id.size == 0 {
        // GNU tar refuses it too; most likely a failed download or copy.
        return Err(Error::archive(
            &archive.path,
            None,
            None,
            "empty file (0 bytes), not a tar archive",
        ));
    }
    let file = SourceReader::new(archive.source.clone());
    let path = archive.path.as_path();
    let mut tree = TreeBuilder::new(path, archive.id.mtime_ns);
    let gz_err = |e: std::io::Error| Error::archive(path, None, None, format!("gzip: {e}"));
    let zs_err = |e: std::io::Error| Error::archive(path, None, None, format!("zstd: {e}"));
    let xz_err = |e: std::io::Error| Error::archive(path, None, None, format!("xz: {e}"));
    let bz_err = |e: std::io::Error| Error::archive(path, None, None, format!("bzip2: {e}"));
    let (table, stream_size) = match archive.compression {
        Compression::None => {
            let mut reader = MemberReader::new(FileStream::new(file), path);
            while let Some(m) = reader.next_member()? {
                tree.add(m);
                progress.store(reader.position(), std::sync::atomic::Ordering::Relaxed);
            }
            (SeekTable::Plain, archive.id.size)
        }
        Compression::Gzip => {
            let input =
                CountingReader::new(BufReader::with_capacity(1 << 20, file), progress.clone());
            let (piped, producer) = pipe::spawn(GzipIndexer::new(input, opts.span_bytes));
            let mut reader = MemberReader::new(ReadStream(piped), path);
            while let Some(m) = reader.next_member()? {
                tree.add(m);
            }
            drop(reader);
            let indexer = producer.join().map_err(|_| panicked(path))?;
            let table = indexer.finish().map_err(gz_err)?;
            let size = table.uncompressed_size;
            (SeekTable::Gzip(table), size)
        }
        Compression::Zstd => {
            let input =
                CountingReader::new(BufReader::with_capacity(1 << 20, file), progress.clone());
            let indexer = ZstdIndexer::new(input, opts.span_bytes).map_err(zs_err)?;
            let (piped, producer) = pipe::spawn(indexer);
            let mut reader = MemberReader::new(ReadStream(piped), path);
            while let Some(m) = reader.next_member()? {
                tree.add(m);
            }
            drop(reader);
            let indexer = producer.join().map_err(|_| panicked(path))?;
            let table = indexer.finish().map_err(zs_err)?;
            let size = table.uncompressed_size;
            (SeekTable::Zstd(table), size)
        }
        Compression::Xz => {
            // The blocks come from xz's own index (read from the end of the file); each
            // is decoded on its own, as random reads will.
            let indexer = XzIndexer::new(archive.source.clone(), opts.span_bytes, progress.clone())
                .map_err(xz_err)?;
            let (piped, producer) = pipe::spawn(indexer);
            let mut reader = MemberReader::new(ReadStream(piped), path);
            while let Some(m) = reader.next_member()? {
                tree.add(m);
            }
            drop(reader);
            let indexer = producer.join().map_err(|_| panicked(path))?;
            let table = indexer.finish().map_err(xz_err)?;
            let size = table.uncompressed_size;
            (SeekTable::Xz(table), size)
        }
        Compression::Bzip2 => {
            // The scanner reads 1 MiB at a time itself.
            let indexer = Bz2Indexer::new(
                file,
                archive.source.clone(),
                opts.span_bytes,
                progress.clone(),
            );
            let (piped, producer) = pipe::spawn(indexer);
            let mut reader = MemberReader::new(ReadStream(piped), path);
            while let Some(m) = reader.next_member()? {
                tree.add(m);
            }
            drop(reader);
            let indexer = producer.join().map_err(|_| panicked(path))?;
            let garbage = indexer.trailing_garbage();
            let table = indexer.finish().map_err(bz_err)?;
            if let Some(at) = garbage {
                log::warn!(
                    "{}: ignoring {} bytes of trailing garbage after the last bzip2 stream (at byte {at}), as bzip2 does",
                    path.display(),
                    archive.id.size.saturating_sub(at)
                );
            }
            let size = table.uncompressed_size;
            (SeekTable::Bzip2(table), size)
        }
    };
    let mut index = tree.finish()?;
    index.id = archive.id;
    index.span_bytes = opts.span_bytes;
    index.table = std::sync::Arc::new(table);
    index.stream_size = stream_size;
    Ok(index)
}

fn panicked(path: &Path) -> Error {
    Error::archive(path, None, None, "the decompression thread panicked")
}

/// Longest file name component Linux accepts.
const NAME_MAX: usize = 255;
/// Longest path (with its NUL) Linux accepts, so the bound of a symlink target.
const PATH_MAX: usize = 4096;

/// Why a member name cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum BadPath {
    /// It contains a `..` component (GNU tar refuses every such member).
    DotDot,
}

/// Cleans a member name as GNU tar does: strips leading `/`, drops `.` and empty
/// components (so `./a//b/` is `a/b`), and refuses names with a `..` component.
/// The empty result is the root.
pub fn clean_path(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, BadPath> {
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(BadPath::DotDot),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// A node while building: owns its metadata and, for directories, its children.
struct Node {
    kind: MemberKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    /// (seconds, nanoseconds); the mtime unless the member has its own.
    atime: (i64, u32),
    ctime: (i64, u32),
    size: u64,
    data: Data,
    rdev: u32,
    link: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    children: HashMap<Box<[u8]>, u32>,
    /// Created for a deeper member; no member names it.
    implicit: bool,
}

/// The in-memory tree of one pass: feed it members in archive order, then `finish`.
/// Used by the indexing pass and by the snapshot writer (which knows its offsets).
pub struct TreeBuilder<'a> {
    archive: &'a Path,
    nodes: Vec<Node>,
    skipped: u64,
    warned_absolute: bool,
}

const ROOT: u32 = 0;

impl<'a> TreeBuilder<'a> {
    /// A builder for `archive` (named in warnings); implicit directories get
    /// `archive_mtime_ns` as their mtime.
    pub fn new(archive: &'a Path, archive_mtime_ns: i64) -> Self {
        let root = Node {
            kind: MemberKind::Dir,
            mode: 0o755,
            // SAFETY-free: getuid/getgid cannot fail.
            uid: unsafe_ids().0,
            gid: unsafe_ids().1,
            mtime: archive_mtime_ns.div_euclid(1_000_000_000),
            mtime_nsec: archive_mtime_ns.rem_euclid(1_000_000_000) as u32,
            atime: root_time(archive_mtime_ns),
            ctime: root_time(archive_mtime_ns),
            size: 0,
            data: Data::Contiguous(0),
            rdev: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            children: HashMap::new(),
            implicit: true,
        };
        TreeBuilder {
            archive,
            nodes: vec![root],
            skipped: 0,
            warned_absolute: false,
        }
    }

    fn skip(&mut self, m: &Member, why: &str) {
        self.skipped += 1;
        log::warn!(
            "{}: skipping member {:?}: {why}",
            self.archive.display(),
            String::from_utf8_lossy(&m.path)
        );
    }

    fn implicit_dir(&self) -> Node {
        let root = &self.nodes[ROOT as usize];
        Node {
            kind: MemberKind::Dir,
            mode: 0o755,
            uid: root.uid,
            gid: root.gid,
            mtime: root.mtime,
            mtime_nsec: root.mtime_nsec,
            atime: (root.mtime, root.mtime_nsec),
            ctime: (root.mtime, root.mtime_nsec),
            size: 0,
            data: Data::Contiguous(0),
            rdev: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            children: HashMap::new(),
            implicit: true,
        }
    }

    /// Walks existing directories along `comps` without creating anything.
    fn resolve(&self, comps: &[&[u8]]) -> Option<u32> {
        let mut cur = ROOT;
        for c in comps {
            let node = &self.nodes[cur as usize];
            if node.kind != MemberKind::Dir {
                return None;
            }
            cur = *node.children.get(*c)?;
        }
        Some(cur)
    }

    /// Applies one member with GNU tar semantics (skips, with a warning, what tar refuses).
    pub fn add(&mut self, m: Member) {
        if m.path.first() == Some(&b'/') && !self.warned_absolute {
            self.warned_absolute = true;
            log::warn!(
                "{}: removing leading '/' from member names",
                self.archive.display()
            );
        }
        let raw = m.path.clone();
        let comps = match clean_path(&raw) {
            Ok(c) => c,
            Err(BadPath::DotDot) => return self.skip(&m, "its name contains '..'"),
        };
        // What Linux cannot name (GNU tar fails on these members and goes on): FUSE would
        // drop such a name from listings silently, or fail a readlink.
        if comps.iter().any(|c| c.len() > NAME_MAX) {
            return self.skip(&m, "a component of its name is longer than 255 bytes");
        }
        if m.kind == MemberKind::Symlink && m.link.len() >= PATH_MAX {
            return self.skip(&m, "its symlink target is longer than 4095 bytes");
        }
        // A hard link's target must exist before anything is created for it.
        let link_target = if m.kind == MemberKind::Hardlink {
            let target = match clean_path(&m.link) {
                Ok(t) => t,
                Err(BadPath::DotDot) => return self.skip(&m, "its link target contains '..'"),
            };
            match self.resolve(&target) {
                Some(t) if self.nodes[t as usize].kind != MemberKind::Dir => Some(t),
                Some(_) => return self.skip(&m, "it is a hard link to a directory"),
                None => return self.skip(&m, "its hard link target does not exist"),
            }
        } else {
            None
        };
        let Some((last, parents)) = comps.split_last() else {
            // The archive root itself (`./`).
            if m.kind == MemberKind::Dir {
                let root = &mut self.nodes[ROOT as usize];
                set_meta(root, &m);
            } else {
                self.skip(&m, "it names the archive root but is not a directory");
            }
            return;
        };
        // Walk the parents, creating missing ones; never through a symlink or file.
        let mut cur = ROOT;
        for (i, c) in parents.iter().enumerate() {
            match self.nodes[cur as usize].children.get(*c).copied() {
                Some(child) => match self.nodes[child as usize].kind {
                    MemberKind::Dir => cur = child,
                    MemberKind::Symlink => {
                        let p = String::from_utf8_lossy(&parents[..=i].join(&b'/')).into_owned();
                        return self.skip(
                            &m,
                            &format!("it would be created through the symlink {p:?}"),
                        );
                    }
                    _ => {
                        let p = String::from_utf8_lossy(&parents[..=i].join(&b'/')).into_owned();
                        return self.skip(&m, &format!("its parent {p:?} is not a directory"));
                    }
                },
                None => {
                    let id = self.push(self.implicit_dir());
                    self.nodes[cur as usize].children.insert((*c).into(), id);
                    cur = id;
                }
            }
        }
        let existing = self.nodes[cur as usize].children.get(*last).copied();
        if let Some(target) = link_target {
            if existing != Some(target) {
                self.nodes[cur as usize]
                    .children
                    .insert((*last).into(), target);
            }
            return;
        }
        if m.kind == MemberKind::Dir {
            if let Some(e) = existing {
                if self.nodes[e as usize].kind == MemberKind::Dir {
                    set_meta(&mut self.nodes[e as usize], &m);
                    return;
                }
            }
        }
        let node = self.node_from(m);
        let id = self.push(node);
        self.nodes[cur as usize].children.insert((*last).into(), id);
    }

    fn push(&mut self, n: Node) -> u32 {
        let id = self.nodes.len() as u32;
        self.nodes.push(n);
        id
    }

    fn node_from(&self, m: Member) -> Node {
        let mut n = self.implicit_dir();
        set_meta(&mut n, &m);
        n.kind = m.kind;
        n.size = match m.kind {
            MemberKind::File => m.size,
            MemberKind::Symlink => m.link.len() as u64,
            _ => 0,
        };
        n.rdev = if matches!(m.kind, MemberKind::Char | MemberKind::Block) {
            libc::makedev(m.dev_major, m.dev_minor) as u32
        } else {
            0
        };
        n.data = m.data;
        if m.kind == MemberKind::Symlink {
            n.link = m.link;
        }
        n
    }

    /// Numbers the reachable nodes breadth-first and lays out the records. The caller
    /// fills in `id`, `span_bytes`, `stream_size` and `table`.
    pub fn finish(self) -> Result<Index> {
        let too_big = || {
            Error::archive(
                self.archive,
                None,
                None,
                "archive has too many entries to index",
            )
        };
        let mut ino_of: Vec<u32> = vec![u32::MAX; self.nodes.len()];
        let mut order: Vec<u32> = Vec::new();
        let mut links: Vec<u32> = vec![0; self.nodes.len()];
        let mut queue = VecDeque::from([ROOT]);
        ino_of[ROOT as usize] = 1;
        order.push(ROOT);
        // Sorted children of each directory, in inode order.
        let mut sorted: Vec<Vec<(&[u8], u32)>> = Vec::new();
        let mut dir_slot: HashMap<u32, usize> = HashMap::new();
        while let Some(id) = queue.pop_front() {
            let node = &self.nodes[id as usize];
            let mut kids: Vec<(&[u8], u32)> =
                node.children.iter().map(|(k, v)| (&**k, *v)).collect();
            kids.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for &(_, child) in &kids {
                links[child as usize] += 1;
                if ino_of[child as usize] == u32::MAX {
                    let ino = u32::try_from(order.len() + 1).map_err(|_| too_big())?;
                    ino_of[child as usize] = ino;
                    order.push(child);
                    if self.nodes[child as usize].kind == MemberKind::Dir {
                        queue.push_back(child);
                    }
                }
            }
            dir_slot.insert(id, sorted.len());
            sorted.push(kids);
        }

        let mut index = Index {
            id: crate::archive::ArchiveId {
                size: 0,
                mtime_ns: 0,
                head_crc: 0,
                tail_crc: 0,
            },
            span_bytes: 0,
            stream_size: 0,
            table: std::sync::Arc::new(SeekTable::Plain),
            inodes: Vec::with_capacity(order.len()).into(),
            dirents: Vec::new().into(),
            names: Vec::new().into(),
            xattrs: Vec::new(),
            segments: Vec::new(),
            skipped: self.skipped,
            stat_blocks: None,
            lazy: None,
        };
        let mut arena = Arena { bytes: Vec::new() };
        for &id in &order {
            let node = &self.nodes[id as usize];
            let mut rec = InodeRecord {
                mode: type_bits(node.kind) | (node.mode & 0o7777),
                nlink: links[id as usize].max(1),
                uid: node.uid,
                gid: node.gid,
                mtime: node.mtime,
                mtime_nsec: node.mtime_nsec,
                atime: node.atime.0,
                atime_nsec: node.atime.1,
                ctime: node.ctime.0,
                ctime_nsec: node.ctime.1,
                rdev: node.rdev,
                size: node.size,
                flags: if node.implicit && node.kind == MemberKind::Dir {
                    FLAG_IMPLICIT
                } else {
                    0
                },
                ..Default::default()
            };
            match node.kind {
                MemberKind::Dir => {
                    let kids = &sorted[dir_slot[&id]];
                    rec.first = u32::try_from(index.dirents.len()).map_err(|_| too_big())?;
                    rec.count = u32::try_from(kids.len()).map_err(|_| too_big())?;
                    let mut subdirs = 0u32;
                    for &(name, child) in kids {
                        let (name_off, name_len) = arena.push(name).ok_or_else(too_big)?;
                        if self.nodes[child as usize].kind == MemberKind::Dir {
                            subdirs += 1;
                        }
                        index.dirents.to_mut().push(DirentRecord {
                            name_off,
                            name_len,
                            ino: ino_of[child as usize],
                        });
                    }
                    rec.nlink = 2 + subdirs;
                }
                MemberKind::Symlink => {
                    let (off, _) = arena.push(&node.link).ok_or_else(too_big)?;
                    rec.data = u64::from(off);
                }
                MemberKind::File => match &node.data {
                    Data::Contiguous(off) => rec.data = *off,
                    Data::Sparse(segs) => {
                        rec.flags |= FLAG_SPARSE;
                        rec.first = u32::try_from(index.segments.len()).map_err(|_| too_big())?;
                        rec.count = u32::try_from(segs.len()).map_err(|_| too_big())?;
                        index.segments.extend_from_slice(segs);
                    }
                },
                _ => {}
            }
            rec.xattr_first = u32::try_from(index.xattrs.len()).map_err(|_| too_big())?;
            rec.xattr_count = u32::try_from(node.xattrs.len()).map_err(|_| too_big())?;
            for (name, value) in &node.xattrs {
                let (name_off, name_len) = arena.push(name).ok_or_else(too_big)?;
                let (value_off, value_len) = arena.push(value).ok_or_else(too_big)?;
                index.xattrs.push(XattrRecord {
                    name_off,
                    name_len,
                    value_off,
                    value_len,
                });
            }
            index.inodes.to_mut().push(rec);
        }
        // Directory parents: each directory is the child of exactly one directory.
        for (pos, &id) in order.iter().enumerate() {
            if self.nodes[id as usize].kind == MemberKind::Dir {
                let first = index.inodes[pos].first as usize;
                let count = index.inodes[pos].count as usize;
                for d in first..first + count {
                    let child = index.dirents[d].ino as usize - 1;
                    if index.inodes[child].is_dir() {
                        index.inodes[child].parent = pos as u32 + 1;
                    }
                }
            }
        }
        index.inodes[0].parent = 1;
        index.names = arena.bytes.into();
        Ok(index)
    }
}

fn set_meta(n: &mut Node, m: &Member) {
    n.implicit = false;
    // Symlink permissions are always 0777 on Linux, whatever the archive says.
    n.mode = if m.kind == MemberKind::Symlink {
        0o777
    } else {
        m.mode & 0o7777
    };
    n.uid = clamp_id(m.uid);
    n.gid = clamp_id(m.gid);
    n.mtime = m.mtime;
    n.mtime_nsec = m.mtime_nsec;
    n.atime = m.atime.unwrap_or((m.mtime, m.mtime_nsec));
    n.ctime = m.ctime.unwrap_or((m.mtime, m.mtime_nsec));
    n.xattrs = m.xattrs.clone();
}

/// (seconds, nanoseconds) of a time in nanoseconds since the epoch.
fn root_time(ns: i64) -> (i64, u32) {
    (
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// Ids that do not fit 32 bits become `nobody` (65534), as the kernel would show them.
fn clamp_id(id: u64) -> u32 {
    u32::try_from(id).unwrap_or(65534)
}

fn unsafe_ids() -> (u32, u32) {
    // SAFETY: getuid/getgid take no arguments and always succeed.
    unsafe { (libc::getuid(), libc::getgid()) }
}

fn type_bits(kind: MemberKind) -> u32 {
    match kind {
        MemberKind::File | MemberKind::Hardlink => libc::S_IFREG,
        MemberKind::Dir => libc::S_IFDIR,
        MemberKind::Symlink => libc::S_IFLNK,
        MemberKind::Char => libc::S_IFCHR,
        MemberKind::Block => libc::S_IFBLK,
        MemberKind::Fifo => libc::S_IFIFO,
    }
}

struct Arena {
    bytes: Vec<u8>,
}

impl Arena {
    fn push(&mut self, b: &[u8]) -> Option<(u32, u32)> {
        let off = u32::try_from(self.bytes.len()).ok()?;
        let len = u32::try_from(b.len()).ok()?;
        u32::try_from(self.bytes.len() + b.len()).ok()?;
        self.bytes.extend_from_slice(b);
        Some((off, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::tar::Data;

    fn member(path: &str, kind: MemberKind) -> Member {
        Member {
            path: path.as_bytes().to_vec(),
            link: Vec::new(),
            kind,
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime: 100,
            mtime_nsec: 0,
            atime: None,
            ctime: None,
            size: 0,
            data: Data::Contiguous(0),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            header_offset: 0,
        }
    }

    fn names(index: &Index, ino: u64) -> Vec<String> {
        let rec = index.inode(ino).unwrap();
        index
            .children(rec)
            .iter()
            .map(|d| String::from_utf8_lossy(index.dirent_name(d)).into_owned())
            .collect()
    }

    fn lookup(index: &Index, path: &str) -> Option<u64> {
        let mut ino = 1u64;
        for c in path.split('/') {
            let rec = index.inode(ino)?;
            ino = u64::from(
                index
                    .children(rec)
                    .iter()
                    .find(|d| index.dirent_name(d) == c.as_bytes())?
                    .ino,
            );
        }
        Some(ino)
    }

    fn build(members: Vec<Member>) -> Index {
        let mut t = TreeBuilder::new(Path::new("x.tar"), 0);
        for m in members {
            t.add(m);
        }
        t.finish().unwrap()
    }

    #[test]
    fn cleans_paths_like_gnu_tar() {
        assert_eq!(clean_path(b"./a//b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert_eq!(
            clean_path(b"/etc/passwd").unwrap(),
            vec![&b"etc"[..], b"passwd"]
        );
        assert!(clean_path(b"a/../b").is_err());
        assert!(clean_path(b"..").is_err());
        assert!(clean_path(b"./").unwrap().is_empty());
    }

    #[test]
    fn implicit_parents_last_wins_and_late_dir_metadata() {
        let mut f1 = member("a/b/f", MemberKind::File);
        f1.size = 1;
        let mut f2 = member("./a/b/f", MemberKind::File);
        f2.size = 2;
        let mut d = member("a/", MemberKind::Dir);
        d.mode = 0o700;
        let idx = build(vec![f1, f2, d]);
        assert_eq!(names(&idx, 1), vec!["a"]);
        let a = lookup(&idx, "a").unwrap();
        assert_eq!(idx.inode(a).unwrap().mode & 0o7777, 0o700);
        let f = lookup(&idx, "a/b/f").unwrap();
        assert_eq!(idx.inode(f).unwrap().size, 2);
        assert_eq!(idx.inode(f).unwrap().nlink, 1);
    }

    #[test]
    fn type_change_replaces_and_dotdot_never_shadows() {
        let file = member("x", MemberKind::File);
        let dir = member("x", MemberKind::Dir);
        let evil = member("x/../x", MemberKind::File);
        let idx = build(vec![file, dir, evil]);
        let x = lookup(&idx, "x").unwrap();
        assert!(idx.inode(x).unwrap().is_dir());
        assert_eq!(idx.skipped, 1);
    }

    #[test]
    fn symlink_traversal_is_refused() {
        let mut link = member("link", MemberKind::Symlink);
        link.link = b"/etc".to_vec();
        let through = member("link/passwd", MemberKind::File);
        let idx = build(vec![link, through]);
        let l = lookup(&idx, "link").unwrap();
        assert_eq!(idx.inode(l).unwrap().file_type(), libc::S_IFLNK);
        assert_eq!(idx.arena(idx.inode(l).unwrap().data, 4), b"/etc");
        assert_eq!(idx.skipped, 1);
    }

    #[test]
    fn hardlinks_share_inodes_and_count() {
        let f = member("f", MemberKind::File);
        let mut h = member("h", MemberKind::Hardlink);
        h.link = b"./f".to_vec();
        let mut h2 = member("d/h2", MemberKind::Hardlink);
        h2.link = b"h".to_vec();
        let mut missing = member("m", MemberKind::Hardlink);
        missing.link = b"nope".to_vec();
        let idx = build(vec![f, h, h2, missing]);
        let (f, h, h2) = (
            lookup(&idx, "f").unwrap(),
            lookup(&idx, "h").unwrap(),
            lookup(&idx, "d/h2").unwrap(),
        );
        assert_eq!(f, h);
        assert_eq!(f, h2);
        assert_eq!(idx.inode(f).unwrap().nlink, 3);
        assert!(lookup(&idx, "m").is_none());
        // Overwriting the target keeps the link on the old inode.
        let f = member("f", MemberKind::File);
        let mut h = member("h", MemberKind::Hardlink);
        h.link = b"f".to_vec();
        let mut f2 = member("f", MemberKind::File);
        f2.size = 9;
        let idx = build(vec![f, h, f2]);
        let (f, h) = (lookup(&idx, "f").unwrap(), lookup(&idx, "h").unwrap());
        assert_ne!(f, h);
        assert_eq!(idx.inode(h).unwrap().nlink, 1);
        assert_eq!(idx.inode(f).unwrap().size, 9);
    }

    #[test]
    fn root_entry_sets_root_metadata() {
        let mut root = member("./", MemberKind::Dir);
        root.mode = 0o750;
        let idx = build(vec![root]);
        assert_eq!(idx.inodes[0].mode, libc::S_IFDIR | 0o750);
        assert_eq!(idx.inodes[0].parent, 1);
    }
}
