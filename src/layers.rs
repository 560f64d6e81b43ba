//! Stacks trees as OCI layers (last on top) into one merged tree, computed once at
//! mount so a lookup never probes every layer. Implements the OCI image-spec rules:
//! `.wh.NAME` hides NAME in lower layers, `.wh..wh..opq` makes a directory opaque,
//! whiteout entries are never shown, a non-directory in an upper layer replaces a
//! lower directory (and vice versa), and directories present in several layers merge
//! with the topmost one's metadata.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::index::tree::{Attr, DirSink, FsStats, ReadBytes, Tree};
use crate::index::ROOT_INO;

/// Prefix of whiteout entries.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// One merged inode: where its content comes from.
#[derive(Debug, Clone, Copy)]
struct Node {
    layer: u32,
    ino: u64,
    /// Merged parent (directories).
    parent: u32,
    /// Directories: range in `dirents`.
    first: u32,
    count: u32,
    subdirs: u32,
    dir: bool,
}

#[derive(Debug, Clone, Copy)]
struct Dirent {
    name_off: u32,
    name_len: u32,
    ino: u32,
}

/// The union of several trees.
pub struct LayeredTree {
    layers: Vec<Box<dyn Tree>>,
    nodes: Vec<Node>,
    dirents: Vec<Dirent>,
    names: Vec<u8>,
    /// Names referring to each node (the merged link count of non-directories).
    links: Vec<u32>,
}

/// The source whose metadata a merged directory shows: the topmost one the archive
/// lists explicitly (a parent implied by a deeper member must not override it).
fn metadata_source(t: &LayeredTree, sources: &[(u32, u64)]) -> Result<(u32, u64)> {
    for &(layer, ino) in sources {
        if !t.layers[layer as usize].attr(ino)?.implicit {
            return Ok((layer, ino));
        }
    }
    Ok(sources[0])
}

/// A listing of one directory of one layer.
struct Listing {
    entries: Vec<(Vec<u8>, u64, bool)>,
    whiteouts: Vec<Vec<u8>>,
    opaque: bool,
}

fn list(tree: &dyn Tree, ino: u64) -> Result<Listing> {
    let mut out = Listing {
        entries: Vec::new(),
        whiteouts: Vec::new(),
        opaque: false,
    };
    tree.read_dir(ino, 2, &mut |_, name, child, mode| {
        if name == OPAQUE_MARKER {
            out.opaque = true;
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            out.whiteouts.push(hidden.to_vec());
        } else {
            out.entries
                .push((name.to_vec(), child, mode == libc::S_IFDIR));
        }
        false
    })?;
    Ok(out)
}

enum Decision {
    /// A directory and its sources, top first; `closed` once a lower layer had a
    /// non-directory under this name (which hides everything below it).
    Dir(Vec<(u32, u64)>, bool),
    Leaf(u32, u64),
}

impl LayeredTree {
    /// Merges `layers` (bottom first, last on top).
    pub fn new(layers: Vec<Box<dyn Tree>>) -> Result<LayeredTree> {
        if layers.is_empty() {
            return Err(Error::Usage("no layers to stack".into()));
        }
        let mut t = LayeredTree {
            layers,
            nodes: Vec::new(),
            dirents: Vec::new(),
            names: Vec::new(),
            links: vec![1],
        };
        let top = (t.layers.len() - 1) as u32;
        let root_sources: Vec<(u32, u64)> = (0..=top).rev().map(|l| (l, ROOT_INO)).collect();
        t.nodes.push(Node {
            layer: top,
            ino: ROOT_INO,
            parent: 1,
            first: 0,
            count: 0,
            subdirs: 0,
            dir: true,
        });
        // Breadth-first: (merged index, sources top-first).
        let mut queue = std::collections::VecDeque::from([(0usize, root_sources)]);
        let mut leaf_ino: HashMap<(u32, u64), u32> = HashMap::new();
        while let Some((dir, sources)) = queue.pop_front() {
            let mut decided: Vec<(Vec<u8>, Decision)> = Vec::new();
            let mut position: HashMap<Vec<u8>, usize> = HashMap::new();
            let mut hidden: HashSet<Vec<u8>> = HashSet::new();
            for (layer, ino) in sources {
                let listing = list(&*t.layers[layer as usize], ino)?;
                for (name, child, is_dir) in listing.entries {
                    if hidden.contains(&name) {
                        continue;
                    }
                    match position.get(&name) {
                        None => {
                            position.insert(name.clone(), decided.len());
                            let d = if is_dir {
                                Decision::Dir(vec![(layer, child)], false)
                            } else {
                                Decision::Leaf(layer, child)
                            };
                            decided.push((name, d));
                        }
                        Some(&i) => match &mut decided[i].1 {
                            Decision::Dir(v, false) if is_dir => v.push((layer, child)),
                            Decision::Dir(_, closed) => *closed = true,
                            Decision::Leaf(..) => {}
                        },
                    }
                }
                hidden.extend(listing.whiteouts);
                if listing.opaque {
                    break;
                }
            }
            decided.sort_by(|a, b| a.0.cmp(&b.0));
            let first = t.dirents.len() as u32;
            let mut subdirs = 0;
            for (name, d) in decided {
                let ino = match d {
                    Decision::Leaf(layer, ino) => {
                        *leaf_ino.entry((layer, ino)).or_insert_with(|| {
                            t.links.push(0);
                            t.nodes.push(Node {
                                layer,
                                ino,
                                parent: 0,
                                first: 0,
                                count: 0,
                                subdirs: 0,
                                dir: false,
                            });
                            t.nodes.len() as u32
                        })
                    }
                    Decision::Dir(sources, _) => {
                        subdirs += 1;
                        let (layer, ino) = metadata_source(&t, &sources)?;
                        t.links.push(0);
                        t.nodes.push(Node {
                            layer,
                            ino,
                            parent: dir as u32 + 1,
                            first: 0,
                            count: 0,
                            subdirs: 0,
                            dir: true,
                        });
                        queue.push_back((t.nodes.len() - 1, sources));
                        t.nodes.len() as u32
                    }
                };
                if let Some(links) = t.links.get_mut(ino as usize - 1) {
                    *links += 1;
                }
                let name_off = u32::try_from(t.names.len()).map_err(|_| too_big())?;
                t.names.extend_from_slice(&name);
                t.dirents.push(Dirent {
                    name_off,
                    name_len: name.len() as u32,
                    ino,
                });
            }
            let node = &mut t.nodes[dir];
            node.first = first;
            node.count = t.dirents.len() as u32 - first;
            node.subdirs = subdirs;
        }
        Ok(t)
    }

    fn node(&self, ino: u64) -> Result<&Node> {
        usize::try_from(ino)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.nodes.get(i))
            .ok_or(Error::Errno(libc::ENOENT))
    }

    fn layer(&self, n: &Node) -> &dyn Tree {
        &*self.layers[n.layer as usize]
    }

    fn children(&self, n: &Node) -> &[Dirent] {
        &self.dirents[n.first as usize..(n.first + n.count) as usize]
    }

    fn name(&self, d: &Dirent) -> &[u8] {
        &self.names[d.name_off as usize..(d.name_off + d.name_len) as usize]
    }
}

fn too_big() -> Error {
    Error::Usage("merged tree has too many names".into())
}

impl Tree for LayeredTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        let n = self.node(ino)?;
        let mut a = self.layer(n).attr(n.ino)?;
        a.ino = ino;
        if n.dir {
            a.nlink = 2 + n.subdirs;
        } else {
            a.nlink = self.links[ino as usize - 1].max(1);
        }
        Ok(a)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        let n = self.node(parent)?;
        if !n.dir {
            return Err(Error::Errno(libc::ENOTDIR));
        }
        let kids = self.children(n);
        kids.binary_search_by(|d| self.name(d).cmp(name))
            .map(|i| u64::from(kids[i].ino))
            .map_err(|_| Error::Errno(libc::ENOENT))
    }

    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        let n = self.node(ino)?;
        if !n.dir {
            return Err(Error::Errno(libc::ENOTDIR));
        }
        let mut off = offset;
        if off == 0 {
            if sink(1, b".", ino, libc::S_IFDIR) {
                return Ok(());
            }
            off = 1;
        }
        if off == 1 {
            if sink(2, b"..", u64::from(n.parent), libc::S_IFDIR) {
                return Ok(());
            }
            off = 2;
        }
        let start = usize::try_from(off - 2).unwrap_or(usize::MAX);
        for (i, d) in self.children(n).iter().enumerate().skip(start) {
            let child = u64::from(d.ino);
            let c = self.node(child)?;
            let kind = self.layer(c).attr(c.ino)?.mode & libc::S_IFMT;
            if sink(i as u64 + 3, self.name(d), child, kind) {
                break;
            }
        }
        Ok(())
    }

    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        let n = self.node(ino)?;
        self.layer(n).read_link(n.ino)
    }

    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        let n = self.node(ino)?;
        self.layer(n).xattr_names(n.ino)
    }

    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let n = self.node(ino)?;
        self.layer(n).xattr(n.ino, name)
    }

    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes> {
        let n = self.node(ino)?;
        self.layer(n).read(n.ino, offset, size)
    }

    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        let n = self.node(ino)?;
        self.layer(n).seek_data(n.ino, offset, data)
    }

    fn stats(&self) -> FsStats {
        let mut s = FsStats {
            blocks: 0,
            files: self.nodes.len() as u64,
        };
        for l in &self.layers {
            // A layer's count saturates at u64::MAX for hostile indexes; so does the sum.
            s.blocks = s.blocks.saturating_add(l.stats().blocks);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{Archive, StreamReader};
    use crate::index::build::{build_index, BuildOptions};
    use crate::index::tree::IndexTree;
    use std::sync::Arc;

    /// (path, kind 'f'/'d'/'l'/'h', content or link target)
    fn layer(dir: &std::path::Path, name: &str, entries: &[(&str, char, &str)]) -> Box<dyn Tree> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(if *kind == 'd' { 0o755 } else { 0o644 });
            h.set_mtime(1);
            match kind {
                'f' => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(content.len() as u64);
                    b.append_data(&mut h, path, content.as_bytes()).unwrap();
                }
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
                'l' | 'h' => {
                    h.set_entry_type(if *kind == 'l' {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_size(0);
                    b.append_link(&mut h, path, content).unwrap();
                }
                _ => unreachable!(),
            }
        }
        let path = dir.join(name);
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let archive = Archive::open(&path).unwrap();
        let index = build_index(&archive, &BuildOptions::default(), &Default::default()).unwrap();
        let stream = StreamReader::new(archive.source, index.table.clone(), 1 << 20);
        Box::new(IndexTree::new(Arc::new(index), stream))
    }

    fn resolve(t: &dyn Tree, path: &str) -> Option<u64> {
        let mut ino = ROOT_INO;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            ino = t.lookup(ino, c.as_bytes()).ok()?;
        }
        Some(ino)
    }

    fn content(t: &dyn Tree, path: &str) -> String {
        let ino = resolve(t, path).unwrap();
        String::from_utf8(t.read(ino, 0, 1 << 20).unwrap().into_vec()).unwrap()
    }

    fn names(t: &dyn Tree, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.read_dir(resolve(t, path).unwrap(), 2, &mut |_, n, _, _| {
            out.push(String::from_utf8_lossy(n).into_owned());
            false
        })
        .unwrap();
        out
    }

    /// Layers whose block counts saturated (hostile indexes) must not overflow the sum.
    #[test]
    fn stats_of_layers_with_saturated_block_counts_do_not_overflow() {
        let layers: Vec<Box<dyn Tree>> = (0..2)
            .map(|_| Box::new(crate::index::tree::huge_files_tree(600)) as Box<dyn Tree>)
            .collect();
        let merged = LayeredTree::new(layers).unwrap();
        assert_eq!(merged.stats().blocks, u64::MAX);
    }

    #[test]
    fn oci_rules() {
        let d = tempfile::tempdir().unwrap();
        let base = layer(
            d.path(),
            "base.tar",
            &[
                ("etc/", 'd', ""),
                ("etc/a", 'f', "base-a"),
                ("etc/b", 'f', "base-b"),
                ("opq/", 'd', ""),
                ("opq/old", 'f', "old"),
                ("x", 'f', "file-x"),
                ("y/", 'd', ""),
                ("y/inner", 'f', "inner"),
                ("h1", 'f', "shared"),
                ("h2", 'h', "h1"),
            ],
        );
        let delta = layer(
            d.path(),
            "delta.tar",
            &[
                ("etc/.wh.a", 'f', ""),
                ("etc/c", 'f', "delta-c"),
                ("etc/b", 'f', "delta-b"),
                ("opq/.wh..wh..opq", 'f', ""),
                ("opq/new", 'f', "new"),
                ("x/", 'd', ""),
                ("x/sub", 'f', "sub"),
                ("y", 'l', "x"),
                (".wh.gone", 'f', ""),
            ],
        );
        let t = LayeredTree::new(vec![base, delta]).unwrap();
        assert_eq!(names(&t, "etc"), vec!["b", "c"]);
        assert_eq!(content(&t, "etc/b"), "delta-b");
        assert_eq!(names(&t, "opq"), vec!["new"]);
        assert_eq!(names(&t, "x"), vec!["sub"]);
        assert_eq!(t.read_link(resolve(&t, "y").unwrap()).unwrap(), b"x");
        assert!(resolve(&t, "y/inner").is_none());
        assert_eq!(resolve(&t, "h1"), resolve(&t, "h2"));
        assert_eq!(t.attr(resolve(&t, "h1").unwrap()).unwrap().nlink, 2);
        assert_eq!(names(&t, ""), vec!["etc", "h1", "h2", "opq", "x", "y"]);
        assert_eq!(t.attr(ROOT_INO).unwrap().nlink, 2 + 3);
    }

    #[test]
    fn many_layers_merge_directories() {
        let d = tempfile::tempdir().unwrap();
        let mut layers = Vec::new();
        for i in 0..20 {
            let f = format!("shared/f{i:02}");
            let body = format!("layer{i}");
            layers.push(layer(
                d.path(),
                &format!("l{i}.tar"),
                &[
                    ("shared/", 'd', ""),
                    (f.as_str(), 'f', body.as_str()),
                    ("top", 'f', body.as_str()),
                ],
            ));
        }
        let t = LayeredTree::new(layers).unwrap();
        assert_eq!(names(&t, "shared").len(), 20);
        assert_eq!(content(&t, "top"), "layer19");
        assert_eq!(content(&t, "shared/f03"), "layer3");
    }
}
