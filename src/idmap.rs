//! uid/gid mapping of a view: [`IdMap`] (parsed from `--uid-map`/`--gid-map` in the
//! `container:host:count` form of user-namespace maps, or `--owner UID:GID`) and
//! [`MappedTree`], a [`Tree`] wrapper that presents archive-side ids as mapped ids and
//! maps ids coming in from the kernel (chown, the creator of a new entry, POSIX ACL
//! xattrs) back to archive-side ids. Everything below the wrapper, the upper dir
//! included, only ever sees archive-side ids, so a snapshot cut from a mapped view
//! records the archive's ownership.
//!
//! Rules, as the kernel applies them to user namespaces and idmapped mounts:
//!
//! - a range `c:h:n` presents archive ids `c..c+n` as `h..h+n`; an archive id outside
//!   every range is shown as the overflow id 65534;
//! - an incoming id outside every host range cannot be stored: chown to it fails with
//!   `EINVAL`, and a caller whose own id is unmapped cannot create entries (`EPERM`);
//! - with `--owner U:G` every entry is shown as owned by `U:G`; a chown to `U`/`G`
//!   keeps the archive's ids, any other chown fails with `EPERM`; a new entry takes the
//!   archive-side owner of its parent directory.

use crate::error::{Error, Result};
use crate::index::tree::{
    Attr, DirPlusSink, DirSink, FreeSpace, FsStats, Owner, ReadBytes, SetAttr, Tree,
};

/// The id shown for an archive id that no range maps (`/proc/sys/kernel/overflowuid`).
pub const OVERFLOW_ID: u32 = 65534;

/// One `container:host:count` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First archive-side (container) id.
    pub container: u32,
    /// First presented (host) id.
    pub host: u32,
    /// Number of ids.
    pub count: u32,
}

/// How one kind of id (uids or gids) is presented.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Map {
    /// Ids are shown as stored.
    #[default]
    Identity,
    /// User-namespace style ranges.
    Ranges(Vec<Range>),
    /// Every entry is shown as owned by this id.
    One(u32),
}

impl Map {
    /// Parses `c:h:n[,c:h:n...]` (several values may be given; they are joined).
    pub fn parse_ranges(what: &str, values: &[String]) -> Result<Map> {
        let mut ranges: Vec<Range> = Vec::new();
        for part in values.iter().flat_map(|v| v.split(',')).map(str::trim) {
            if part.is_empty() {
                continue;
            }
            let bad = || {
                Error::Usage(format!(
                    "bad {what} {part:?}: expected container:host:count (e.g. 0:100000:65536)"
                ))
            };
            let f: Vec<&str> = part.split(':').collect();
            let [c, h, n] = f.as_slice() else {
                return Err(bad());
            };
            let (Ok(container), Ok(host), Ok(count)) =
                (c.parse::<u32>(), h.parse::<u32>(), n.parse::<u32>())
            else {
                return Err(bad());
            };
            let fits = |start: u32| u64::from(start) + u64::from(count) <= 1 << 32;
            if count == 0 || !fits(container) || !fits(host) {
                return Err(bad());
            }
            let r = Range {
                container,
                host,
                count,
            };
            for o in &ranges {
                let lap = |a: u32, an: u32, b: u32, bn: u32| {
                    u64::from(a) < u64::from(b) + u64::from(bn)
                        && u64::from(b) < u64::from(a) + u64::from(an)
                };
                if lap(o.container, o.count, r.container, r.count)
                    || lap(o.host, o.count, r.host, r.count)
                {
                    return Err(Error::Usage(format!(
                        "{what} range {part:?} overlaps another range"
                    )));
                }
            }
            ranges.push(r);
        }
        if ranges.is_empty() {
            Ok(Map::Identity)
        } else {
            Ok(Map::Ranges(ranges))
        }
    }

    /// Archive-side id → presented id.
    pub fn present(&self, id: u32) -> u32 {
        match self {
            Map::Identity => id,
            Map::One(o) => *o,
            Map::Ranges(rs) => rs
                .iter()
                .find_map(|r| {
                    let off = id.checked_sub(r.container)?;
                    (off < r.count).then(|| r.host + off)
                })
                .unwrap_or(OVERFLOW_ID),
        }
    }

    /// Presented id → archive-side id; `None` if no range maps it.
    /// (For [`Map::One`] see [`MappedTree`]: the inverse is not a function of the id.)
    pub fn archive(&self, id: u32) -> Option<u32> {
        match self {
            Map::Identity => Some(id),
            Map::One(o) => (id == *o).then_some(id),
            Map::Ranges(rs) => rs.iter().find_map(|r| {
                let off = id.checked_sub(r.host)?;
                (off < r.count).then(|| r.container + off)
            }),
        }
    }
}

/// The uid and gid maps of a view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdMap {
    /// Owners.
    pub uid: Map,
    /// Groups.
    pub gid: Map,
}

impl IdMap {
    /// Builds the maps from the `--uid-map`, `--gid-map` and `--owner` values.
    pub fn from_args(uid_map: &[String], gid_map: &[String], owner: Option<&str>) -> Result<Self> {
        let uid = Map::parse_ranges("--uid-map", uid_map)?;
        let gid = Map::parse_ranges("--gid-map", gid_map)?;
        let Some(o) = owner else {
            return Ok(IdMap { uid, gid });
        };
        if uid != Map::Identity || gid != Map::Identity {
            return Err(Error::Usage(
                "--owner cannot be combined with --uid-map/--gid-map".into(),
            ));
        }
        let bad = || Error::Usage(format!("bad --owner {o:?}: expected UID:GID (numeric)"));
        let (u, g) = o.split_once(':').ok_or_else(bad)?;
        let u: u32 = u.trim().parse().map_err(|_| bad())?;
        let g: u32 = g.trim().parse().map_err(|_| bad())?;
        Ok(IdMap {
            uid: Map::One(u),
            gid: Map::One(g),
        })
    }

    /// Whether this maps nothing.
    pub fn is_identity(&self) -> bool {
        self.uid == Map::Identity && self.gid == Map::Identity
    }
}

/// A tree whose owners are presented through an [`IdMap`].
pub struct MappedTree {
    inner: Box<dyn Tree>,
    map: IdMap,
}

fn einval() -> Error {
    Error::Errno(libc::EINVAL)
}

fn eperm() -> Error {
    Error::Errno(libc::EPERM)
}

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
const ACL_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

/// Rewrites the qualifier ids of a POSIX ACL xattr value (`posix_acl_xattr_header`
/// then 8-byte entries: tag, perm, id, little-endian). A malformed value is passed
/// through unchanged (the layer below judges it).
fn map_acl(value: &[u8], mut f: impl FnMut(u16, u32) -> Result<u32>) -> Result<Vec<u8>> {
    let mut out = value.to_vec();
    let ok_shape = value.len() >= 4 && (value.len() - 4) % 8 == 0;
    if !ok_shape || value[..4] != ACL_VERSION.to_le_bytes() {
        return Ok(out);
    }
    for e in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        if tag == ACL_USER || tag == ACL_GROUP {
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            e[4..8].copy_from_slice(&f(tag, id)?.to_le_bytes());
        }
    }
    Ok(out)
}

fn is_acl(name: &[u8]) -> bool {
    name == ACL_ACCESS || name == ACL_DEFAULT
}

impl MappedTree {
    /// Presents `inner` through `map`.
    pub fn new(inner: Box<dyn Tree>, map: IdMap) -> MappedTree {
        MappedTree { inner, map }
    }

    fn present(&self, mut a: Attr) -> Attr {
        a.uid = self.map.uid.present(a.uid);
        a.gid = self.map.gid.present(a.gid);
        a
    }

    /// The archive-side owner of a new entry made by `who` in `parent`.
    fn creator(&self, parent: u64, who: Owner) -> Result<Owner> {
        let p = self.inner.attr(parent)?;
        let uid = match &self.map.uid {
            Map::One(_) => Some(p.uid),
            m => m.archive(who.uid),
        };
        let gid = match &self.map.gid {
            Map::One(_) => Some(p.gid),
            m => m.archive(who.gid),
        };
        match (uid, gid) {
            (Some(uid), Some(gid)) => Ok(Owner { uid, gid }),
            _ => {
                log::info!(
                    "refusing to create an entry for unmapped caller {}:{}",
                    who.uid,
                    who.gid
                );
                Err(eperm())
            }
        }
    }

    /// An incoming chown target: archive-side id, or `None` to leave it unchanged.
    fn chown_target(map: &Map, id: Option<u32>) -> Result<Option<u32>> {
        let Some(id) = id else { return Ok(None) };
        match map {
            Map::One(o) if id == *o => Ok(None),
            Map::One(_) => Err(eperm()),
            m => m.archive(id).map(Some).ok_or_else(einval),
        }
    }
}

impl Tree for MappedTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        self.inner.attr(ino).map(|a| self.present(a))
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        self.inner.lookup(parent, name)
    }
    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        self.inner.read_dir(ino, offset, sink)
    }
    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        self.inner.read_link(ino)
    }
    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        self.inner.xattr_names(ino)
    }
    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let v = self.inner.xattr(ino, name)?;
        if !is_acl(name) {
            return Ok(v);
        }
        map_acl(&v, |tag, id| {
            Ok(if tag == ACL_USER {
                self.map.uid.present(id)
            } else {
                self.map.gid.present(id)
            })
        })
    }
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes> {
        self.inner.read(ino, offset, size)
    }
    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        self.inner.seek_data(ino, offset, data)
    }
    fn stats(&self) -> FsStats {
        self.inner.stats()
    }
    fn read_dir_plus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirPlusSink<'_>,
    ) -> Result<()> {
        self.inner
            .read_dir_plus(ino, fh, offset, &mut |next, name, a| {
                sink(next, name, &self.present(*a))
            })
    }
    fn forget(&self, ino: u64, nlookup: u64) {
        self.inner.forget(ino, nlookup)
    }
    fn fallocate(&self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        self.inner.fallocate(ino, fh, offset, length, mode)
    }
    fn writable(&self) -> bool {
        self.inner.writable()
    }
    fn free_space(&self) -> Option<FreeSpace> {
        self.inner.free_space()
    }
    fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        self.inner.open(ino, flags)
    }
    fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> Result<(u64, u64)> {
        let owner = self.creator(parent, owner)?;
        self.inner.create(parent, name, mode, flags, owner)
    }
    fn flush(&self, ino: u64, fh: u64) -> Result<()> {
        self.inner.flush(ino, fh)
    }
    fn release(&self, ino: u64, fh: u64) -> Result<()> {
        self.inner.release(ino, fh)
    }
    fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        self.inner.fsync(ino, datasync)
    }
    fn open_dir(&self, ino: u64) -> Result<u64> {
        self.inner.open_dir(ino)
    }
    fn read_dir_handle(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<()> {
        self.inner.read_dir_handle(ino, fh, offset, sink)
    }
    fn release_dir(&self, ino: u64, fh: u64) -> Result<()> {
        self.inner.release_dir(ino, fh)
    }
    fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.inner.write(ino, fh, offset, data)
    }
    fn set_attr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        let mut set = *set;
        set.uid = Self::chown_target(&self.map.uid, set.uid)?;
        set.gid = Self::chown_target(&self.map.gid, set.gid)?;
        self.inner.set_attr(ino, &set).map(|a| self.present(a))
    }
    fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, owner: Owner) -> Result<u64> {
        let owner = self.creator(parent, owner)?;
        self.inner.mknod(parent, name, mode, rdev, owner)
    }
    fn mkdir(&self, parent: u64, name: &[u8], mode: u32, owner: Owner) -> Result<u64> {
        let owner = self.creator(parent, owner)?;
        self.inner.mkdir(parent, name, mode, owner)
    }
    fn symlink(&self, parent: u64, name: &[u8], target: &[u8], owner: Owner) -> Result<u64> {
        let owner = self.creator(parent, owner)?;
        self.inner.symlink(parent, name, target, owner)
    }
    fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<u64> {
        self.inner.link(ino, parent, name)
    }
    fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.inner.unlink(parent, name)
    }
    fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.inner.rmdir(parent, name)
    }
    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.inner.rename(parent, name, new_parent, new_name, flags)
    }
    fn set_xattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if !is_acl(name) {
            return self.inner.set_xattr(ino, name, value, flags);
        }
        let v = map_acl(value, |tag, id| {
            let m = if tag == ACL_USER {
                &self.map.uid
            } else {
                &self.map.gid
            };
            match m {
                Map::One(_) => Err(eperm()),
                m => m.archive(id).ok_or_else(einval),
            }
        })?;
        self.inner.set_xattr(ino, name, &v, flags)
    }
    fn remove_xattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.inner.remove_xattr(ino, name)
    }
    fn backing_file(&self, ino: u64) -> Option<std::sync::Arc<std::fs::File>> {
        self.inner.backing_file(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn ranges_map_both_ways() {
        let m = Map::parse_ranges("--uid-map", &s(&["0:100000:65536", "70000:5000:10"])).unwrap();
        assert_eq!(m.present(0), 100000);
        assert_eq!(m.present(1000), 101000);
        assert_eq!(m.present(65536), OVERFLOW_ID);
        assert_eq!(m.present(70003), 5003);
        assert_eq!(m.archive(101000), Some(1000));
        assert_eq!(m.archive(5009), Some(70009));
        assert_eq!(m.archive(0), None);
        assert_eq!(m.archive(u32::MAX), None);
    }

    #[test]
    fn bad_maps_are_refused() {
        for bad in ["0:1", "a:b:c", "0:0:0", "1:4294967295:2", "0:10:5,3:100:5"] {
            assert!(Map::parse_ranges("--uid-map", &s(&[bad])).is_err(), "{bad}");
        }
        assert!(IdMap::from_args(&[], &[], Some("1000")).is_err());
        assert!(IdMap::from_args(&s(&["0:1:1"]), &[], Some("1:1")).is_err());
        let o = IdMap::from_args(&[], &[], Some("1000:100")).unwrap();
        assert_eq!(o.uid.present(0), 1000);
        assert_eq!(o.gid.present(7), 100);
    }

    #[test]
    fn acl_ids_are_rewritten() {
        let mut v = ACL_VERSION.to_le_bytes().to_vec();
        for (tag, id) in [(0x01u16, u32::MAX), (ACL_USER, 1000), (ACL_GROUP, 5)] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&6u16.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let out = map_acl(&v, |_, id| Ok(id + 1)).unwrap();
        assert_eq!(&out[8..12], &u32::MAX.to_le_bytes());
        assert_eq!(&out[16..20], &1001u32.to_le_bytes());
        assert_eq!(&out[24..28], &6u32.to_le_bytes());
        assert_eq!(map_acl(b"junk", |_, _| Err(einval())).unwrap(), b"junk");
    }
}
