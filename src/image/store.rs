//! Where an image's files are, told from content (never from names): an OCI layout
//! directory (`oci-layout`, `index.json`, `blobs/`), or one plain tar holding such a
//! layout (an OCI archive) or a `docker save` (`manifest.json` plus layer tars; Docker
//! 25+ writes both `manifest.json` and `index.json`). Files are looked up by cleaned
//! relative path; a file inside an outer tar is a byte range of it ([`RangeSource`]),
//! found through the outer tar's snapfs index (plain tar indexing parses only headers,
//! and the index is kept like any other, so it is built once).
//!
//! Paths come from hostile JSON: `..`, absolute paths and NUL are refused, symlinks
//! are followed only within the image (a few hops), and in a layout directory the
//! final file must still lie under the layout after symlinks are resolved.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::tar::{FileStream, MemberReader};
use crate::archive::{Archive, Compression};
use crate::error::{Error, Result};
use crate::index::build::BuildOptions;
use crate::index::{store as index_store, Index, InodeRecord, FLAG_SPARSE, ROOT_INO};
use crate::source::{BlobSource, FileSource, RangeSource, Source, SourceReader};

use super::digest::Digest;

/// What kind of image an input holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An OCI image layout (`index.json`); Docker 25+ saves are read this way.
    Oci,
    /// A `docker save` archive of the old layout (`manifest.json` only).
    DockerSave,
}

/// The files of one image input.
pub enum Store {
    /// An OCI layout directory (canonical path).
    Dir {
        /// The layout's canonical path.
        root: PathBuf,
    },
    /// A plain tar holding the image.
    Tar {
        /// The outer file.
        outer: Arc<dyn Source>,
        /// Its index (member names → stream offsets).
        index: Arc<Index>,
    },
}

/// A file of the image: where it is and how big.
struct Found {
    /// Directory: the file's path. Tar: unused.
    path: PathBuf,
    /// Tar: offset of the data in the outer file.
    offset: u64,
    size: u64,
}

/// Most symlinks followed to find one file.
const MAX_HOPS: usize = 16;

/// Names of a first tar member that make an outer tar worth a look as an image: what
/// skopeo, buildah, podman and docker write first (`blobs/`, `<hex>/`, `<hex>.tar`,
/// `<hex>.json`, ...). A tar starting otherwise is an archive, so a plain rootfs tar is
/// told apart by one header, without indexing it first.
fn image_like_first(name: &[u8]) -> bool {
    let name = name.strip_prefix(b"./").unwrap_or(name);
    let first = name.split(|&b| b == b'/').next().unwrap_or(b"");
    let hex_named = |s: &[u8]| {
        let stem = s
            .strip_suffix(b".tar")
            .or_else(|| s.strip_suffix(b".json"))
            .unwrap_or(s);
        stem.len() == 64 && stem.iter().all(u8::is_ascii_hexdigit)
    };
    matches!(
        first,
        b"oci-layout" | b"index.json" | b"manifest.json" | b"repositories" | b"blobs"
    ) || hex_named(first)
}

/// Whether the first real member (past a leading `./`) of a plain tar has an
/// image-like name. Anything unreadable is "no": the archive code reports it.
fn looks_like_image_tar(source: &Arc<dyn Source>, name: &Path) -> bool {
    let mut reader = MemberReader::new(FileStream::new(SourceReader::new(source.clone())), name);
    for _ in 0..3 {
        match reader.next_member() {
            Ok(Some(m)) => {
                let p = m.path.strip_prefix(b"./").unwrap_or(&m.path);
                let p = p.strip_suffix(b"/").unwrap_or(p);
                if p.is_empty() || p == b"." {
                    continue;
                }
                return image_like_first(p);
            }
            _ => return false,
        }
    }
    false
}

/// Splits a relative path from the image into clean components; `None` if it is
/// absolute, has a `..`, a NUL, or no components.
fn components(rel: &str) -> Option<Vec<&str>> {
    if rel.starts_with('/') || rel.contains('\0') {
        return None;
    }
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(parts)
}

impl Store {
    /// Opens `path` as an image if its content says it is one: `Ok(None)` for an
    /// archive (or anything else the archive code should judge).
    pub fn probe(path: &Path) -> Result<Option<(Store, Kind)>> {
        if crate::source::is_remote(path) {
            // An object is one file: an OCI archive or docker save tar, read by ranges
            // (a layout directory cannot be remote).
            return Store::probe_tar(crate::source::open(path)?, path);
        }
        let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot open", path, e))?;
        if meta.is_dir() {
            let root =
                std::fs::canonicalize(path).map_err(|e| Error::io("cannot open", path, e))?;
            let store = Store::Dir { root };
            return match store.kind(path)? {
                Some(kind) => Ok(Some((store, kind))),
                None => Err(Error::NotA {
                    path: path.to_path_buf(),
                    expected: "container image or archive",
                    detail: Some(
                        "a directory without oci-layout + index.json or manifest.json".into(),
                    ),
                }),
            };
        }
        if !meta.is_file() {
            return Ok(None);
        }
        Store::probe_tar(Arc::new(FileSource::open(path)?), path)
    }

    /// Opens one file (local or remote) as an image archive if its content says it is
    /// one: a plain tar whose first member is image-like and whose files form a layout.
    pub fn probe_tar(source: Arc<dyn Source>, path: &Path) -> Result<Option<(Store, Kind)>> {
        let mut head = [0u8; crate::archive::DETECT_BYTES];
        let n = source
            .read_at(&mut head, 0)
            .map_err(|e| Error::io("reading", path, e))?;
        if Compression::detect(&head[..n]) != Compression::None
            || !looks_like_image_tar(&source, path)
        {
            return Ok(None);
        }
        let archive = Archive::from_source(source.clone())?;
        let (index, _) = index_store::load_or_build(
            &archive,
            &BuildOptions::default(),
            None,
            false,
            &Default::default(),
        )?;
        let store = Store::Tar {
            outer: source,
            index: Arc::new(index),
        };
        Ok(store.kind(path)?.map(|k| (store, k)))
    }

    /// Which image layout the files form, if any.
    fn kind(&self, image: &Path) -> Result<Option<Kind>> {
        let is_file = |rel: &str| -> Result<bool> { Ok(self.find(image, rel)?.is_some()) };
        if is_file("oci-layout")? && is_file("index.json")? {
            return Ok(Some(Kind::Oci));
        }
        if is_file("manifest.json")? {
            // A rootfs tar may hold a manifest.json of its own: only a JSON array of
            // objects is docker save's.
            let bytes = self.read(image, "manifest.json", super::MAX_JSON)?;
            let array = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.as_array().map(|a| a.iter().all(|e| e.is_object())));
            if array == Some(true) {
                return Ok(Some(Kind::DockerSave));
            }
        }
        Ok(None)
    }

    /// The regular file at `rel`, if there is one.
    fn find(&self, image: &Path, rel: &str) -> Result<Option<Found>> {
        let bad = || {
            Error::image(
                image,
                format!("refusing the path {rel:?} (absolute or with ..)"),
            )
        };
        let parts = components(rel).ok_or_else(bad)?;
        match self {
            Store::Dir { root } => {
                let joined = parts.iter().fold(root.clone(), |p, c| p.join(c));
                let real = match std::fs::canonicalize(&joined) {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(Error::io("cannot open", &joined, e)),
                };
                if !real.starts_with(root) {
                    return Err(Error::image(
                        image,
                        format!(
                            "{rel} leads outside the layout (a symlink to {})",
                            real.display()
                        ),
                    ));
                }
                match std::fs::metadata(&real) {
                    Ok(m) if m.is_file() => Ok(Some(Found {
                        path: real,
                        offset: 0,
                        size: m.len(),
                    })),
                    Ok(_) => Ok(None),
                    Err(e) => Err(Error::io("cannot open", &real, e)),
                }
            }
            Store::Tar { index, .. } => {
                let mut want: Vec<Vec<u8>> = parts.iter().map(|c| c.as_bytes().to_vec()).collect();
                for _ in 0..MAX_HOPS {
                    match tar_lookup(index, &want) {
                        Lookup::Missing => return Ok(None),
                        Lookup::File(rec) => {
                            if rec.flags & FLAG_SPARSE != 0 {
                                return Err(Error::image(
                                    image,
                                    format!("{rel} is a sparse member; blobs must be stored whole"),
                                ));
                            }
                            return Ok(Some(Found {
                                path: PathBuf::new(),
                                offset: rec.data,
                                size: rec.size,
                            }));
                        }
                        Lookup::Link(depth, target) => {
                            // Resolve relative to the link's directory, within the tar.
                            let mut next: Vec<Vec<u8>> = if target.starts_with(b"/") {
                                Vec::new()
                            } else {
                                want[..depth].to_vec()
                            };
                            for c in target.split(|&b| b == b'/') {
                                match c {
                                    b"" | b"." => {}
                                    b".." => {
                                        if next.pop().is_none() {
                                            return Err(bad());
                                        }
                                    }
                                    c => next.push(c.to_vec()),
                                }
                            }
                            next.extend(want.drain(..).skip(depth + 1));
                            want = next;
                        }
                    }
                }
                Err(Error::image(image, format!("{rel}: too many symlinks")))
            }
        }
    }

    /// The size of the file at `rel`, if it exists.
    pub fn size(&self, image: &Path, rel: &str) -> Result<Option<u64>> {
        Ok(self.find(image, rel)?.map(|f| f.size))
    }

    /// All of the (small) file at `rel`; refused past `cap` bytes or if missing.
    pub fn read(&self, image: &Path, rel: &str, cap: u64) -> Result<Vec<u8>> {
        let found = self
            .find(image, rel)?
            .ok_or_else(|| Error::image(image, format!("{rel} is missing")))?;
        if found.size > cap {
            return Err(Error::image(
                image,
                format!(
                    "{rel} is {} bytes; JSON over {cap} bytes is refused",
                    found.size
                ),
            ));
        }
        let source = self.open_found(image, rel, &found, None)?;
        // One read of the whole file: a remote source then fetches its block(s), where
        // a stream of small reads would look sequential and start a read-ahead.
        let mut out = vec![0u8; found.size as usize];
        source
            .read_exact_at(&mut out, 0)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    Error::image(image, format!("{rel} is truncated"))
                }
                _ => Error::io("reading", image.join(rel), e),
            })?;
        Ok(out)
    }

    /// The file at `rel` as a source, identified by `digest` when it is known (so its
    /// index is keyed by the digest and shared between images).
    pub fn open(
        &self,
        image: &Path,
        rel: &str,
        digest: Option<&Digest>,
    ) -> Result<Option<(Arc<dyn Source>, u64)>> {
        let Some(found) = self.find(image, rel)? else {
            return Ok(None);
        };
        let size = found.size;
        Ok(Some((self.open_found(image, rel, &found, digest)?, size)))
    }

    fn open_found(
        &self,
        image: &Path,
        rel: &str,
        found: &Found,
        digest: Option<&Digest>,
    ) -> Result<Arc<dyn Source>> {
        match self {
            Store::Dir { .. } => {
                let file: Arc<dyn Source> = Arc::new(FileSource::open(&found.path)?);
                Ok(match digest {
                    Some(d) => {
                        let mut name = image.as_os_str().to_os_string();
                        name.push(format!("@{d}"));
                        Arc::new(BlobSource::new(file, d.to_string(), PathBuf::from(name)))
                    }
                    None => file,
                })
            }
            Store::Tar { outer, .. } => {
                let range = RangeSource::new(
                    outer.clone(),
                    found.offset,
                    found.size,
                    digest.map(Digest::to_string),
                )
                .ok_or_else(|| {
                    Error::image(image, format!("{rel} lies past the end of the file"))
                })?;
                Ok(Arc::new(range))
            }
        }
    }
}

enum Lookup<'a> {
    Missing,
    File(&'a InodeRecord),
    /// A symlink at component `depth` with this target.
    Link(usize, Vec<u8>),
}

/// Walks `parts` through the outer tar's index.
fn tar_lookup<'a>(index: &'a Index, parts: &[Vec<u8>]) -> Lookup<'a> {
    let mut ino = ROOT_INO;
    for (depth, name) in parts.iter().enumerate() {
        let Ok(kids) = index.entries(ino) else {
            return Lookup::Missing;
        };
        let Ok(i) = kids.binary_search_by(|d| index.dirent_name(d).cmp(name.as_slice())) else {
            return Lookup::Missing;
        };
        let Some(rec) = kids.get(i).and_then(|d| index.inode(u64::from(d.ino))) else {
            return Lookup::Missing;
        };
        ino = u64::from(kids[i].ino);
        match rec.file_type() {
            libc::S_IFLNK => {
                return Lookup::Link(depth, index.arena(rec.data, rec.size).to_vec());
            }
            libc::S_IFDIR => {}
            libc::S_IFREG if depth + 1 == parts.len() => return Lookup::File(rec),
            _ => return Lookup::Missing,
        }
    }
    Lookup::Missing
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test member: name, file data, symlink target (neither: a directory).
    type Entry<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);

    fn tar_of(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            match (data, link) {
                (Some(d), _) => {
                    h.set_size(d.len() as u64);
                    h.set_cksum();
                    b.append_data(&mut h, name, *d).unwrap();
                }
                (None, Some(l)) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, name, l).unwrap();
                }
                (None, None) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_cksum();
                    b.append_data(&mut h, name, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn members_of_an_outer_tar_are_byte_ranges_and_symlinks_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let hex = "a".repeat(64);
        let layer = format!("{hex}.tar");
        let linked = format!("{}/layer.tar", "b".repeat(64));
        let bytes = tar_of(&[
            (&layer, Some(b"LAYER-BYTES"), None),
            (&"b".repeat(64), None, None),
            (&linked, None, Some(&format!("../{layer}"))),
            ("escape", None, Some("../../etc/passwd")),
            (
                "manifest.json",
                Some(b"[{\"Config\":\"c.json\",\"Layers\":[]}]"),
                None,
            ),
        ]);
        let path = dir.path().join("save.tar");
        std::fs::write(&path, &bytes).unwrap();
        let (store, kind) = Store::probe(&path).unwrap().unwrap();
        assert_eq!(kind, Kind::DockerSave);
        let (src, size) = store.open(&path, &linked, None).unwrap().unwrap();
        assert_eq!(size, 11);
        let mut buf = vec![0u8; 11];
        src.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, b"LAYER-BYTES");
        let off = bytes.windows(11).position(|w| w == b"LAYER-BYTES").unwrap();
        assert_eq!(
            src.name(),
            PathBuf::from(format!("{}@{off}+11", path.display()))
        );
        let e = store.open(&path, "escape", None).err().unwrap().to_string();
        assert!(e.contains("refusing the path"), "{e}");
        assert!(store.open(&path, "missing", None).unwrap().is_none());
        assert!(store.read(&path, &layer, 4).is_err(), "cap");
        // A rootfs tar is an archive, judged by its first header only.
        let plain = dir.path().join("rootfs.tar");
        std::fs::write(
            &plain,
            tar_of(&[("bin", None, None), ("manifest.json", Some(b"[]"), None)]),
        )
        .unwrap();
        assert!(Store::probe(&plain).unwrap().is_none());
    }

    #[test]
    fn first_member_names_and_path_cleaning() {
        assert!(image_like_first(b"blobs/"));
        assert!(image_like_first(b"./index.json"));
        assert!(image_like_first(
            &[b"a".repeat(64), b".tar".to_vec()].concat()
        ));
        assert!(image_like_first(
            &[b"0".repeat(64), b"/VERSION".to_vec()].concat()
        ));
        assert!(!image_like_first(b"bin/sh"));
        assert!(!image_like_first(b"etc"));
        assert_eq!(components("a//./b"), Some(vec!["a", "b"]));
        assert_eq!(components("../x"), None);
        assert_eq!(components("a/../../x"), None);
        assert_eq!(components("/etc/passwd"), None);
        assert_eq!(components(""), None);
    }
}
