//! The LRU cache of decompressed spans, capped in bytes. Concurrent readers of the same
//! span wait for one decoder instead of decoding it twice.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;

use crate::error::Result;

struct State {
    lru: LruCache<usize, Arc<Vec<u8>>>,
    bytes: u64,
    decoding: HashSet<usize>,
}

/// Decompressed spans keyed by span number.
pub struct SpanCache {
    cap: u64,
    state: Mutex<State>,
    decoded: Condvar,
}

impl SpanCache {
    /// A cache holding at most `cap` bytes of spans (the most recently used one is
    /// always kept, even if it alone exceeds the cap).
    pub fn new(cap: u64) -> Self {
        SpanCache {
            cap,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                decoding: HashSet::new(),
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
    pub fn get_or_insert(
        &self,
        key: usize,
        need: usize,
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
        drop(st);

        // Clears the mark even if `decode` panics, so waiters never block forever.
        let mark = Decoding { cache: self, key };
        let mut buf = Vec::new();
        let result = decode(have, &mut buf);
        drop(mark);

        let mut st = self.lock();
        result?;
        let value = Arc::new(buf);
        st.bytes += value.len() as u64;
        if let Some(old) = st.lru.put(key, value.clone()) {
            st.bytes -= old.len() as u64;
        }
        while st.bytes > self.cap && st.lru.len() > 1 {
            if let Some((_, old)) = st.lru.pop_lru() {
                st.bytes -= old.len() as u64;
            }
        }
        Ok(value)
    }

    /// Whether `key` is cached or being decoded (does not touch its recency).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_by_bytes_and_counts_decodes() {
        let cache = SpanCache::new(250);
        let mut decodes = 0;
        for key in [0, 1, 0, 2, 3, 0] {
            let v = cache
                .get_or_insert(key, 100, |_, out| {
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
    fn short_prefixes_are_extended() {
        let cache = SpanCache::new(1000);
        let v = cache.get_or_insert(1, 10, |have, out| {
            assert_eq!(have, 0);
            out.resize(20, 1);
            Ok(())
        });
        assert_eq!(v.unwrap().len(), 20);
        let hit = cache.get_or_insert(1, 20, |_, _| panic!("must hit"));
        assert_eq!(hit.unwrap().len(), 20);
        let longer = cache.get_or_insert(1, 50, |have, out| {
            assert_eq!(have, 20);
            out.resize(80, 1);
            Ok(())
        });
        assert_eq!(longer.unwrap().len(), 80);
        assert_eq!(cache.cached_bytes(), 80);
    }

    #[test]
    fn errors_are_not_cached() {
        let cache = SpanCache::new(1000);
        let r = cache.get_or_insert(7, 1, |_, _| Err(crate::error::Error::Errno(5)));
        assert!(r.is_err());
        let v = cache.get_or_insert(7, 1, |_, out| {
            out.push(1);
            Ok(())
        });
        assert_eq!(v.unwrap().len(), 1);
    }

    #[test]
    fn a_panicking_decode_does_not_block_later_readers() {
        let cache = SpanCache::new(1000);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = cache.get_or_insert(3, 1, |_, _| panic!("decoder bug"));
        }));
        assert!(r.is_err());
        assert!(!cache.contains(3), "the decoding mark outlived the panic");
        let v = cache.get_or_insert(3, 1, |_, out| {
            out.push(9);
            Ok(())
        });
        assert_eq!(*v.unwrap(), vec![9]);
    }
}
