//! The LRU cache of decompressed spans, capped in bytes. Concurrent readers of the same
//! span wait for one decoder instead of decoding it twice. Span buffers are reused
//! after eviction, so the daemon's resident memory follows the cap: cached, spare and
//! in-flight buffers are all counted against it.
//!
//! The bytes live in a [`SpanPool`]; each archive reads through its own [`SpanCache`]
//! handle on one. A mount daemon gives each archive a pool of its own; the service
//! puts every archive it serves in one pool, so one cap bounds them all and the
//! archives compete for it in one recency order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;

use crate::error::Result;

/// A span of one archive: (the archive's slot in the pool, span number).
type Key = (u64, usize);

struct State {
    lru: LruCache<Key, Arc<Vec<u8>>>,
    bytes: u64,
    /// Spans being decoded, with the buffer size set aside for each.
    decoding: HashMap<Key, u64>,
    /// Buffers of evicted spans, reused by the next decodes (their pages are already
    /// resident, so a miss costs no page faults). At most `SPARE_BUFFERS`.
    spare: Vec<Vec<u8>>,
    /// Probationary insertions so far (every `PROBATION_KEEP`th goes in as recent).
    probation_inserts: u64,
    /// Spans asked for ahead of a reader and not yet started.
    queued: HashSet<Key>,
    /// The spans most recently read to their end (at most `RETIRED_KEPT`): a prefetch
    /// of one of them arrived too late and is dropped rather than decoded again.
    retired: VecDeque<Key>,
    /// Cached spans last decoded for a random reader (they are spilled, not read on).
    random: HashSet<Key>,
    /// Retired spans still cached, dropped once `LINGERING` later ones are retired.
    lingering: VecDeque<Key>,
    /// The spans most recently read to their end, in any pool (at most
    /// `RETIRED_KEPT`): tells a sequential reader's next span from a random read.
    ended: VecDeque<Key>,
    /// Reads answered from the cache, and decodes.
    hits: u64,
    misses: u64,
}

/// Retired spans remembered so that late prefetches of them are dropped.
const RETIRED_KEPT: usize = 32;

/// Spans read to their end kept until this many later ones are: the kernel's
/// readahead requests run on several FUSE threads and arrive out of order, so a span's
/// last read can come before the others (measured without: 7 of 129 pzstd frames
/// decoded twice in a 1 GiB sequential read).
const LINGERING: usize = 1;

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

/// The memory behind one or more [`SpanCache`]s: the decoded spans of every archive
/// reading through it, capped together in bytes.
pub struct SpanPool {
    cap: u64,
    state: Mutex<State>,
    decoded: Condvar,
    next_slot: AtomicU64,
}

/// What a [`SpanPool`] holds and has done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// The cap in bytes.
    pub cap: u64,
    /// Bytes of cached spans (buffer capacities).
    pub cached_bytes: u64,
    /// Spans cached.
    pub spans: u64,
    /// Reads answered from the cache.
    pub hits: u64,
    /// Spans (or span prefixes) decoded.
    pub misses: u64,
}

impl SpanPool {
    /// A pool of at most `cap` bytes (see [`SpanCache::new`] for what counts).
    pub fn new(cap: u64) -> Arc<SpanPool> {
        Arc::new(SpanPool {
            cap,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                decoding: HashMap::new(),
                spare: Vec::new(),
                probation_inserts: 0,
                queued: HashSet::new(),
                retired: VecDeque::new(),
                random: HashSet::new(),
                lingering: VecDeque::new(),
                ended: VecDeque::new(),
                hits: 0,
                misses: 0,
            }),
            decoded: Condvar::new(),
            next_slot: AtomicU64::new(0),
        })
    }

    /// What the pool holds now.
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            cap: self.cap,
            cached_bytes: st.bytes,
            spans: st.lru.len() as u64,
            hits: st.hits,
            misses: st.misses,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in a way that
        // matters (worst case a stale `decoding` mark, cleared below), so recover.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops `old`, or keeps its buffer for the next decode unless a reader still
    /// holds it or spares would take more than an eighth of the cap (at most
    /// `SPARE_BUFFERS`). A spare buffer counts against the cap, so callers evict on
    /// until it fits.
    fn recycle(&self, st: &mut State, old: Arc<Vec<u8>>) {
        let spare: u64 = st.spare.iter().map(|b| b.capacity() as u64).sum();
        let size = old.capacity() as u64;
        if st.spare.len() >= SPARE_BUFFERS || size == 0 || spare + size > self.cap / 8 {
            return;
        }
        if let Ok(buf) = Arc::try_unwrap(old) {
            st.spare.push(buf);
        }
    }

    /// A spare buffer for a decode that needs `reserve` bytes: the smallest that is
    /// large enough, else the largest (it grows).
    fn take_spare(st: &mut State, reserve: u64) -> Vec<u8> {
        let fits = |b: &Vec<u8>| b.capacity() as u64 >= reserve;
        let pick = (0..st.spare.len())
            .filter(|&i| fits(&st.spare[i]))
            .min_by_key(|&i| st.spare[i].capacity())
            .or_else(|| (0..st.spare.len()).max_by_key(|&i| st.spare[i].capacity()));
        pick.map(|i| st.spare.swap_remove(i)).unwrap_or_default()
    }

    /// Bytes the cached spans may use next to the current decodes and spare buffers.
    /// While the machine is short of memory the cap shrinks to an eighth.
    fn room(&self, st: &State) -> u64 {
        let cap = if memory::is_short() {
            self.cap / 8
        } else {
            self.cap
        };
        let decoding: u64 = st.decoding.values().sum();
        let spare: u64 = st.spare.iter().map(|b| b.capacity() as u64).sum();
        cap.saturating_sub(decoding.saturating_add(spare))
    }

    /// Drops span `key` from the cache (if there), keeping its buffer for reuse.
    fn drop_span(&self, st: &mut State, key: Key) {
        if let Some(old) = st.lru.pop(&key) {
            st.lingering.retain(|&k| k != key);
            st.random.remove(&key);
            st.bytes -= old.capacity() as u64;
            self.recycle(st, old);
        }
    }

    /// Keeps the retired span `key` cached until `LINGERING` later ones are retired,
    /// dropping the oldest lingering one beyond that.
    fn linger(&self, st: &mut State, key: Key) {
        if !st.lingering.contains(&key) {
            st.lingering.push_back(key);
        }
        while st.lingering.len() > LINGERING {
            let Some(k) = st.lingering.pop_front() else {
                break;
            };
            st.random.remove(&k);
            let Some(old) = st.lru.pop(&k) else {
                continue;
            };
            st.bytes -= old.capacity() as u64;
            self.recycle(st, old);
        }
    }

    /// Evicts least recently used spans until the cached ones fit next to the
    /// decodes and spares, keeping at least `keep` spans.
    fn evict(&self, st: &mut State, keep: usize) {
        while st.bytes > self.room(st) && st.lru.len() > keep {
            let Some((key, old)) = st.lru.pop_lru() else {
                break;
            };
            st.random.remove(&key);
            st.bytes -= old.capacity() as u64;
            self.recycle(st, old);
        }
    }
}

/// The decoded spans of one archive, keyed by span number, in a [`SpanPool`] of its
/// own or shared with other archives.
pub struct SpanCache {
    pool: Arc<SpanPool>,
    /// This archive's slot in the pool.
    slot: u64,
    /// Capacity of a span buffer (the longest span), set aside for each decode.
    reserve: u64,
    /// Whether other readers (views) share the pool: a retired span is then kept,
    /// first in line for eviction, instead of dropped.
    shared: bool,
}

impl SpanCache {
    /// A cache holding at most `cap` bytes of span buffers of `buffer` bytes each,
    /// counting spans being decoded and spare buffers, so all of them together stay
    /// within `cap` (the most recently used span is always kept, even if it alone
    /// exceeds it). Entries cost their buffer's capacity, not just the bytes filled.
    pub fn new(cap: u64, buffer: u64) -> Self {
        let mut c = SpanCache::in_pool(&SpanPool::new(cap), buffer);
        c.shared = false;
        c
    }

    /// A cache of span buffers of `buffer` bytes in `pool`, whose cap it shares with
    /// the pool's other caches. The pool serves many views, each with page cache of
    /// its own, so a span one view read to its end may be the next one another view
    /// wants: [`SpanCache::retire`] only puts it first in line for eviction.
    pub fn in_pool(pool: &Arc<SpanPool>, buffer: u64) -> Self {
        SpanCache {
            pool: pool.clone(),
            slot: pool.next_slot.fetch_add(1, Ordering::Relaxed),
            reserve: buffer,
            shared: true,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.pool.lock()
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
        span: usize,
        need: usize,
        insert: Insert,
        decode: impl FnOnce(usize, &mut Vec<u8>) -> Result<()>,
    ) -> Result<Arc<Vec<u8>>> {
        let pool = &*self.pool;
        let key = (self.slot, span);
        let mut st = self.lock();
        let mut have = 0;
        loop {
            if let Some(v) = st.lru.get(&key) {
                if v.len() >= need {
                    let v = v.clone();
                    st.hits += 1;
                    return Ok(v);
                }
                have = v.len();
            }
            if !st.decoding.contains_key(&key) {
                break;
            }
            st = pool.decoded.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.misses += 1;
        st.decoding.insert(key, self.reserve);
        // Read again after it was retired: a later prefetch of it is wanted again. (A
        // straggler of a sequential reader: it is not read to its end again, so it is
        // dropped as soon as lingering spans are.)
        let straggler = st.retired.contains(&key);
        st.random.remove(&key);
        st.retired.retain(|&k| k != key);
        // Make room for the buffer about to be filled.
        pool.evict(&mut st, 0);
        let mut buf = SpanPool::take_spare(&mut st, self.reserve);
        drop(st);

        // Clears the mark even if `decode` panics, so waiters never block forever.
        let mark = Decoding {
            pool,
            key,
            finished: false,
        };
        buf.clear();
        if buf.capacity() < self.reserve as usize {
            buf.reserve_exact(self.reserve as usize);
        }
        let result = decode(have, &mut buf);

        // The mark goes in the same critical section that caches the span: a reader
        // woken in between would find neither and decode it again (measured: one
        // span in five of a sequential read decoded twice).
        let mut st = self.lock();
        mark.finish(&mut st);
        if let Err(e) = result {
            pool.recycle(&mut st, Arc::new(buf));
            return Err(e);
        }
        let value = Arc::new(buf);
        st.bytes += value.capacity() as u64;
        let extended = st.lru.put(key, value.clone()).map(|old| {
            st.bytes -= old.capacity() as u64;
            pool.recycle(&mut st, old);
        });
        // A longer prefix of a span already cached keeps the span's standing.
        if insert == Insert::Probation && extended.is_none() {
            st.probation_inserts += 1;
            if st.probation_inserts % PROBATION_KEEP != 0 {
                st.lru.demote(&key);
            }
        }
        if straggler && !self.shared {
            pool.linger(&mut st, key);
        }
        pool.evict(&mut st, 1);
        Ok(value)
    }

    /// Drops span `span` once a reader has read it to its end, keeping its buffer for
    /// the next decode. A streamed file would otherwise fill the cache with spans the
    /// kernel already holds as the file's pages, each decoded into fresh memory
    /// (measured: 250 instead of 350 MB/s sequential with a 1 GiB cache).
    /// In a shared pool the span stays cached, as the least recently used one.
    /// Otherwise it lingers until the next span is retired, unless it is `spilled`
    /// (whatever still comes for it comes from the spill file).
    pub fn retire(&self, span: usize, spilled: bool) {
        let key = (self.slot, span);
        let mut st = self.lock();
        if !st.ended.contains(&key) {
            if st.ended.len() == RETIRED_KEPT {
                st.ended.pop_front();
            }
            st.ended.push_back(key);
        }
        if self.shared {
            // Still cached, so a late prefetch of it is dropped anyway; once evicted,
            // another view's prefetch of it is welcome.
            st.lru.demote(&key);
            return;
        }
        if !spilled {
            self.pool.linger(&mut st, key);
        } else {
            self.pool.drop_span(&mut st, key);
        }
        if !st.retired.contains(&key) {
            if st.retired.len() == RETIRED_KEPT {
                st.retired.pop_front();
            }
            st.retired.push_back(key);
        }
    }

    /// Lets go of span `span` now that the spill file holds it whole (the filler
    /// stored it): whatever comes for it comes from there. Unlike
    /// [`SpanCache::retire`], no reader read it to its end, so it tells nothing about
    /// sequential readers or late prefetches. In a shared pool it stays cached, first
    /// in line for eviction.
    pub fn release(&self, span: usize) {
        let key = (self.slot, span);
        let mut st = self.lock();
        if self.shared {
            st.lru.demote(&key);
        } else {
            self.pool.drop_span(&mut st, key);
        }
    }

    /// Called by the decode of `span` for a random reader (see [`SpanCache::for_random`]).
    pub fn decoding_for_random(&self, span: usize) {
        self.lock().random.insert((self.slot, span));
    }

    /// Whether `span` was last decoded for a random reader: another reader that finds
    /// it cached is no sequential one either (each prefetch such readers started
    /// stayed cached unread: 8-15 pzstd frames under fio's four random readers).
    pub fn for_random(&self, span: usize) -> bool {
        self.lock().random.contains(&(self.slot, span))
    }

    /// Whether a reader recently read span `span` to its end (see [`SpanCache::retire`]).
    pub fn read_to_end(&self, span: usize) -> bool {
        self.lock().ended.contains(&(self.slot, span))
    }

    /// Marks `span` as asked for ahead of a reader. False (nothing to do) if it is
    /// cached, being decoded or already asked for: a reader asks on every read.
    pub fn queue_prefetch(&self, span: usize) -> bool {
        let key = (self.slot, span);
        let mut st = self.lock();
        if st.lru.contains(&key) || st.decoding.contains_key(&key) {
            return false;
        }
        st.queued.insert(key)
    }

    /// Takes `span` off the prefetch queue; false if decoding it now would be waste:
    /// it is cached or being decoded, or a reader already read it to its end.
    pub fn start_prefetch(&self, span: usize) -> bool {
        let key = (self.slot, span);
        let mut st = self.lock();
        st.queued.remove(&key);
        !(st.lru.contains(&key) || st.decoding.contains_key(&key) || st.retired.contains(&key))
    }

    /// Whether `span` is cached or being decoded (does not touch its recency).
    #[cfg(test)]
    pub fn contains(&self, span: usize) -> bool {
        let key = (self.slot, span);
        let st = self.lock();
        st.lru.contains(&key) || st.decoding.contains_key(&key)
    }

    /// What the pool holds now, and its hits and decodes.
    #[cfg(test)]
    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Bytes currently cached in the pool.
    pub fn cached_bytes(&self) -> u64 {
        self.lock().bytes
    }
}

impl Drop for SpanCache {
    /// The archive is closed: its spans leave the pool (for the other archives).
    fn drop(&mut self) {
        let pool = self.pool.clone();
        let mut st = pool.lock();
        let mine: Vec<Key> = st
            .lru
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| k.0 == self.slot)
            .collect();
        for key in mine {
            if let Some(old) = st.lru.pop(&key) {
                st.bytes -= old.capacity() as u64;
                pool.recycle(&mut st, old);
            }
        }
        st.queued.retain(|k| k.0 != self.slot);
        st.retired.retain(|k| k.0 != self.slot);
        st.lingering.retain(|k| k.0 != self.slot);
        st.random.retain(|k| k.0 != self.slot);
        st.ended.retain(|k| k.0 != self.slot);
    }
}

/// A span being decoded; dropping it (also while unwinding) clears the mark and wakes
/// the readers waiting for that span.
struct Decoding<'a> {
    pool: &'a SpanPool,
    key: Key,
    finished: bool,
}

impl Decoding<'_> {
    /// Clears the mark under the lock the caller holds (waiters wake once it is
    /// released, and find what the caller put in the cache meanwhile).
    fn finish(mut self, st: &mut State) {
        st.decoding.remove(&self.key);
        self.pool.decoded.notify_all();
        self.finished = true;
    }
}

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.pool.lock().decoding.remove(&self.key);
            self.pool.decoded.notify_all();
        }
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

/// Gives the heap's free pages back to the kernel (`malloc_trim`): what setting up a
/// mount freed (archive head and tail, option parsing, a built index's scratch)
/// would otherwise stay resident in an idle daemon (measured: 3 MiB of its 11).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
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
    fn a_span_read_to_its_end_lingers_until_the_next_one_is() {
        let cache = SpanCache::new(1000, 0);
        let mut decodes = 0;
        let mut read = |span| {
            cache
                .get_or_insert(span, 100, Insert::Recent, |_, out| {
                    decodes += 1;
                    out.resize(100, span as u8);
                    Ok(())
                })
                .unwrap();
        };
        read(0);
        cache.retire(0, false);
        // A read of span 0 the kernel sent earlier, answered late: still cached.
        read(0);
        read(1);
        cache.retire(1, false);
        assert!(!cache.contains(0));
        assert!(cache.contains(1));
        // A straggler of a span already dropped is decoded again, and leaves with the
        // next span read to its end instead of staying cached.
        read(0);
        assert!(cache.contains(0));
        read(2);
        cache.retire(2, false);
        assert!(!cache.contains(0) && !cache.contains(1) && cache.contains(2));
        assert_eq!(decodes, 4);
    }

    #[test]
    fn readers_waiting_for_a_decode_never_decode_it_again() {
        for _ in 0..20 {
            let cache = Arc::new(SpanCache::new(1 << 20, 100));
            let decodes = Arc::new(AtomicU64::new(0));
            let readers: Vec<_> = (0..8)
                .map(|i| {
                    let (cache, decodes) = (cache.clone(), decodes.clone());
                    std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_micros(i * 300));
                        let v = cache
                            .get_or_insert(3, 100, Insert::Recent, |_, out| {
                                decodes.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_millis(5));
                                out.resize(100, 3);
                                Ok(())
                            })
                            .unwrap();
                        assert_eq!(v.len(), 100);
                    })
                })
                .collect();
            for r in readers {
                r.join().unwrap();
            }
            assert_eq!(decodes.load(Ordering::SeqCst), 1);
        }
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
        cache.retire(5, false);
        assert!(!cache.start_prefetch(5));
        // A queued span nobody read yet is decoded.
        assert!(cache.queue_prefetch(6));
        assert!(cache.start_prefetch(6));
        // Cached spans are not asked for; a retired span read again may be prefetched
        // again later.
        cache.get_or_insert(6, 100, Insert::Recent, fill).unwrap();
        assert!(!cache.queue_prefetch(6));
        cache.get_or_insert(5, 100, Insert::Recent, fill).unwrap();
        cache.retire(5, false);
        cache.get_or_insert(5, 100, Insert::Recent, fill).unwrap();
        cache.retire(5, false);
        assert!(!cache.start_prefetch(5));
        cache.get_or_insert(5, 100, Insert::Recent, fill).unwrap();
        assert!(cache.queue_prefetch(7));
        // Only the last RETIRED_KEPT retired spans are remembered.
        for k in 100..100 + RETIRED_KEPT + 1 {
            cache.get_or_insert(k, 1, Insert::Recent, fill).unwrap();
            cache.retire(k, false);
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
    fn archives_in_one_pool_share_its_cap_and_leave_with_their_spans() {
        let pool = SpanPool::new(1000);
        let a = SpanCache::in_pool(&pool, 100);
        let b = SpanCache::in_pool(&pool, 200);
        let fill = |n: usize, v: u8| {
            move |_, out: &mut Vec<u8>| {
                out.resize(n, v);
                Ok(())
            }
        };
        // Span 0 of `a` and span 0 of `b` are different spans.
        assert_eq!(
            a.get_or_insert(0, 100, Insert::Recent, fill(100, 1))
                .unwrap()[0],
            1
        );
        assert_eq!(
            b.get_or_insert(0, 200, Insert::Recent, fill(200, 2))
                .unwrap()[0],
            2
        );
        assert_eq!(
            a.get_or_insert(0, 100, Insert::Recent, |_, _| panic!("hit"))
                .unwrap()[0],
            1
        );
        let s = pool.stats();
        assert_eq!((s.spans, s.hits, s.misses, s.cached_bytes), (2, 1, 2, 300));
        // Together they stay under the one cap.
        for k in 1..20 {
            a.get_or_insert(k, 100, Insert::Recent, fill(100, 3))
                .unwrap();
            b.get_or_insert(k, 200, Insert::Recent, fill(200, 4))
                .unwrap();
            let st = pool.lock();
            let aside: u64 = st.spare.iter().map(|b| b.capacity() as u64).sum();
            assert!(st.bytes + aside <= 1000, "{} + {aside}", st.bytes);
        }
        // Read to its end, a span of a shared pool stays, first to be evicted.
        a.retire(19, false);
        assert!(a.contains(19));
        assert_eq!(
            pool.lock().lru.peek_lru().map(|(k, _)| *k),
            Some((a.slot, 19))
        );
        // A closed archive's spans leave the pool.
        drop(b);
        let st = pool.lock();
        assert!(st.lru.iter().all(|(k, _)| k.0 == a.slot));
        assert_eq!(st.bytes, st.lru.len() as u64 * 100);
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
