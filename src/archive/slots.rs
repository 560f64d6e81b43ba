//! Decode slots: at most so many spans of one archive are decoded at a time, whoever
//! asks (readers, the prefetch threads, the filler). Each decode holds a span buffer
//! and its compressed bytes (an 8 MiB pzstd frame costs about 11 MiB), and from a local
//! file decoding is bound by the cores, so more decodes at once than cores only add
//! memory: eight readers of a tar.zst of 8 MiB frames peaked at 44-118 MiB, 46-54 with
//! the limit.

use std::sync::{Condvar, Mutex};

/// Counts decodes in progress and makes the one over the limit wait.
pub(super) struct Slots {
    limit: usize,
    busy: Mutex<usize>,
    freed: Condvar,
}

/// A decode in progress; dropping it (also while unwinding) frees its slot.
pub(super) struct Slot<'a>(&'a Slots);

impl Slots {
    /// Slots for an archive read from a local file (one more than the cores, so a
    /// core never idles while a decode's input is read) or from a remote source
    /// (whose decodes mostly wait on the network: as many as FUSE threads).
    pub(super) fn for_source(local: bool) -> Slots {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Slots::new(if local { cores + 1 } else { REMOTE_SLOTS })
    }

    pub(super) fn new(limit: usize) -> Slots {
        Slots {
            limit: limit.max(1),
            busy: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits for a free slot and takes it.
    pub(super) fn take(&self) -> Slot<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy >= self.limit {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy += 1;
        Slot(self)
    }

    #[cfg(test)]
    fn busy(&self) -> usize {
        *self.busy.lock().unwrap()
    }
}

/// Decodes at a time from a remote source.
const REMOTE_SLOTS: usize = 8;

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut busy = self.0.busy.lock().unwrap_or_else(|p| p.into_inner());
        *busy -= 1;
        drop(busy);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn no_more_decodes_at_once_than_slots_and_every_one_runs() {
        let slots = Arc::new(Slots::new(3));
        let peak = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let (slots, peak, ran) = (slots.clone(), peak.clone(), ran.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _slot = slots.take();
                        peak.fetch_max(slots.busy(), Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        ran.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 240);
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        assert_eq!(slots.busy(), 0);
    }

    #[test]
    fn a_panicking_decode_frees_its_slot() {
        let slots = Arc::new(Slots::new(1));
        let s = slots.clone();
        let r = std::thread::spawn(move || {
            let _slot = s.take();
            panic!("decoder panicked");
        })
        .join();
        assert!(r.is_err());
        let _slot = slots.take();
        assert_eq!(slots.busy(), 1);
    }
}
