//! The spill writer: one background thread per process that writes the span prefixes
//! random readers decoded into their archives' spill files, so that a reader returns
//! its bytes as soon as they are decoded instead of waiting while the page cache takes
//! them (new pages of an ext4 file cost about as much as decoding zstd: an 8 MiB pzstd
//! frame took 8 ms to decode and 11 ms to store, and a tree walk in path order stored
//! one on nearly every read of its first directories: its first 10,000 files of the
//! 100k-file tar.zst took 1.30-2.40 s, 1.33-1.49 s with the writer).
//!
//! A queued span stays in the span cache until it is stored, so readers find it there
//! in the meantime; then the cache lets go of it. Few jobs wait at a time (each holds a
//! span buffer); when they are all taken, a reader stores for itself as before.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, OnceLock};

use super::spill::Spill;
use super::{Backing, Inner};

/// Spans waiting to be stored at most.
const QUEUED: usize = 4;

/// A decoded prefix of span `span` (at stream offset `start`) of `inner`'s archive.
struct Job {
    inner: Arc<Inner>,
    span: usize,
    start: u64,
    data: Arc<Vec<u8>>,
}

/// Where jobs go (the thread starts on first use; none if it could not start).
static JOBS: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();

/// Stores the prefix `data` of span `span` (at stream offset `start`) in `spill`, the
/// spill file of `inner`'s archive: hands it to the writer, or stores it here when the
/// writer cannot take it (its queue is full, or it has no thread). True if the span is
/// in the file now, so the cache may let go of it (or the filler is writing it: soon).
pub(super) fn store(
    inner: &Arc<Inner>,
    spill: &Spill,
    span: usize,
    start: u64,
    data: &Arc<Vec<u8>>,
) -> bool {
    if queue(inner, span, start, data) {
        return false;
    }
    spill.store(span, start, data);
    spill.stored(span) >= data.len() as u64 || spill.writing(span)
}

/// Hands a job to the writer; false if it did not take it.
fn queue(inner: &Arc<Inner>, span: usize, start: u64, data: &Arc<Vec<u8>>) -> bool {
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUED);
        let started = std::thread::Builder::new()
            .name("snapfs-spill".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    write(job);
                }
            });
        started.ok().map(|_| tx)
    });
    let Some(tx) = jobs else {
        return false;
    };
    let job = Job {
        inner: inner.clone(),
        span,
        start,
        data: data.clone(),
    };
    tx.try_send(job).is_ok()
}

/// Stores one job's bytes; once the spill file holds them, the span leaves the cache.
fn write(job: Job) {
    let Job {
        inner,
        span,
        start,
        data,
    } = job;
    let Some(spill) = inner.spill.get().and_then(|s| s.as_ref()) else {
        return;
    };
    spill.store_waiting(span, start, &data);
    if spill.stored(span) >= data.len() as u64 {
        if let Backing::Spans(cache) = &inner.backing {
            cache.retire(span, true);
        }
    }
}
