//! Cutting a snapshot from a view: the whole view (`--full`), or only what an upper
//! directory changed (a delta layer in OCI form). Both read every byte through the
//! view's [`Tree`], so partially written files are completed from the parent archives
//! and unchanged data streams straight from them, with no extraction to disk.
//!
//! Delta rules (OCI image-spec layer changesets): a deleted path becomes an empty
//! `.wh.NAME` file; a directory whose lower content is hidden (opaque, or a renamed
//! directory) gets a `.wh..wh..opq` entry and, when renamed, its whole view subtree;
//! every other changed path is written whole with the view's metadata and content
//! (a metadata-only change too, since a layer has no metadata-only entry).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::index::tree::{Attr, Tree};
use crate::index::ROOT_INO;
use crate::layers::{OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::snapshot::write::{EntryKind, SnapshotEntry, SnapshotWriter};
use crate::upper::layout::{Change, ChangeKind};

/// Reads a file of a tree sequentially (the data source of one entry).
struct TreeFile {
    tree: Arc<dyn Tree>,
    ino: u64,
    pos: u64,
    size: u64,
}

impl Read for TreeFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(1 << 20).min((self.size - self.pos) as usize) as u32;
        let data = self
            .tree
            .read(self.ino, self.pos, want)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if data.is_empty() {
            return Ok(0);
        }
        buf[..data.len()].copy_from_slice(&data);
        self.pos += data.len() as u64;
        Ok(data.len())
    }
}

/// Writes entries of a view, remembering hard-link identity.
struct Cutter<'a> {
    view: Arc<dyn Tree>,
    writer: &'a mut SnapshotWriter,
    /// View inode → first path written (files with several names).
    linked: HashMap<u64, Vec<u8>>,
    written: HashSet<Vec<u8>>,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

impl Cutter<'_> {
    /// The view inode at `path`, if it exists.
    fn resolve(&self, path: &[u8]) -> Result<Option<u64>> {
        let mut ino = ROOT_INO;
        for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            match self.view.lookup(ino, c) {
                Ok(i) => ino = i,
                Err(Error::Errno(libc::ENOENT)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(ino))
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let names = self.view.xattr_names(ino)?;
        let mut out = Vec::new();
        for n in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            out.push((n.to_vec(), self.view.xattr(ino, n)?));
        }
        Ok(out)
    }

    /// Writes the view entry `ino` at `path` (not its children).
    fn entry(&mut self, path: &[u8], ino: u64) -> Result<()> {
        if !self.written.insert(path.to_vec()) {
            return Ok(());
        }
        let a: Attr = self.view.attr(ino)?;
        let kind = match a.mode & libc::S_IFMT {
            libc::S_IFDIR => EntryKind::Dir,
            libc::S_IFLNK => EntryKind::Symlink,
            libc::S_IFCHR => EntryKind::Char,
            libc::S_IFBLK => EntryKind::Block,
            libc::S_IFIFO => EntryKind::Fifo,
            libc::S_IFREG => EntryKind::File,
            _ => {
                log::warn!(
                    "skipping {:?}: sockets cannot be archived",
                    String::from_utf8_lossy(path)
                );
                return Ok(());
            }
        };
        let mut e = SnapshotEntry::new(path.to_vec(), kind);
        e.mode = a.mode & 0o7777;
        e.uid = u64::from(a.uid);
        e.gid = u64::from(a.gid);
        e.mtime = a.mtime;
        e.mtime_nsec = a.mtime_nsec;
        e.atime = Some((a.atime, a.atime_nsec));
        e.ctime = Some((a.ctime, a.ctime_nsec));
        e.dev_major = libc::major(u64::from(a.rdev));
        e.dev_minor = libc::minor(u64::from(a.rdev));
        if kind != EntryKind::Symlink {
            e.xattrs = self.xattrs(ino)?;
        }
        match kind {
            EntryKind::Symlink => e.link = self.view.read_link(ino)?,
            EntryKind::File if a.nlink > 1 => {
                if let Some(first) = self.linked.get(&ino) {
                    e.kind = EntryKind::Hardlink;
                    e.link = first.clone();
                    return self.writer.add(e);
                }
                self.linked.insert(ino, path.to_vec());
            }
            _ => {}
        }
        if kind == EntryKind::File {
            e.size = a.size;
            e.data = Some(Box::new(TreeFile {
                tree: self.view.clone(),
                ino,
                pos: 0,
                size: a.size,
            }));
        }
        self.writer.add(e)
    }

    /// Writes `ino` at `path` and, for a directory, everything below it, depth first
    /// (each directory directly followed by its contents, as GNU tar writes and
    /// expects when it restores directory times).
    fn subtree(&mut self, path: &[u8], ino: u64) -> Result<()> {
        let mut stack = vec![(path.to_vec(), ino)];
        while let Some((p, node)) = stack.pop() {
            self.entry(&p, node)?;
            if self.view.attr(node)?.mode & libc::S_IFMT != libc::S_IFDIR {
                continue;
            }
            let mut kids = Vec::new();
            self.view.read_dir(node, 2, &mut |_, name, child, _| {
                kids.push((join(&p, name), child));
                false
            })?;
            stack.extend(kids.into_iter().rev());
        }
        Ok(())
    }

    fn marker(&mut self, path: Vec<u8>) -> Result<()> {
        if !self.written.insert(path.clone()) {
            return Ok(());
        }
        let mut e = SnapshotEntry::new(path, EntryKind::File);
        e.mode = 0o644;
        e.data = Some(Box::new(io::empty()));
        self.writer.add(e)
    }
}

/// Writes the whole view into `writer`.
pub fn cut_full(view: Arc<dyn Tree>, writer: &mut SnapshotWriter) -> Result<()> {
    let mut c = Cutter {
        view,
        writer,
        linked: HashMap::new(),
        written: HashSet::new(),
    };
    c.subtree(b"", ROOT_INO)
}

/// Writes the delta layer of `changes` (from [`crate::upper::changes`]) into `writer`,
/// reading content and metadata through `view`.
pub fn cut_delta(
    view: Arc<dyn Tree>,
    changes: &[Change],
    writer: &mut SnapshotWriter,
) -> Result<()> {
    let mut c = Cutter {
        view,
        writer,
        linked: HashMap::new(),
        written: HashSet::new(),
    };
    // Depth-first order: every directory directly followed by its contents.
    let mut ordered: Vec<&Change> = changes.iter().collect();
    ordered.sort_by(|a, b| {
        a.path
            .split(|&x| x == b'/')
            .cmp(b.path.split(|&x| x == b'/'))
    });
    for ch in ordered {
        match &ch.kind {
            ChangeKind::Deleted => {
                let (dir, name) = split(&ch.path);
                c.marker(join(dir, &[WHITEOUT_PREFIX, name].concat()))?;
            }
            ChangeKind::Dir { opaque, origin } => {
                let Some(ino) = c.resolve(&ch.path)? else {
                    continue;
                };
                c.entry(&ch.path, ino)?;
                if *opaque || origin.is_some() {
                    c.marker(join(&ch.path, OPAQUE_MARKER))?;
                }
                if origin.is_some() {
                    c.subtree(&ch.path, ino)?;
                }
            }
            ChangeKind::File | ChangeKind::Partial { .. } | ChangeKind::Other => {
                if let Some(ino) = c.resolve(&ch.path)? {
                    c.entry(&ch.path, ino)?;
                }
            }
        }
    }
    Ok(())
}
