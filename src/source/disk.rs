//! The on-disk block cache of remote sources (`--disk-cache DIR`): blocks fetched from
//! an object are kept as files `DIR/<object key>/<block number>`, where the object key
//! names one version of one object (URL, size and ETag, see
//! [`super::remote::identity_key`]), so a replaced object never finds the old one's
//! blocks. Every file holds a header with its length and CRC-32, checked on use (a
//! damaged or short file is dropped and fetched again). Files are written to a
//! temporary name and renamed, so every mount on the host can share the directory, and
//! they survive remounts. The size is bounded: past it, the least recently used files
//! (by mtime, which a hit refreshes) are removed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SNFSBLK1";
const HEADER: usize = 16;

/// A bounded directory of cached blocks.
pub struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    evicting: Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Counts not yet added to `DIR/.stats` (hits, misses).
    unsaved: Mutex<(u64, u64)>,
}

/// Counts are added to the shared stats file every this many lookups.
const SAVE_EVERY: u64 = 64;
/// The shared counters of every process using the cache: "hits misses".
const STATS: &str = ".stats";

/// What `snapfs list` says about a disk cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSummary {
    /// Bytes in block files.
    pub bytes: u64,
    /// Block files.
    pub blocks: u64,
    /// Lookups that found their block, by every process (as saved so far).
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
}

impl DiskCache {
    /// Opens (creating) the cache in `dir`, holding at most `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<DiskCache> {
        fs::create_dir_all(dir).map_err(|e| Error::io("cannot create disk cache", dir, e))?;
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1 << 20),
            used: AtomicU64::new(0),
            evicting: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            unsaved: Mutex::new((0, 0)),
        };
        let used: u64 = cache.files().iter().map(|(_, len, _)| len).sum();
        cache.used.store(used, Ordering::Relaxed);
        Ok(cache)
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// (hits, misses) so far in this process.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn path(&self, key: &str, block: u64) -> PathBuf {
        self.dir.join(key).join(format!("{block:012x}"))
    }

    /// Block `block` of object `key`, if cached, whole (`len` bytes) and undamaged.
    pub fn get(&self, key: &str, block: u64, len: u64) -> Option<Vec<u8>> {
        let path = self.path(key, block);
        let got = fs::read(&path).ok().and_then(|data| {
            if data.len() < HEADER || &data[..8] != MAGIC {
                return None;
            }
            let n = u32::from_le_bytes(data[8..12].try_into().ok()?) as u64;
            let crc = u32::from_le_bytes(data[12..16].try_into().ok()?);
            let body = &data[HEADER..];
            (n == len && body.len() as u64 == n && crc32fast::hash(body) == crc)
                .then(|| body.to_vec())
        });
        self.count(got.is_some());
        match &got {
            Some(_) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                if let Ok(f) = fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                if path.exists() {
                    log::warn!("disk cache: dropping damaged block {}", path.display());
                    let _ = fs::remove_file(&path);
                }
            }
        }
        got
    }

    fn count(&self, hit: bool) {
        let mut u = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        if hit {
            u.0 += 1;
        } else {
            u.1 += 1;
        }
        if u.0 + u.1 >= SAVE_EVERY {
            let (h, m) = std::mem::take(&mut *u);
            drop(u);
            self.save_counts(h, m);
        }
    }

    /// Adds this process's counts to the shared stats file now.
    pub fn flush_counts(&self) {
        let (h, m) = std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()));
        if h + m > 0 {
            self.save_counts(h, m);
        }
    }

    fn save_counts(&self, h: u64, m: u64) {
        use std::io::{Read, Seek};
        use std::os::fd::AsRawFd;
        let path = self.dir.join(STATS);
        let Ok(mut f) = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
        else {
            return;
        };
        // SAFETY: flock on a descriptor we own; released when it is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return;
        }
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        let (oh, om) = parse_counts(&text);
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = writeln!(f, "{} {}", oh + h, om + m);
    }

    /// Size, block count and the shared hit counts. Blocks still being written (their
    /// temporary files) are not counted: a reader would not find them yet.
    pub fn summary(&self) -> CacheSummary {
        let mut files = self.files();
        files.retain(|(path, _, _)| is_block_file(path));
        let text = fs::read_to_string(self.dir.join(STATS)).unwrap_or_default();
        let (hits, misses) = parse_counts(&text);
        CacheSummary {
            bytes: files.iter().map(|f| f.1).sum(),
            blocks: files.len() as u64,
            hits,
            misses,
        }
    }

    /// Stores block `block` of object `key` (best effort: a failure is logged).
    pub fn put(&self, key: &str, block: u64, data: &[u8]) {
        if let Err(e) = self.try_put(key, block, data) {
            log::debug!("disk cache: cannot store a block of {key}: {e}");
        }
        if self.used.load(Ordering::Relaxed) > self.max_bytes {
            self.evict();
        }
    }

    fn try_put(&self, key: &str, block: u64, data: &[u8]) -> std::io::Result<()> {
        let dir = self.dir.join(key);
        fs::create_dir_all(&dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
        let mut head = [0u8; HEADER];
        head[..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[12..16].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
        tmp.write_all(&head)?;
        tmp.write_all(data)?;
        tmp.persist(self.path(key, block)).map_err(|e| e.error)?;
        self.used
            .fetch_add((HEADER + data.len()) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Every file under the cache's object dirs, blocks and blocks being written:
    /// (path, length, mtime).
    fn files(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let Ok(objects) = fs::read_dir(&self.dir) else {
            return out;
        };
        for obj in objects.flatten() {
            let Ok(blocks) = fs::read_dir(obj.path()) else {
                continue;
            };
            for b in blocks.flatten() {
                if let Ok(m) = b.metadata() {
                    if m.is_file() {
                        let t = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        out.push((b.path(), m.len(), t));
                    }
                }
            }
        }
        out
    }

    /// Removes the least recently used files until the cache is at 90 % of its size.
    fn evict(&self) {
        let Ok(_g) = self.evicting.try_lock() else {
            return;
        };
        let mut files = self.files();
        let mut used: u64 = files.iter().map(|(_, l, _)| l).sum();
        files.sort_by_key(|(_, _, t)| *t);
        let target = self.max_bytes / 10 * 9;
        for (p, len, _) in files {
            if used <= target {
                break;
            }
            if fs::remove_file(&p).is_ok() {
                used -= len;
            }
        }
        self.used.store(used, Ordering::Relaxed);
    }
}

fn parse_counts(text: &str) -> (u64, u64) {
    let mut it = text
        .split_whitespace()
        .map(|w| w.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Whether `path` names a stored block (see [`DiskCache::path`]), not a temporary file.
fn is_block_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.len() == 12 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_are_checked_and_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let data = vec![7u8; 300 << 10];
        c.put("k", 0, &data);
        assert_eq!(c.get("k", 0, data.len() as u64).as_deref(), Some(&data[..]));
        assert!(c.get("other", 0, data.len() as u64).is_none());
        assert!(c.get("k", 0, 5).is_none(), "length is checked");
        c.put("k", 0, &data);
        // Damage: flipped byte -> dropped.
        let p = dir.path().join("k").join(format!("{:012x}", 0));
        let mut raw = fs::read(&p).unwrap();
        raw[HEADER + 3] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(c.get("k", 0, data.len() as u64).is_none());
        assert!(!p.exists());
        // Eviction keeps the cache under its bound.
        for b in 0..8 {
            c.put("k", b, &data);
        }
        let total: u64 = c.files().iter().map(|f| f.1).sum();
        assert!(total <= 1 << 20, "{total}");
        // A second cache over the same dir sees the same blocks.
        let c2 = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let kept = (0..8).filter(|&b| c2.get("k", b, data.len() as u64).is_some());
        assert!(kept.count() >= 1);
        c.flush_counts();
        c2.flush_counts();
        let s = c2.summary();
        assert!(s.hits >= 2 && s.misses >= 3, "{s:?}");
        // A block being written (its temporary file) is not counted until it is stored.
        let blocks = s.blocks;
        fs::write(dir.path().join("k").join(".tmpAbC123"), b"partial").unwrap();
        assert_eq!(c2.summary().blocks, blocks);
        assert!(s.blocks >= 1 && s.bytes <= 1 << 20);
    }
}
