//! The LRU cache of decompressed spans, capped in bytes. Concurrent readers of the same
//! span wait for one decoder instead of decoding it twice. Span buffers are all of one
//! size and are reused after eviction, so the daemon's resident memory follows the
//! cap: cached, spare and in-flight buffers are all counted against it.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;

use crate::error::Result;

struct State {
    lru: LruCache<usize, Arc<Vec<u8>>>,
    bytes: u64,
    decoding: HashSet<usize>,
    /// Buffers of evicted spans, reused by the next decodes (their pages are already
    /// resident, so a miss costs no page faults). At most `SPARE_BUFFERS`.
    spare: Vec<Vec<u8>>,
    /// Probationary insertions so far (every `PROBATION_KEEP`th goes in as recent).
    probation_inserts: u64,
    /// Spans asked for ahead of a reader and not yet started.
    queued: HashSet<usize>,
    /// The spans most recently read to their end (at most `RETIRED_KEPT`): a prefetch
    /// of one of them arrived too late and is dropped rather than decoded again.
    retired: VecDeque<usize>,
}

/// Retired spans remembered so that late prefetches of them are dropped.
const RETIRED_KEPT: usize = 32;

/// One in this many probationary spans is inserted as most recently used.
const PROBATION_KEEP: u64 = 32;

/// Evicted span buffers kept for reuse.
const SPARE_BUFFERS: usize = 4;

/// Where a newly decoded span enters the cache's recency order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// As the most recently used span (sequential reads, prefetch).
    Recent,
    /// As the least recently used span until read again (random reads).
    Probation,
}

/// Decompressed spans keyed by span number.
pub struct SpanCache {
    cap: u64,
    /// Capacity of a span buffer (the longest span), set aside for each decode.
    reserve: u64,
    state: Mutex<State>,
    decoded: Condvar,
}

impl SpanCache {
    /// A cache holding at most `cap` bytes of span buffers of `buffer` bytes each,
    /// counting spans being decoded and spare buffers, so all of them together stay
    /// within `cap` (the most recently used span is always kept, even if it alone
    /// exceeds it). Entries cost their buffer's capacity, not just the bytes filled.
    pub fn new(cap: u64, buffer: u64) -> Self {
        SpanCache {
            cap,
            reserve: buffer,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                decoding: HashSet::new(),
                spare: Vec::new(),
                probation_inserts: 0,
                queued: HashSet::new(),
                retired: VecDeque::new(),
            }),
            decoded: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in a way that
        // matters (worst case a stale `decoding` mark, cleared below), so recover.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The span `key` with at least its first `need` bytes, decoding it with `decode`
    /// on a miss. Entries may hold only a prefix of their span; `decode` gets the
    /// length of the prefix cached so far (0 if none) and fills a cleared buffer with
    /// a prefix of at least `need` bytes (or the whole span).
    ///
    /// A span decoded for a random read is inserted on `Insert::Probation`: as the
    /// least recently used entry (except one in `PROBATION_KEEP`), promoted only when
    /// read again. Random reads that sweep more spans than fit (reading every small
    /// file of an archive in path order, which is not archive order) then keep a
    /// stable part of the cache and hit it, where plain LRU would evict every span
    /// just before its next use (simulated on the 100k-file benchmark corpus: 62% hits
    /// instead of 0%). Sequential and prefetched spans go in as most recent.
    pub fn get_or_insert(
        &self,
        key: usize,
        need: usize,
        insert: Insert,
        decode: impl FnOnce(usize, &mut Vec<u8>) -> Result<()>,
    ) -> Result<Arc<Vec<u8>>> {
        let mut st = self.lock();
        let mut have = 0;
        loop {
            if let Some(v) = st.lru.get(&key) {
                if v.len() >= need {
                    return Ok(v.clone());
                }
                have = v.len();
            }
            if !st.decoding.contains(&key) {
                break;
            }
            st = self.decoded.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.decoding.insert(key);
        // Read again after it was retired: a later prefetch of it is wanted again.
        st.retired.retain(|&k| k != key);
        // Make room for the buffer about to be filled.
        while st.bytes > self.room(&st) {
            let Some((_, old)) = st.lru.pop_lru() else {
                break;
            };
            st.bytes -= old.capacity() as u64;
            self.recycle(&mut st, old);
        }
        let mut buf = st.spare.pop().unwrap_or_default();
        drop(st);

        // Clears the mark even if `decode` panics, so waiters never block forever.
        let mark = Decoding { cache: self, key };
        buf.clear();
        if buf.capacity() < self.reserve as usize {
            buf.reserve_exact(self.reserve as usize);
        }
        let result = decode(have, &mut buf);
        drop(mark);

        let mut st = self.lock();
        if let Err(e) = result {
            self.recycle(&mut st, Arc::new(buf));
            return Err(e);
        }
        let value = Arc::new(buf);
        st.bytes += value.capacity() as u64;
        let extended = st.lru.put(key, value.clone()).map(|old| {
            st.bytes -= old.capacity() as u64;
            self.recycle(&mut st, old);
        });
        // A longer prefix of a span already cached keeps the span's standing.
        if insert == Insert::Probation && extended.is_none() {
            st.probation_inserts += 1;
            if st.probation_inserts % PROBATION_KEEP != 0 {
                st.lru.demote(&key);
            }
        }
        while st.bytes > self.room(&st) && st.lru.len() > 1 {
            if let Some((_, old)) = st.lru.pop_lru() {
                st.bytes -= old.capacity() as u64;
                self.recycle(&mut st, old);
            }
        }
        Ok(value)
    }

    /// Drops span `key` once a reader has read it to its end, keeping its buffer for
    /// the next decode. A streamed file would otherwise fill the cache with spans the
    /// kernel already holds as the file's pages, each decoded into fresh memory
    /// (measured: 250 instead of 350 MB/s sequential with a 1 GiB cache).
    pub fn retire(&self, key: usize) {
        let mut st = self.lock();
        if let Some(old) = st.lru.pop(&key) {
            st.bytes -= old.capacity() as u64;
            self.recycle(&mut st, old);
        }
        if !st.retired.contains(&key) {
            if st.retired.len() == RETIRED_KEPT {
                st.retired.pop_front();
            }
            st.retired.push_back(key);
        }
    }

    /// Marks `key` as asked for ahead of a reader. False (nothing to do) if it is
    /// cached, being decoded or already asked for: a reader asks on every read.
    pub fn queue_prefetch(&self, key: usize) -> bool {
        let mut st = self.lock();
        if st.lru.contains(&key) || st.decoding.contains(&key) {
            return false;
        }
        st.queued.insert(key)
    }

    /// Takes `key` off the prefetch queue; false if decoding it now would be waste:
    /// it is cached or being decoded, or a reader already read it to its end.
    pub fn start_prefetch(&self, key: usize) -> bool {
        let mut st = self.lock();
        st.queued.remove(&key);
        !(st.lru.contains(&key) || st.decoding.contains(&key) || st.retired.contains(&key))
    }

    /// Keeps the buffer of a span leaving the cache for the next decode, unless a
    /// reader still holds it, it is not a full-size buffer, or enough are spare.
    /// (A spare buffer counts against the cap, so callers evict on until it fits.)
    fn recycle(&self, st: &mut State, old: Arc<Vec<u8>>) {
        // Spares may take at most an eighth of the cap.
        let most = SPARE_BUFFERS.min((self.cap / self.reserve.max(1) / 8) as usize);
        if st.spare.len() >= most || old.capacity() as u64 != self.reserve {
            return;
        }
        if let Ok(buf) = Arc::try_unwrap(old) {
            st.spare.push(buf);
        }
    }

    /// Bytes the cached spans may use next to the current decodes and spare buffers.
    /// While the machine is short of memory the cap shrinks to an eighth.
    fn room(&self, st: &State) -> u64 {
        let cap = if memory::is_short() {
            self.cap / 8
        } else {
            self.cap
        };
        let aside = (st.decoding.len() + st.spare.len()) as u64;
        cap.saturating_sub(self.reserve.saturating_mul(aside))
    }

    /// Whether `key` is cached or being decoded (does not touch its recency).
    #[cfg(test)]
    pub fn contains(&self, key: usize) -> bool {
        let st = self.lock();
        st.lru.contains(&key) || st.decoding.contains(&key)
    }

    /// Bytes currently cached.
    pub fn cached_bytes(&self) -> u64 {
        self.lock().bytes
    }
}

/// A span being decoded; dropping it (also while unwinding) clears the mark and wakes
/// the readers waiting for that span.
struct Decoding<'a> {
    cache: &'a SpanCache,
    key: usize,
}

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        self.cache.lock().decoding.remove(&self.key);
        self.cache.decoded.notify_all();
    }
}

/// Keeps the daemon's resident memory near what it uses: large blocks go back to the
/// kernel when freed instead of lingering in malloc's arenas.
///
/// glibc raises its mmap threshold each time a large block is freed; after that, span
/// and compressed-input buffers of 1–8 MiB come from per-thread arenas and stay there
/// as fragmented free space (measured: 490 MiB resident with a 256 MiB cache under
/// four random readers, 278 MiB with this). A fixed threshold just above the largest
/// FUSE reply (1 MiB) turns that adaptation off while replies keep reusing heap memory
/// (a fresh mapping per reply costs page faults: +25% CPU on sequential reads). Span
/// buffers are pooled by the cache, so mapping them costs nothing in steady state.
pub fn return_freed_buffers_to_kernel() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before worker threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, (1 << 20) + (64 << 10));
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Whether the machine is short of memory (`MemAvailable` under a tenth of
/// `MemTotal` in `/proc/meminfo`), looked up at most once a second. Many mounts with
/// large caches then give memory back instead of pushing the machine into reclaim.
mod memory {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    static CHECKED_AT: AtomicU64 = AtomicU64::new(0);
    static SHORT: AtomicBool = AtomicBool::new(false);

    pub fn is_short() -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = CHECKED_AT.load(Ordering::Relaxed);
        if now != last
            && CHECKED_AT
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
                let short = short_of(&text);
                if short != SHORT.swap(short, Ordering::Relaxed) {
                    log::info!(
                        "memory {}: span cache {}",
                        if short { "is short" } else { "recovered" },
                        if short {
                            "shrinks to 1/8 of its cap"
                        } else {
                            "back to its cap"
                        }
                    );
                }
            }
        }
        SHORT.load(Ordering::Relaxed)
    }

    /// `MemAvailable < MemTotal / 10` in a `/proc/meminfo` text.
    pub fn short_of(meminfo: &str) -> bool {
        let field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        };
        match (field("MemTotal:"), field("MemAvailable:")) {
            (Some(total), Some(avail)) => avail < total / 10,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_by_bytes_and_counts_decodes() {
        let cache = SpanCache::new(250, 0);
        let mut decodes = 0;
        for key in [0, 1, 0, 2, 3, 0] {
            let v = cache
                .get_or_insert(key, 100, Insert::Recent, |_, out| {
                    decodes += 1;
                    out.resize(100, key as u8);
                    Ok(())
                })
                .unwrap();
            assert_eq!(v[0], key as u8);
            assert!(cache.cached_bytes() <= 250);
        }
        // 0,1 decoded; 0 hit; 2 evicts 1; 3 evicts 0 (LRU after 2? 0 was used after 1)
        assert_eq!(decodes, 5);
    }

    #[test]
    fn prefetch_is_asked_once_and_dropped_when_late() {
        let cache = SpanCache::new(1000, 0);
        let fill = |_, out: &mut Vec<u8>| {
            out.resize(100, 7);
            Ok(())
        };
        // Asked once while queued, however many reads ask.
        assert!(cache.queue_prefetch(5));
        assert!(!cache.queue_prefetch(5));
        // The reader got there first and read it to its end: the prefetch is waste.
        cache.get_or_insert(5, 100, Insert::Recent, fill).unwrap();
        cache.retire(5);
        assert!(!cache.contains(5));
        assert!(!cache.start_prefetch(5));
        // A queued span nobody read yet is decoded.
        assert!(cache.queue_prefetch(6));
        assert!(cache.start_prefetch(6));
        // Cached spans are not asked for; a retired span read again may be prefetched
        // again later.
        cache.get_or_insert(6, 100, Insert::Recent, fill).unwrap();
        assert!(!cache.queue_prefetch(6));
        cache.get_or_insert(5, 100, Insert::Recent, fill).unwrap();
        cache.retire(5);
        cache.get_or_insert(5, 100, Insert::Recent, fill).unwrap();
        cache.retire(5);
        assert!(!cache.start_prefetch(5));
        cache.get_or_insert(5, 100, Insert::Recent, fill).unwrap();
        assert!(cache.queue_prefetch(7));
        // Only the last RETIRED_KEPT retired spans are remembered.
        for k in 100..100 + RETIRED_KEPT + 1 {
            cache.get_or_insert(k, 1, Insert::Recent, fill).unwrap();
            cache.retire(k);
        }
        assert!(cache.start_prefetch(100));
        assert!(!cache.start_prefetch(101));
    }

    #[test]
    fn short_prefixes_are_extended() {
        let cache = SpanCache::new(1000, 0);
        let v = cache.get_or_insert(1, 10, Insert::Recent, |have, out| {
            assert_eq!(have, 0);
            out.resize(20, 1);
            Ok(())
        });
        assert_eq!(v.unwrap().len(), 20);
        let hit = cache.get_or_insert(1, 20, Insert::Recent, |_, _| panic!("must hit"));
        assert_eq!(hit.unwrap().len(), 20);
        let longer = cache.get_or_insert(1, 50, Insert::Recent, |have, out| {
            assert_eq!(have, 20);
            out.resize(80, 1);
            Ok(())
        });
        assert_eq!(longer.unwrap().len(), 80);
        assert_eq!(cache.cached_bytes(), 80);
    }

    #[test]
    fn spans_being_decoded_and_spare_buffers_count_against_the_cap() {
        let cache = SpanCache::new(300, 100);
        let accounted = |c: &SpanCache| {
            let st = c.lock();
            st.bytes + 100 * (st.decoding.len() + st.spare.len()) as u64
        };
        for key in 0..10 {
            let v = cache.get_or_insert(key, 100, Insert::Recent, |_, out| {
                // While a span is decoded, the others leave it room.
                assert!(accounted(&cache) <= 300);
                out.resize(100, key as u8);
                Ok(())
            });
            assert_eq!(v.unwrap()[0], key as u8);
            assert!(accounted(&cache) <= 300);
        }
    }

    #[test]
    fn a_random_sweep_larger_than_the_cache_still_hits() {
        // Twelve spans read round and round through a cache of eight: LRU never hits.
        let run = |insert| {
            let cache = SpanCache::new(1000, 100);
            let mut decodes = 0;
            for _ in 0..20 {
                for key in 0..12 {
                    let v = cache.get_or_insert(key, 100, insert, |_, out| {
                        decodes += 1;
                        out.resize(100, key as u8);
                        Ok(())
                    });
                    assert_eq!(v.unwrap()[99], key as u8);
                }
            }
            decodes
        };
        assert_eq!(run(Insert::Recent), 240);
        let probation = run(Insert::Probation);
        assert!(probation < 150, "{probation} decodes");
    }

    #[test]
    fn memory_is_short_under_a_tenth_available() {
        let info = |avail| {
            format!("MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   {avail} kB\n")
        };
        assert!(memory::short_of(&info(2_000_000)));
        assert!(!memory::short_of(&info(3_000_000)));
        assert!(!memory::short_of("garbage"));
    }

    #[test]
    fn errors_are_not_cached() {
        let cache = SpanCache::new(1000, 0);
        let r = cache.get_or_insert(7, 1, Insert::Recent, |_, _| {
            Err(crate::error::Error::Errno(5))
        });
        assert!(r.is_err());
        let v = cache.get_or_insert(7, 1, Insert::Recent, |_, out| {
            out.push(1);
            Ok(())
        });
        assert_eq!(v.unwrap().len(), 1);
    }

    #[test]
    fn a_panicking_decode_does_not_block_later_readers() {
        let cache = SpanCache::new(1000, 0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = cache.get_or_insert(3, 1, Insert::Recent, |_, _| panic!("decoder bug"));
        }));
        assert!(r.is_err());
        assert!(!cache.contains(3), "the decoding mark outlived the panic");
        let v = cache.get_or_insert(3, 1, Insert::Recent, |_, out| {
            out.push(9);
            Ok(())
        });
        assert_eq!(*v.unwrap(), vec![9]);
    }
}
