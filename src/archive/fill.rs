//! The filler: one low-priority background thread per process that works through
//! local archives with random readers in stream order, so that readers that keep
//! jumping around (a tree walk in path order, fio's random reads) soon find every
//! byte at hand: a compressed stream's spans are decoded whole into its spill file
//! (they stop inflating on their own time), a plain tar is read into the page cache
//! in [`PLAIN_CHUNK`]s (they stop waiting for the disk head).
//!
//! Each span a random reader had to decode and spill, and each small read of a plain
//! tar, earns its archive more filling, up to [`FILL_CREDIT`] units each (the n-th
//! earns n, so a single read costs one unit): a walk over the whole
//! tree fills the whole archive on the second core, while a few random reads into a
//! huge archive cost at most a few dozen MiB of work. The spill budget bounds the
//! spill files. Remote sources are never filled: that would be a download.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};

use super::{Backing, Inner, SeekTable};
use crate::cache::Insert;
use crate::source::Source;

/// Units (spans, plain chunks) filled ahead for each one a random reader paid for.
pub(super) const FILL_CREDIT: usize = 16;

/// The piece of a plain tar the filler reads at a time.
const PLAIN_CHUNK: u64 = 1 << 20;

/// Niceness of the filler thread: readers waiting on a span come first.
const FILL_NICE: libc::c_int = 10;

/// Archives waiting for the filler, and whether its thread runs.
static QUEUE: Mutex<(VecDeque<Weak<Inner>>, bool)> = Mutex::new((VecDeque::new(), false));

/// A random reader of `inner` decoded and spilled a span, or read a little of a plain
/// tar: grants it more filling and queues it for the filler (started on first use).
pub(super) fn earned(inner: &std::sync::Arc<Inner>) {
    if inner.fill_next.load(Ordering::Relaxed) >= inner.fill_units {
        return;
    }
    // The n-th paid-for unit earns n (at most FILL_CREDIT): one small read of a huge
    // layer (a lazily pulled image) costs one unit, a walk soon gets the full rate.
    let n = inner.fill_earned.fetch_add(1, Ordering::Relaxed) + 1;
    inner
        .fill_credit
        .fetch_add(n.min(FILL_CREDIT), Ordering::Relaxed);
    queue(inner);
}

/// How many units the filler works through for a reader of `archive` through
/// `backing` and `table` (0: none).
pub(super) fn units(archive: &dyn Source, backing: &Backing, table: &SeekTable) -> usize {
    if !archive.local() {
        return 0;
    }
    match backing {
        Backing::Spans(_) => table.span_count(),
        Backing::Plain => {
            usize::try_from(archive.identity().size.div_ceil(PLAIN_CHUNK)).unwrap_or(usize::MAX)
        }
        Backing::CacheFile(_) => 0,
    }
}

fn queue(inner: &std::sync::Arc<Inner>) {
    if inner.fill_next.load(Ordering::Relaxed) >= inner.fill_units
        || inner
            .fill_queued
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let mut q = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
    q.0.push_back(std::sync::Arc::downgrade(inner));
    if !q.1 {
        q.1 = true;
        let started = std::thread::Builder::new()
            .name("snapfs-fill".into())
            .spawn(run);
        if started.is_err() {
            // No thread: the readers decode for themselves, as without a filler.
            q.1 = false;
            q.0.clear();
        }
    }
}

fn run() {
    // SAFETY: setpriority on this thread (the calling thread's id) has no other effect.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, FILL_NICE);
    }
    let mut buf = Vec::new();
    loop {
        let next = {
            let mut q = QUEUE.lock().unwrap_or_else(|e| e.into_inner());
            match q.0.pop_front() {
                Some(w) => w,
                None => {
                    q.1 = false;
                    return;
                }
            }
        };
        let Some(inner) = next.upgrade() else {
            continue;
        };
        let t0 = std::time::Instant::now();
        let from = inner.fill_next.load(Ordering::Relaxed);
        fill(&inner, &mut buf);
        log::debug!(
            "filler: {} units {from}..{} of {} in {:.3} s",
            inner.path.display(),
            inner
                .fill_next
                .load(Ordering::Relaxed)
                .min(inner.fill_units),
            inner.fill_units,
            t0.elapsed().as_secs_f64()
        );
        inner.fill_queued.store(false, Ordering::Release);
        if inner.fill_credit.load(Ordering::Relaxed) > 0 {
            queue(&inner);
        }
    }
}

/// Fills `inner` in stream order while it has credit (and room), and readers: once
/// the filler holds the last reference (the view is gone), it stops.
fn fill(inner: &std::sync::Arc<Inner>, buf: &mut Vec<u8>) {
    let count = inner.fill_units;
    while inner.fill_credit.load(Ordering::Relaxed) > 0 {
        let unit = inner.fill_next.fetch_add(1, Ordering::Relaxed);
        let go_on = unit < count
            && std::sync::Arc::strong_count(inner) > 1
            && inner.changed.get().is_none()
            && match inner.backing {
                Backing::Plain => read_chunk(inner, unit, buf),
                _ => spill_span(inner, unit),
            };
        if !go_on {
            inner.fill_credit.store(0, Ordering::Relaxed);
            return;
        }
    }
}

/// Decodes span `span` whole into the spill file (unless it is there); false when the
/// filling of this archive should stop (no spill file, no room).
///
/// The span goes through the cache, as a reader's would: a random reader that wants it
/// meanwhile waits for this decode, and the filler waits for a reader's decode or takes
/// the span a reader left cached for the spill writer, instead of decoding it a second
/// time on the other core (fio's four random readers on the 1 GiB tar.zst: its 129
/// frames filled in 0.86 s instead of 1.72, peak RSS 44 instead of 74 MiB).
pub(super) fn spill_span(inner: &Inner, span: usize) -> bool {
    let (Some(spill), Backing::Spans(cache)) =
        (inner.spill.get().and_then(|s| s.as_ref()), &inner.backing)
    else {
        return false;
    };
    let (start, end) = inner.table.span_range(span);
    let len = end - start;
    if spill.stored(span) >= len {
        return true;
    }
    if !spill.has_room(len - spill.stored(span)) {
        return false;
    }
    let whole = |_, out: &mut Vec<u8>| {
        cache.decoding_for_random(span);
        inner.decode_span(span, usize::MAX, out)
    };
    match cache.get_or_insert(span, len as usize, Insert::Probation, whole) {
        // A span that does not decode is left to its readers (their EIO).
        Err(e) => log::debug!("filler: span {span}: {e}"),
        Ok(data) if data.len() as u64 == len => {
            // The spill writer or a reader may be storing a prefix of it right now.
            spill.store_waiting(span, start, &data);
            drop(data);
            // Not stored (a failed write, or the writer held it too long): the cache
            // keeps it, as it would a reader's span.
            if spill.stored(span) >= len {
                cache.release(span);
            }
        }
        Ok(_) => log::debug!("filler: span {span} decoded short"),
    }
    inner.fill_credit.fetch_sub(1, Ordering::Relaxed);
    true
}

/// Reads chunk `chunk` of a plain tar (into the page cache; the bytes are dropped);
/// false when the archive ends or cannot be read.
fn read_chunk(inner: &Inner, chunk: usize, buf: &mut Vec<u8>) -> bool {
    buf.resize(PLAIN_CHUNK as usize, 0);
    let off = chunk as u64 * PLAIN_CHUNK;
    let ok = matches!(inner.archive.read_at(buf, off), Ok(n) if n > 0);
    inner.fill_credit.fetch_sub(1, Ordering::Relaxed);
    ok
}
