//! Archive bytes: format detection from magic bytes, the archive's identity (what an index
//! is tied to), the seek tables of compressed formats, and random reads of the
//! uncompressed tar stream ([`StreamReader`]). Reads through a [`Source`]; knows
//! nothing of where the bytes live, of paths in the tree, or of FUSE.

mod ahead;
mod bytes;
pub mod bzip2;
mod fill;
pub mod gzip;
pub mod pipe;
mod slots;
pub mod spill;
mod spill_writer;
pub mod tar;
pub mod xz;
pub mod zstd;

pub use bytes::ReadBytes;

/// Span arithmetic shared by the seek tables: span `i` starts at
/// checkpoint `i`'s uncompressed offset and ends at the next one (the last at the
/// stream size).
mod spans {
    /// `[start, end)` of span `i`; `(size, size)` past the end.
    pub fn range<T>(cps: &[T], start: fn(&T) -> u64, size: u64, i: usize) -> (u64, u64) {
        let Some(cp) = cps.get(i) else {
            return (size, size);
        };
        let begin = start(cp);
        let end = i
            .checked_add(1)
            .and_then(|j| cps.get(j))
            .map_or(size, start);
        (begin, end.max(begin))
    }

    /// The span holding offset `off` (binary search); `None` at or past the end.
    pub fn of<T>(cps: &[T], start: fn(&T) -> u64, size: u64, off: u64) -> Option<usize> {
        if off >= size {
            return None;
        }
        cps.partition_point(|c| start(c) <= off).checked_sub(1)
    }

    /// Length of the longest span (0 for an empty table).
    pub fn max_len<T>(cps: &[T], start: fn(&T) -> u64, size: u64) -> u64 {
        (0..cps.len())
            .map(|i| {
                let (b, e) = range(cps, start, size, i);
                e - b
            })
            .max()
            .unwrap_or(0)
    }
}

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::{Insert, SpanCache, SpanPool};
use crate::error::{Error, Result};
use crate::source::Source;

/// How the tar stream is stored in the archive file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (one or many members).
    Gzip,
    /// zstd (one or many frames).
    Zstd,
    /// xz (one or many streams of one or many blocks).
    Xz,
    /// bzip2 (one or many streams).
    Bzip2,
}

impl Compression {
    /// Detects the format from the first bytes of the file (never from its name).
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
            || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
        {
            // A zstd frame, or a skippable frame (as seekable-zstd writers may lead with).
            Compression::Zstd
        } else if head.starts_with(&xz::MAGIC) {
            Compression::Xz
        } else if is_bzip2(head) {
            Compression::Bzip2
        } else {
            Compression::None
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
        }
    }

    /// Stable numeric code for the index file.
    pub fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
            Compression::Xz => 3,
            Compression::Bzip2 => 4,
        }
    }

    /// Inverse of [`Compression::code`].
    pub fn from_code(c: u8) -> Option<Compression> {
        match c {
            0 => Some(Compression::None),
            1 => Some(Compression::Gzip),
            2 => Some(Compression::Zstd),
            3 => Some(Compression::Xz),
            4 => Some(Compression::Bzip2),
            _ => None,
        }
    }
}

/// Bytes [`Compression::detect`] looks at.
pub const DETECT_BYTES: usize = 16;

/// `BZh`, a level digit, then a block or the end-of-stream marker: a tar whose first
/// member's name merely starts with `BZh` is not taken for bzip2.
fn is_bzip2(head: &[u8]) -> bool {
    let Some((magic, rest)) = head.split_at_checked(4) else {
        return false;
    };
    let next = rest
        .iter()
        .take(6)
        .fold(0u64, |a, &b| a << 8 | u64::from(b));
    magic[..3] == *b"BZh"
        && (b'1'..=b'9').contains(&magic[3])
        && rest.len() >= 6
        && (next == bzip2::BLOCK_MAGIC || next == bzip2::EOS_MAGIC)
}

/// Bytes hashed at each end of the archive for its identity.
const ID_EDGE: u64 = 64 << 10;

/// What an index is tied to: size, mtime and a hash of the first and last bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveId {
    /// File size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// CRC-32 of the first 64 KiB.
    pub head_crc: u32,
    /// CRC-32 of the last 64 KiB.
    pub tail_crc: u32,
}

impl ArchiveId {
    /// Reads the identity of a source (touches only its first and last 64 KiB).
    pub fn of(source: &dyn Source) -> Result<ArchiveId> {
        let ident = source.identity();
        let size = ident.size;
        let crc = |off: u64| -> Result<u32> {
            let len = ID_EDGE.min(size - off) as usize;
            let mut buf = vec![0u8; len];
            source
                .read_exact_at(&mut buf, off)
                .map_err(|e| Error::io("reading", source.name(), e))?;
            Ok(crc32fast::hash(&buf))
        };
        Ok(ArchiveId {
            size,
            mtime_ns: ident.version,
            head_crc: crc(0)?,
            tail_crc: crc(size.saturating_sub(ID_EDGE))?,
        })
    }
}

/// How to reach any offset of the uncompressed stream.
pub enum SeekTable {
    /// Plain tar: the stream is the file.
    Plain,
    /// gzip checkpoints.
    Gzip(gzip::GzipSeekTable),
    /// zstd frame checkpoints.
    Zstd(zstd::ZstdSeekTable),
    /// xz blocks (from xz's own index).
    Xz(xz::XzSeekTable),
    /// bzip2 blocks.
    Bzip2(bzip2::Bz2SeekTable),
}

impl SeekTable {
    /// The compression this table belongs to.
    pub fn compression(&self) -> Compression {
        match self {
            SeekTable::Plain => Compression::None,
            SeekTable::Gzip(_) => Compression::Gzip,
            SeekTable::Zstd(_) => Compression::Zstd,
            SeekTable::Xz(_) => Compression::Xz,
            SeekTable::Bzip2(_) => Compression::Bzip2,
        }
    }

    /// Number of independently decodable spans (0 for plain tar).
    pub fn span_count(&self) -> usize {
        match self {
            SeekTable::Plain => 0,
            SeekTable::Gzip(t) => t.span_count(),
            SeekTable::Zstd(t) => t.span_count(),
            SeekTable::Xz(t) => t.span_count(),
            SeekTable::Bzip2(t) => t.span_count(),
        }
    }

    /// The span holding stream offset `off` and its `[start, end)` range.
    pub fn span_at(&self, off: u64) -> Option<(usize, (u64, u64))> {
        match self {
            SeekTable::Plain => None,
            SeekTable::Gzip(t) => t.span_of(off).map(|i| (i, t.span_range(i))),
            SeekTable::Zstd(t) => t.span_of(off).map(|i| (i, t.span_range(i))),
            SeekTable::Xz(t) => t.span_of(off).map(|i| (i, t.span_range(i))),
            SeekTable::Bzip2(t) => t.span_of(off).map(|i| (i, t.span_range(i))),
        }
    }

    /// The `[start, end)` stream range of span `i`.
    pub fn span_range(&self, i: usize) -> (u64, u64) {
        match self {
            SeekTable::Plain => (0, 0),
            SeekTable::Gzip(t) => t.span_range(i),
            SeekTable::Zstd(t) => t.span_range(i),
            SeekTable::Xz(t) => t.span_range(i),
            SeekTable::Bzip2(t) => t.span_range(i),
        }
    }

    /// Length of span `i`.
    pub fn span_len(&self, i: usize) -> u64 {
        let (start, end) = self.span_range(i);
        end - start
    }

    /// The longest span one read may have to decompress (0 for plain tar).
    pub fn max_span_len(&self) -> u64 {
        match self {
            SeekTable::Plain => 0,
            SeekTable::Gzip(t) => t.max_span_len(),
            SeekTable::Zstd(t) => t.max_span_len(),
            SeekTable::Xz(t) => t.max_span_len(),
            SeekTable::Bzip2(t) => t.max_span_len(),
        }
    }
}

/// An opened archive: its source, its name and its identity.
pub struct Archive {
    /// Where its bytes are.
    pub source: Arc<dyn Source>,
    /// Its name (for messages): a path, or what the source calls itself.
    pub path: PathBuf,
    /// Its identity.
    pub id: ArchiveId,
    /// The detected compression.
    pub compression: Compression,
}

impl Archive {
    /// Opens the local file or remote object (`s3://`, `http(s)://`) `path`, detects
    /// the format and reads the identity.
    pub fn open(path: &Path) -> Result<Archive> {
        Archive::from_source(crate::source::open(path)?)
    }

    /// An archive over `source`: detects the format and reads the identity.
    pub fn from_source(source: Arc<dyn Source>) -> Result<Archive> {
        let path = source.name();
        let mut head = [0u8; DETECT_BYTES];
        let n = source
            .read_at(&mut head, 0)
            .map_err(|e| Error::io("reading", &path, e))?;
        let compression = Compression::detect(&head[..n.min(head.len())]);
        let id = ArchiveId::of(&*source)?;
        Ok(Archive {
            source,
            path,
            id,
            compression,
        })
    }
}

/// A shared progress counter of compressed bytes consumed (for the progress bar).
pub type Progress = Arc<std::sync::atomic::AtomicU64>;

/// Counts bytes read through it into a [`Progress`].
pub struct CountingReader<R> {
    inner: R,
    progress: Progress,
}

impl<R> CountingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, progress: Progress) -> Self {
        CountingReader { inner, progress }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// Where decompressed bytes come from when a read arrives.
enum Backing {
    /// Plain tar: read the archive directly.
    Plain,
    /// Decode spans on demand through the LRU cache.
    Spans(Box<SpanCache>),
    /// A one-time full decompression into a cache file (streams that cannot be
    /// checkpointed: single-frame zstd, single-block xz, gzip with huge deflate blocks).
    CacheFile(File),
}

/// Threads that decode spans ahead of a sequential reader.
const PREFETCH_THREADS: usize = 2;
/// How many spans of a fast decoder (gzip, zstd) ahead of a reader are decoded (once
/// it reads a span's second half), but no more than [`PREFETCH_BYTES`] of spans unless
/// that is fewer than two. Four 4 MiB spans, not two, keep both cores inflating while
/// the reader catches up (1 GiB tar.gz read with `dd`, 410-530 MB/s instead of
/// 320-360); the 1 MiB members that `snapfs create` writes go twelve ahead, as a span
/// takes about a millisecond (512 MiB read with `dd`, 959-1034 MB/s against 773-922
/// four ahead, alternating runs).
const PREFETCH_SPANS: usize = 12;
/// The same for bzip2, a slow decoder: a span takes long enough that two ahead keep
/// both prefetch threads busy (64 MiB tar.bz2 read with fio, 1 MiB reads: the same
/// speed as four ahead), and more would only hold memory (with bzip2 blocks decoded
/// one after the other, peak RSS 21 instead of 27 MiB).
const PREFETCH_SPANS_SLOW: usize = 2;
/// The same for xz: one span ahead. A sequential reader still gets more than twice
/// ratarmount's speed, and each span in flight holds a span buffer and a liblzma
/// dictionary: the 64 MiB tar.xz read with fio peaked at 10.4-11.3 MiB instead of
/// 11.1-12.2 with two ahead (152-170 instead of 165-176 MiB/s, alternating runs).
const PREFETCH_SPANS_XZ: usize = 1;
/// Decoded bytes ahead of a reader: 8 MiB pzstd frames four ahead held 32 MiB more,
/// two ahead keep both cores busy as well.
const PREFETCH_BYTES: u64 = 16 << 20;
/// Reads that start this far into a span decode only the prefix they need.
const PREFIX_MIN: usize = 64 << 10;
/// Reads at least this large come from a sequential reader (kernel readahead) and
/// are never spilled.
const SEQUENTIAL_READ: usize = 128 << 10;
/// Extra bytes decoded past a random read (kernel readahead usually follows).
const PREFIX_SLACK: usize = 256 << 10;

/// Random reads of the uncompressed tar stream of one archive; safe to share
/// between threads. Sequential reads of a compressed stream prefetch the next span on
/// a background thread, so inflating overlaps with the reader (and uses a second core).
pub struct StreamReader {
    inner: Arc<Inner>,
    prefetch: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<usize>>>,
}

struct Inner {
    archive: Arc<dyn Source>,
    path: PathBuf,
    table: Arc<SeekTable>,
    backing: Backing,
    /// Set once a change was seen: from then on every read fails.
    changed: std::sync::OnceLock<String>,
    /// Whole spans decoded for random reads, made on the first such read (compressed
    /// streams only; see [`spill`]).
    spill: std::sync::OnceLock<Option<spill::Spill>>,
    /// Spans (plain tar: chunks) the filler may still decode or read ahead, the next
    /// one it looks at, and whether it has this archive queued (see [`fill`]).
    fill_credit: std::sync::atomic::AtomicUsize,
    /// How many units the filler works through (0: none; fixed at open).
    fill_units: usize,
    /// How many units readers paid for themselves so far.
    fill_earned: std::sync::atomic::AtomicUsize,
    fill_next: std::sync::atomic::AtomicUsize,
    fill_queued: std::sync::atomic::AtomicBool,
    /// Decodes of this archive's spans at a time (see [`slots`]).
    decodes: slots::Slots,
    /// Spans decoded ahead of a sequential reader.
    prefetch_spans: usize,
}

impl StreamReader {
    /// A reader over `archive` with `table`; spans are cached in `cache_bytes` at most.
    pub fn new(archive: Arc<dyn Source>, table: Arc<SeekTable>, cache_bytes: u64) -> Self {
        let backing = match &*table {
            SeekTable::Plain => Backing::Plain,
            _ => Backing::Spans(Box::new(SpanCache::new(cache_bytes, table.max_span_len()))),
        };
        Self::with_backing(archive, table, backing)
    }

    /// A reader over `archive` with `table` whose spans are cached in `pool`, shared
    /// with the other archives reading through it (one cap for all of them).
    pub fn in_pool(archive: Arc<dyn Source>, table: Arc<SeekTable>, pool: &Arc<SpanPool>) -> Self {
        let backing = match &*table {
            SeekTable::Plain => Backing::Plain,
            _ => Backing::Spans(Box::new(SpanCache::in_pool(pool, table.max_span_len()))),
        };
        Self::with_backing(archive, table, backing)
    }

    /// A reader that serves everything from an already decompressed cache file.
    pub fn with_cache_file(archive: Arc<dyn Source>, table: Arc<SeekTable>, cache: File) -> Self {
        Self::with_backing(archive, table, Backing::CacheFile(cache))
    }

    fn with_backing(archive: Arc<dyn Source>, table: Arc<SeekTable>, backing: Backing) -> Self {
        let fill_units = fill::units(&*archive, &backing, &table);
        let archive_local = archive.local();
        let prefetch_spans = prefetch_spans(&table);
        StreamReader {
            inner: Arc::new(Inner {
                fill_units,
                path: archive.name(),
                archive,
                table,
                backing,
                changed: std::sync::OnceLock::new(),
                spill: std::sync::OnceLock::new(),
                fill_credit: Default::default(),
                fill_earned: Default::default(),
                fill_next: Default::default(),
                fill_queued: Default::default(),
                decodes: slots::Slots::for_source(archive_local),
                prefetch_spans,
            }),
            prefetch: std::sync::OnceLock::new(),
        }
    }

    /// The archive's name, for messages.
    pub fn name(&self) -> &Path {
        &self.inner.path
    }

    /// Fails unless the source still is what it was when it was opened (and its
    /// index checked against it).
    pub fn verify_unchanged(&self) -> Result<()> {
        self.inner.check_unchanged(0)
    }

    /// Fills `buf` from stream offset `off`. The caller keeps reads within a member's
    /// data, so a short read means the archive changed or is corrupt: an error.
    ///
    /// Every read then checks that the held descriptor is unchanged (size, mtime,
    /// ctime) and that the archive's path still names it: an archive written in place,
    /// truncated, or replaced (renamed over, deleted) while mounted makes this and every
    /// later read fail (EIO), also reads that the span cache could still answer. The
    /// check runs after the bytes were read, so bytes that come from a changed file
    /// never reach the caller.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let r = self.read_unchecked(buf, off);
        self.inner.check_unchanged(off)?;
        r
    }

    fn read_unchecked(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let inner = &*self.inner;
        match &inner.backing {
            Backing::Plain => {
                if buf.len() < SEQUENTIAL_READ {
                    // A random reader or a tree walk (of a local archive): the filler
                    // reads the archive into the page cache ahead of it.
                    fill::earned(&self.inner);
                }
                inner
                    .archive
                    .read_exact_at(buf, off)
                    .map_err(|e| inner.read_error(off, e))
            }
            Backing::CacheFile(f) => {
                FileExt::read_exact_at(f, buf, off).map_err(|e| inner.read_error(off, e))
            }
            Backing::Spans(cache) => {
                let last = self.inner.read_spans(cache, buf, off)?;
                self.read_on(cache, last);
                Ok(())
            }
        }
    }

    /// `len` bytes of the stream from `off`, checked as [`Self::read_exact_at`] checks
    /// them. A large read (the kernel's readahead of a streamed file) takes its bytes
    /// from the decoded spans: one that lies in one span shares the span's buffer (no
    /// copy, and no second buffer of its size for each request in flight), one across
    /// a span boundary gets a buffer only once both spans are decoded.
    pub fn read_at(&self, off: u64, len: usize) -> Result<ReadBytes> {
        let r = match &self.inner.backing {
            Backing::Spans(cache) if len >= SEQUENTIAL_READ => {
                match self.read_sequential(cache, off, len) {
                    Ok(Some(bytes)) => Ok(bytes),
                    Ok(None) => self.read_owned(off, len),
                    Err(e) => Err(e),
                }
            }
            _ => self.read_owned(off, len),
        };
        self.inner.check_unchanged(off)?;
        r
    }

    /// The pieces of a large read from the spans it covers (see [`Self::read_at`]);
    /// `None` if a span is shorter than indexed (the copying path then reports it).
    fn read_sequential(
        &self,
        cache: &SpanCache,
        off: u64,
        len: usize,
    ) -> Result<Option<ReadBytes>> {
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < len {
            let at = off + done as u64;
            let Some((piece, last)) = self.read_in_span(cache, at, len - done)? else {
                return Ok(None);
            };
            self.read_on(cache, Some(last));
            done += piece.len();
            pieces.push(piece);
        }
        if pieces.len() == 1 {
            return Ok(pieces.pop());
        }
        let mut joined = Vec::with_capacity(len);
        for p in &pieces {
            joined.extend_from_slice(p);
        }
        Ok(Some(ReadBytes::Owned(joined)))
    }

    /// A sequential read of up to `len` bytes from `off`, to the end of its span at
    /// most, as a range of the span's buffer, with what [`Inner::read_spans`] returns
    /// for it; `None` if the span is shorter than indexed. The reader's first read in
    /// a span asks for the next span at once, so that it decodes on the second core
    /// while this one decodes (at a file's first span, or when the reader outran the
    /// prefetch), not only once the reader is in this one's second half.
    fn read_in_span(
        &self,
        cache: &SpanCache,
        off: u64,
        len: usize,
    ) -> Result<Option<(ReadBytes, LastRead)>> {
        let inner = &self.inner;
        let (span, (start, end)) = inner.table.span_at(off).ok_or_else(|| inner.eof(off))?;
        let span_len = (end - start) as usize;
        let within = (off - start) as usize;
        let next = span + 1;
        if within < len && next < inner.table.span_count() && cache.queue_prefetch(next) {
            self.prefetch(next);
        }
        let take = len.min(span_len - within);
        let read = SpanRead {
            span,
            within,
            need: within + take,
            sequential: true,
        };
        let data = inner.span_data(cache, read, 0, &mut false)?;
        if data.len() < within + take {
            return Ok(None);
        }
        if within + take == span_len {
            cache.retire(span, false);
        }
        let last = (span, within + take, span_len, false);
        Ok(Some((ReadBytes::Shared(data, within..within + take), last)))
    }

    fn read_owned(&self, off: u64, len: usize) -> Result<ReadBytes> {
        let mut buf = vec![0u8; len];
        self.read_unchecked(&mut buf, off)?;
        Ok(ReadBytes::Owned(buf))
    }

    /// After a read that ended in `last` (see [`Inner::read_spans`]): once a reader is
    /// in the second half of a span, the next ones are decoded ahead (unless a random
    /// reader read it: it will not go on from there).
    fn read_on(&self, cache: &SpanCache, last: Option<LastRead>) {
        let inner = &*self.inner;
        let Some((span, within, len, random)) = last else {
            return;
        };
        if within * 2 >= len && !random {
            for next in span + 1..=span + inner.prefetch_spans {
                if next < inner.table.span_count() && cache.queue_prefetch(next) {
                    self.prefetch(next);
                }
            }
        }
    }

    /// Asks the background threads (started on first use) to decode `span`.
    fn prefetch(&self, span: usize) {
        let tx = self.prefetch.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<usize>();
            let rx = Arc::new(std::sync::Mutex::new(rx));
            for _ in 0..PREFETCH_THREADS {
                let inner = Arc::downgrade(&self.inner);
                let rx = rx.clone();
                std::thread::spawn(move || loop {
                    let next = rx.lock().map(|r| r.recv());
                    let Ok(Ok(span)) = next else { break };
                    let Some(inner) = inner.upgrade() else { break };
                    if let Backing::Spans(cache) = &inner.backing {
                        if !cache.start_prefetch(span) || inner.spilled(span) {
                            continue;
                        }
                        let full = |_, out: &mut Vec<u8>| inner.decode_span(span, usize::MAX, out);
                        let len = inner.table.span_len(span) as usize;
                        if let Err(e) = cache.get_or_insert(span, len, Insert::Recent, full) {
                            log::debug!("prefetch of span {span} failed: {e}");
                        }
                    }
                });
            }
            std::sync::Mutex::new(tx)
        });
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(span);
        }
    }
}

/// Spans decoded ahead of a sequential reader of `table`'s stream.
fn prefetch_spans(table: &SeekTable) -> usize {
    let most = match table {
        SeekTable::Xz(_) => return PREFETCH_SPANS_XZ,
        SeekTable::Bzip2(_) => PREFETCH_SPANS_SLOW,
        _ => PREFETCH_SPANS,
    };
    let fit = PREFETCH_BYTES / table.max_span_len().max(1);
    usize::try_from(fit).map_or(most, |n| n.clamp(2, most))
}

/// Where a read of spans ended: the last span, the offset within it, its length, and
/// whether a random reader got it (see [`Inner::read_spans`]).
type LastRead = (usize, usize, usize, bool);

/// Which bytes of which span a read wants.
#[derive(Clone, Copy)]
struct SpanRead {
    span: usize,
    /// Where the read starts in the span.
    within: usize,
    /// Bytes of the span it needs (from its start).
    need: usize,
    /// A sequential reader's (it wants the whole span decoded).
    sequential: bool,
}

impl Inner {
    /// Fails if the archive changed since this reader was made (see
    /// [`StreamReader::read_exact_at`]); the first change seen is remembered.
    fn check_unchanged(&self, off: u64) -> Result<()> {
        if let Some(why) = self.changed.get() {
            return Err(self.changed_error(why.clone(), off));
        }
        match self.archive.check_unchanged() {
            Ok(()) => Ok(()),
            Err(why) => {
                let why = self.changed.get_or_init(|| why).clone();
                Err(self.changed_error(why, off))
            }
        }
    }

    fn changed_error(&self, why: String, off: u64) -> Error {
        Error::archive(&self.path, None, Some(off), format!("{why}; remount it"))
    }

    fn read_error(&self, off: u64, e: io::Error) -> Error {
        Error::archive(&self.path, None, Some(off), format!("read failed: {e}"))
    }

    /// Copies spans into `buf`; returns (last span, offset within it, its length,
    /// whether a random reader got it: decoded by this read deep inside the span, or
    /// from the spill file, or found cached as another random reader decoded it).
    fn read_spans(
        self: &Arc<Self>,
        cache: &SpanCache,
        buf: &mut [u8],
        mut off: u64,
    ) -> Result<Option<LastRead>> {
        let mut done = 0;
        let mut last = None;
        while done < buf.len() {
            let (span, (start, end)) = self.table.span_at(off).ok_or_else(|| self.eof(off))?;
            let span_len = (end - start) as usize;
            let within = (off - start) as usize;
            let want = (buf.len() - done).min(span_len.saturating_sub(within));
            let need = within + want;
            // A random read: the decoded prefix of the span goes to the spill file,
            // and later reads within it come from there (the page cache) instead of
            // inflating it again.
            // Not a sequential reader's next span (it read the one before, not
            // spilled, to its end): the kernel keeps what it read, and it will not
            // come back. (A random read that runs into the next span read a spilled
            // one.)
            // Large reads are the kernel's readahead of a streamed file (random
            // readers ask for 4 KiB, small files for their size).
            let sequential = buf.len() >= SEQUENTIAL_READ
                || (within < PREFIX_MIN
                    && match span.checked_sub(1) {
                        Some(prev) => cache.read_to_end(prev) && !self.spilled(prev),
                        None => within == 0,
                    });
            let spill = if sequential { None } else { self.spill() };
            if let Some(s) = spill.filter(|s| s.stored(span) >= need as u64) {
                if want > 0 && s.read(&mut buf[done..done + want], off).is_ok() {
                    if within + want == span_len {
                        cache.retire(span, true);
                    }
                    done += want;
                    off += want as u64;
                    last = Some((span, within + want, span_len, true));
                    continue;
                }
            }
            let spill = spill.filter(|s| s.has_room(span_len as u64));
            // Spilled only if this read decoded it: a span already cached was decoded
            // ahead of a sequential reader, which will not come back to it.
            let mut decoded = false;
            let spilled_len = spill.map_or(0, |s| s.stored(span)) as usize;
            let read = SpanRead {
                span,
                within,
                need,
                sequential,
            };
            let data = self.span_data(cache, read, spilled_len, &mut decoded)?;
            let avail = data.len().saturating_sub(within);
            if avail == 0 {
                return Err(self.eof(off));
            }
            let n = avail.min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            // Stored by the spill writer (the span stays cached until then).
            let spilled = match spill {
                Some(s) if decoded && !sequential => {
                    let now = spill_writer::store(self, s, span, start, &data);
                    fill::earned(self);
                    now
                }
                _ => false,
            };
            drop(data);
            // Read to its end: the kernel keeps these bytes as the file's pages. In
            // the spill file: the daemon need not keep them either.
            if within + n == span_len || spilled {
                cache.retire(span, spilled);
            }
            done += n;
            off += n as u64;
            let random = !sequential && (decoded || cache.for_random(span));
            last = Some((span, within + n, span_len, random));
        }
        Ok(last)
    }

    /// Span `read.span` with at least its first `read.need` bytes, from the cache or
    /// decoded into it (`decoded` is then set). `spilled_len`: bytes of it the spill
    /// file holds.
    fn span_data(
        &self,
        cache: &SpanCache,
        read: SpanRead,
        spilled_len: usize,
        decoded: &mut bool,
    ) -> Result<Arc<Vec<u8>>> {
        let SpanRead {
            span,
            within,
            need,
            sequential,
        } = read;
        let insert = if within < PREFIX_MIN {
            Insert::Recent
        } else {
            Insert::Probation
        };
        cache.get_or_insert(span, need, insert, |have, out| {
            *decoded = true;
            if !sequential {
                cache.decoding_for_random(span);
            }
            // A read near the span's start or a sequential one wants all of it;
            // a random read deep inside only the prefix up to it, grown
            // geometrically (from what the cache or the spill file holds) so
            // in-span sequential reads stay linear.
            let have = have.max(spilled_len);
            let limit = if within < PREFIX_MIN || sequential {
                usize::MAX
            } else {
                (need + PREFIX_SLACK).max(have * 2)
            };
            self.decode_span(span, limit, out)
        })
    }

    /// The spill file, made on first use (none for plain tar or cache-file streams).
    fn spill(&self) -> Option<&spill::Spill> {
        self.spill
            .get_or_init(|| match self.backing {
                Backing::Spans(_) => spill::Spill::create(self.table.span_count()),
                _ => None,
            })
            .as_ref()
    }

    /// Whether span `span` is in the spill file (without making one).
    fn spilled(&self, span: usize) -> bool {
        self.spill
            .get()
            .and_then(|s| s.as_ref())
            .is_some_and(|s| s.has(span))
    }

    /// Decodes span `span`, or at least its first `limit` bytes (gzip stops there, xz
    /// and bzip2 after the block that reaches it; zstd decodes whole frames anyway).
    fn decode_span(&self, span: usize, limit: usize, out: &mut Vec<u8>) -> Result<()> {
        let _slot = self.decodes.take();
        let r = match &*self.table {
            SeekTable::Gzip(t) => {
                gzip::decode_span_prefix(&*self.archive, t, span, limit as u64, out)
            }
            SeekTable::Zstd(t) => zstd::decode_span(&*self.archive, t, span, out),
            SeekTable::Xz(t) => xz::decode_span_prefix(&*self.archive, t, span, limit as u64, out),
            SeekTable::Bzip2(t) => {
                bzip2::decode_span_prefix(&*self.archive, t, span, limit as u64, out)
            }
            SeekTable::Plain => Ok(()),
        };
        r.map_err(|e| Error::archive(&self.path, None, None, format!("decompression failed: {e}")))
    }

    fn eof(&self, off: u64) -> Error {
        Error::archive(
            &self.path,
            None,
            Some(off),
            "read past the end of the stream",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// 6 MB of semi-compressible bytes, as a gzip file in `dir` (a local source) and
    /// its seek table (1 MiB spans).
    fn gzip_stream(dir: &Path) -> (Vec<u8>, Arc<dyn Source>, Arc<SeekTable>) {
        let data: Vec<u8> = (0..6_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 % 61)
            .collect();
        let path = dir.join("x.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        std::fs::write(&path, enc.finish().unwrap()).unwrap();
        let file: Arc<dyn Source> = Arc::new(crate::source::FileSource::open(&path).unwrap());
        let mut indexer = gzip::GzipIndexer::new(
            io::BufReader::new(crate::source::SourceReader::new(file.clone())),
            1 << 20,
        );
        io::copy(&mut indexer, &mut io::sink()).unwrap();
        let table = Arc::new(SeekTable::Gzip(indexer.finish().unwrap()));
        (data, file, table)
    }

    /// `n` reads of up to 70,000 bytes at pseudo-random offsets (from `seed`) equal
    /// `data`; returns the generator's state.
    fn random_reads_are_exact(reader: &StreamReader, data: &[u8], seed: u64, n: usize) -> u64 {
        let mut x = seed;
        for _ in 0..n {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let off = (x >> 20) as usize % (data.len() - 70_000);
            let len = 1 + (x >> 50) as usize % 70_000;
            let mut got = vec![0u8; len];
            reader.read_exact_at(&mut got, off as u64).unwrap();
            assert_eq!(got, data[off..off + len], "at {off}+{len}");
        }
        x
    }

    /// Waits (up to 20 s) until `done` holds.
    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !done() {
            assert!(t0.elapsed().as_secs() < 20, "timed out waiting: {what}");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn large_reads_in_one_span_share_its_buffer_and_start_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (data, file, table) = gzip_stream(dir.path());
        let (s0, e0) = table.span_range(0);
        let (s1, _) = table.span_range(1);
        assert_eq!((s0, e0), (0, s1));
        let reader = StreamReader::new(file, table, 64 << 20);
        let Backing::Spans(cache) = &reader.inner.backing else {
            panic!("not spans")
        };
        // The first large read of span 0: the bytes of the span's buffer, and span 1
        // is asked for at once, before span 0 is read to its second half.
        let len = 128 << 10;
        let got = reader.read_at(0, len).unwrap();
        assert!(matches!(got, ReadBytes::Shared(..)), "{got:?}");
        assert_eq!(&*got, &data[..len]);
        wait_for("span 1 decoded ahead", || cache.contains(1));
        // A read across the span boundary is copied, exact.
        let at = e0 - 1000;
        let got = reader.read_at(at, len).unwrap();
        assert!(matches!(got, ReadBytes::Owned(..)), "{got:?}");
        assert_eq!(&*got, &data[at as usize..at as usize + len]);
        // Small reads are copied too; a read past the stream's end is an error.
        let got = reader.read_at(5000, 100).unwrap();
        assert!(matches!(got, ReadBytes::Owned(..)), "{got:?}");
        assert_eq!(&*got, &data[5000..5100]);
        assert!(reader.read_at(data.len() as u64 - 10, len).is_err());
    }

    #[test]
    fn sequential_reads_prefetch_the_next_span_and_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let (data, file, table) = gzip_stream(dir.path());
        if let SeekTable::Gzip(t) = &*table {
            assert!(
                t.span_count() >= 3,
                "spans: {:?}",
                (0..t.span_count())
                    .map(|i| t.span_range(i))
                    .collect::<Vec<_>>()
            );
        }
        let reader = StreamReader::new(file, table, 64 << 20);
        // The span cache alone (the spill file is tested below).
        let _ = reader.inner.spill.set(None);
        // Read from the start (a read deep inside a first span is a random one and
        // asks for nothing ahead).
        let mut got = vec![0u8; 1_100_000];
        reader.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, data[..1_100_000]);
        // The second half of span 0 was read, so span 1 gets decoded in the background.
        let Backing::Spans(cache) = &reader.inner.backing else {
            panic!("not spans")
        };
        let mut tries = 0;
        while !cache.contains(1) && tries < 1000 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            tries += 1;
        }
        assert!(cache.contains(1));
        let mut rest = vec![0u8; data.len() - 1_100_000];
        reader.read_exact_at(&mut rest, 1_100_000).unwrap();
        assert_eq!(rest, data[1_100_000..]);

        // Random reads deep inside spans decode prefixes, later extended; a small
        // cache forces evictions. Every byte must still be exact.
        let small = StreamReader::new(
            reader.inner.archive.clone(),
            reader.inner.table.clone(),
            1 << 20,
        );
        let _ = small.inner.spill.set(None);
        let mut x = random_reads_are_exact(&small, &data, 99, 300);

        // With a spill file: a random read deep in a span decodes it whole once and
        // spills it; later reads of it come from the file, exact, and the cache lets
        // go of it. Spans read from their start (sequentially) are not spilled.
        let spilling = StreamReader::new(
            reader.inner.archive.clone(),
            reader.inner.table.clone(),
            64 << 20,
        );
        let spans = spilling.inner.table.span_count();
        let file = tempfile::tempfile().unwrap();
        let _ = spilling
            .inner
            .spill
            .set(Some(spill::Spill::in_file(file, spans, u64::MAX)));
        let (_, (s1, e1)) = spilling.inner.table.span_at(1_500_000).unwrap();
        let mut got = vec![0u8; 5000];
        spilling.read_exact_at(&mut got, s1 + 300_000).unwrap();
        assert_eq!(got, data[s1 as usize + 300_000..s1 as usize + 305_000]);
        let span = spilling.inner.table.span_at(s1).unwrap().0;
        let Backing::Spans(cache) = &spilling.inner.backing else {
            panic!("not spans")
        };
        // The spill writer stores it; it stays cached until then.
        wait_for("the span stored", || spilling.inner.spilled(span));
        wait_for("a spilled span leaves the cache", || !cache.contains(span));
        for _ in 0..100 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let off = s1 as usize + 70_000 + (x >> 20) as usize % ((e1 - s1) as usize - 140_000);
            let len = 1 + (x >> 50) as usize % 70_000;
            let mut got = vec![0u8; len];
            spilling.read_exact_at(&mut got, off as u64).unwrap();
            assert_eq!(got, data[off..off + len], "spilled, at {off}+{len}");
        }
        // Reads past the stored prefix decoded more of it, stored by the writer too.
        wait_for("served from the spill file", || !cache.contains(span));
        let mut head = vec![0u8; 1000];
        spilling.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, data[..1000]);
    }

    #[test]
    fn random_readers_get_every_span_filled_into_the_spill_file() {
        let dir = tempfile::tempdir().unwrap();
        let (data, file, table) = gzip_stream(dir.path());
        let reader = StreamReader::new(file, table, 64 << 20);
        let spans = reader.inner.table.span_count();
        let spill = spill::Spill::in_file(tempfile::tempfile().unwrap(), spans, u64::MAX);
        let _ = reader.inner.spill.set(Some(spill));
        // Random reads deep inside the last spans (where the filler, starting at the
        // front, is not yet) earn more spans than there are: 1 + 2 + ... each.
        for span in (1..spans).rev() {
            let (start, end) = reader.inner.table.span_range(span);
            let at = start + (end - start) / 2;
            let mut got = vec![0u8; 4096];
            reader.read_exact_at(&mut got, at).unwrap();
            assert_eq!(got, data[at as usize..][..4096]);
        }
        let inner = &reader.inner;
        let stored = |i: usize| inner.spill().map_or(0, |s| s.stored(i));
        wait_for("every span spilled", || {
            (0..spans).all(|i| stored(i) == inner.table.span_len(i))
        });
        // Reads now come from the file, exact, and leave nothing in the cache.
        let Backing::Spans(cache) = &inner.backing else {
            panic!("not spans")
        };
        random_reads_are_exact(&reader, &data, 7, 200);
        assert!(
            (0..spans).all(|i| !cache.contains(i)),
            "served from the spill file"
        );
    }

    #[test]
    fn the_filler_stores_a_span_a_reader_decoded_or_is_decoding_without_decoding_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let (data, file, table) = gzip_stream(dir.path());
        let reader = StreamReader::new(file, table, 64 << 20);
        let inner = reader.inner.clone();
        let spans = inner.table.span_count();
        let spill = spill::Spill::in_file(tempfile::tempfile().unwrap(), spans, u64::MAX);
        let _ = inner.spill.set(Some(spill));
        let Backing::Spans(cache) = &inner.backing else {
            panic!("not spans")
        };
        // The "readers" below fill spans with a marker byte instead of decoding them,
        // so the spill file shows whose bytes the filler stored.
        let marked = |span: usize, mark: u8| {
            let len = inner.table.span_len(span) as usize;
            move |_, out: &mut Vec<u8>| {
                out.resize(len, mark);
                Ok(())
            }
        };
        let spilled = |span: usize, mark: u8| {
            let (start, end) = inner.table.span_range(span);
            let spill = inner.spill().unwrap();
            let mut got = vec![0u8; (end - start) as usize];
            spill.stored(span) == end - start
                && spill.read(&mut got, start).is_ok()
                && got.iter().all(|&b| b == mark)
        };
        // Span 1 cached whole, as a reader leaves it for the spill writer.
        let len1 = inner.table.span_len(1) as usize;
        cache
            .get_or_insert(1, len1, Insert::Probation, marked(1, 0xa1))
            .unwrap();
        assert!(fill::spill_span(&inner, 1));
        assert!(spilled(1, 0xa1), "stored from the cache, not decoded again");
        assert!(!cache.contains(1), "let go of once stored");
        // Span 2 being decoded by a reader when the filler comes to it: it waits.
        let len2 = inner.table.span_len(2) as usize;
        let (started_tx, started) = std::sync::mpsc::channel();
        let decoding = {
            let inner = inner.clone();
            std::thread::spawn(move || {
                let Backing::Spans(cache) = &inner.backing else {
                    unreachable!()
                };
                let slow = |_, out: &mut Vec<u8>| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    out.resize(len2, 0xa2);
                    Ok(())
                };
                cache
                    .get_or_insert(2, len2, Insert::Probation, slow)
                    .map(|v| v.len())
            })
        };
        started.recv().unwrap();
        assert!(fill::spill_span(&inner, 2));
        assert_eq!(decoding.join().unwrap().unwrap(), len2);
        assert!(spilled(2, 0xa2), "the reader's decode, waited for");
        assert_eq!(cache.stats().misses, 2, "one decode each");
        // A span nobody decoded yet: the filler decodes it, and random reads in it
        // are then answered from the spill file.
        assert!(fill::spill_span(&inner, 3));
        assert_eq!(cache.stats().misses, 3);
        let (start, end) = inner.table.span_range(3);
        let mut got = vec![0u8; 4096];
        let at = (start + end) / 2;
        reader.read_exact_at(&mut got, at).unwrap();
        assert_eq!(got, data[at as usize..][..4096]);
        assert_eq!(cache.stats().misses, 3, "served from the spill file");
    }

    #[test]
    fn small_reads_of_a_local_plain_tar_get_it_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("x.tar");
        std::fs::write(&path, &data).unwrap();
        let file: Arc<dyn Source> = Arc::new(crate::source::FileSource::open(&path).unwrap());
        let reader = StreamReader::new(file, Arc::new(SeekTable::Plain), 1 << 20);
        // Four small reads earn 1 + 2 + 3 + 4 units, more than its 4 chunks.
        let mut got = vec![0u8; 512];
        for off in [2_000_000, 500_000, 3_400_000, 1_200_000] {
            reader.read_exact_at(&mut got, off).unwrap();
            assert_eq!(got, data[off as usize..off as usize + 512]);
        }
        let inner = &reader.inner;
        wait_for("the filler went through the archive", || {
            inner.fill_next.load(std::sync::atomic::Ordering::Relaxed) >= 4
                && inner.fill_credit.load(std::sync::atomic::Ordering::Relaxed) == 0
        });
        reader.read_exact_at(&mut got, 3_000_000).unwrap();
        assert_eq!(got, data[3_000_000..3_000_512]);
    }
}
