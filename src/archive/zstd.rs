//! Random access into zstd streams at frame boundaries.
//!
//! This module owns everything zstd-specific in snapfs:
//!
//! * [`ZstdIndexer`] wraps the compressed stream during the single sequential
//!   indexing pass. Its [`Read`] implementation yields the uncompressed bytes
//!   while it records a [`ZstdCheckpoint`] at frame boundaries, roughly every
//!   `span_bytes` of output.
//! * [`ZstdSeekTable`] is the resulting list of checkpoints, with a compact
//!   little-endian on-disk encoding ([`ZstdSeekTable::encode`] /
//!   [`ZstdSeekTable::decode`]; the latter treats its input as untrusted).
//! * [`decode_span`] decodes one span (the bytes between two checkpoints) with
//!   a fresh decoder, using positional reads so that many threads can share
//!   one `&File`.
//! * [`decompress_all`] streams the whole file out, for the single-frame case
//!   where spans would be too large and the caller keeps a decompressed cache
//!   file instead.
//!
//! zstd frames are independent, so a decoder can start at any frame start.
//! Multi-frame streams come from `pzstd`, from concatenating separately
//! compressed chunks, and from seekable-zstd writers (whose trailing skippable
//! seek-table frame is tolerated, as are skippable frames anywhere). A
//! single-frame stream (plain `zstd`, `zstd -T0`) yields a table with one span
//! covering everything. Windows up to 2 GiB (`zstd --long=31`) are accepted.

use std::io::{self, Read, Write};

use ::zstd::zstd_safe::{self, DCtx, DParameter, InBuffer, OutBuffer, WriteBuf};

/// Largest window (log2) the decoders accept: 31 covers `zstd --long=31`.
const WINDOW_LOG_MAX: u32 = 31;
/// Size of the compressed-input buffer for sequential decoding.
const IN_CHUNK: usize = 1 << 20;
/// Size of the decoded-output buffer for sequential decoding.
const OUT_CHUNK: usize = 1 << 20;
/// Reads of at least this size are decoded straight into the caller's buffer.
const DIRECT_MIN: usize = 128 << 10;
/// [`decode_span`] reads a span's compressed bytes in one go up to this size,
/// which lets zstd decode whole frames in its single-pass fast path.
const SPAN_READ_MAX: u64 = 16 << 20;
/// Calls without any progress tolerated before the decoder is declared stuck.
const MAX_STALLS: u32 = 64;

/// Magic at the start of an encoded [`ZstdSeekTable`].
const TABLE_MAGIC: [u8; 8] = *b"SNZSTD1\0";
/// Encoded header: magic, uncompressed size, frame count, checkpoint count.
const TABLE_HEADER_LEN: usize = 8 + 8 + 8 + 8;
/// Encoded size of one checkpoint.
const CHECKPOINT_LEN: usize = 16;

/// A place where decoding may start: the start of a zstd frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZstdCheckpoint {
    /// Offset in the uncompressed stream of the first byte decoded from here.
    pub uncompressed: u64,
    /// Offset in the compressed file of the frame that starts here.
    pub compressed: u64,
}

/// Checkpoints of one zstd stream, splitting its output into spans.
///
/// Span `i` covers uncompressed bytes `[checkpoints[i].uncompressed,
/// checkpoints[i + 1].uncompressed)` (the last one ends at
/// `uncompressed_size`) and is decoded starting from compressed offset
/// `checkpoints[i].compressed`. The first checkpoint is always `(0, 0)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZstdSeekTable {
    /// Span starts, strictly increasing in both offsets, starting at `(0, 0)`.
    pub checkpoints: Vec<ZstdCheckpoint>,
    /// Total size of the decompressed stream.
    pub uncompressed_size: u64,
    /// Number of frames in the stream, skippable frames included.
    pub frame_count: u64,
}

impl ZstdSeekTable {
    /// Number of spans (one per checkpoint).
    pub fn span_count(&self) -> usize {
        self.checkpoints.len()
    }

    /// Uncompressed `[start, end)` range of span `i`.
    ///
    /// Out-of-range `i` yields the empty range `(uncompressed_size,
    /// uncompressed_size)`; inconsistent tables never yield `end < start`.
    pub fn span_range(&self, i: usize) -> (u64, u64) {
        super::spans::range(
            &self.checkpoints,
            |c| c.uncompressed,
            self.uncompressed_size,
            i,
        )
    }

    /// Span containing uncompressed offset `off` (binary search), or `None`
    /// if `off` is at or past the end of the stream.
    pub fn span_of(&self, off: u64) -> Option<usize> {
        super::spans::of(
            &self.checkpoints,
            |c| c.uncompressed,
            self.uncompressed_size,
            off,
        )
    }

    /// Length of the longest span; callers use this to decide whether random
    /// access is practical or a decompressed cache file is needed instead.
    pub fn max_span_len(&self) -> u64 {
        super::spans::max_len(
            &self.checkpoints,
            |c| c.uncompressed,
            self.uncompressed_size,
        )
    }

    /// Append the little-endian encoding of the table to `out`.
    ///
    /// Layout: magic `SNZSTD1\0`, `uncompressed_size: u64`,
    /// `frame_count: u64`, `count: u64`, then `count` pairs of
    /// `(uncompressed: u64, compressed: u64)`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let count = self.checkpoints.len();
        out.reserve(
            count
                .saturating_mul(CHECKPOINT_LEN)
                .saturating_add(TABLE_HEADER_LEN),
        );
        out.extend_from_slice(&TABLE_MAGIC);
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&self.frame_count.to_le_bytes());
        out.extend_from_slice(&(count as u64).to_le_bytes());
        for cp in &self.checkpoints {
            out.extend_from_slice(&cp.uncompressed.to_le_bytes());
            out.extend_from_slice(&cp.compressed.to_le_bytes());
        }
    }

    /// Parse a table written by [`encode`](Self::encode).
    ///
    /// `bytes` must be exactly one encoded table. They are untrusted (a
    /// corrupt or hostile index file): this never panics, allocates at most
    /// in proportion to `bytes.len()`, and checks that the table is
    /// consistent (starts at `(0, 0)`, offsets strictly increasing, last span
    /// non-empty, enough frames). The error explains what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<ZstdSeekTable, String> {
        if bytes.len() < TABLE_HEADER_LEN {
            return Err(format!(
                "zstd seek table too short: {} bytes, header needs {}",
                bytes.len(),
                TABLE_HEADER_LEN
            ));
        }
        if bytes.get(..8) != Some(&TABLE_MAGIC[..]) {
            return Err("zstd seek table has a bad magic number".to_string());
        }
        let uncompressed_size = le_u64(bytes, 8)?;
        let frame_count = le_u64(bytes, 16)?;
        let count = le_u64(bytes, 24)?;
        let body = bytes.get(TABLE_HEADER_LEN..).unwrap_or_default();
        let actual = body.len() / CHECKPOINT_LEN;
        if body.len() % CHECKPOINT_LEN != 0 || u64::try_from(actual).ok() != Some(count) {
            return Err(format!(
                "zstd seek table claims {count} checkpoints but has {} bytes of checkpoint data",
                body.len()
            ));
        }
        if count == 0 {
            return Err("zstd seek table has no checkpoints".to_string());
        }
        // `actual` is bounded by the input length, so this cannot over-allocate.
        let mut checkpoints = Vec::with_capacity(actual);
        for chunk in body.chunks_exact(CHECKPOINT_LEN) {
            checkpoints.push(ZstdCheckpoint {
                uncompressed: le_u64(chunk, 0)?,
                compressed: le_u64(chunk, 8)?,
            });
        }
        match checkpoints.first() {
            Some(first) if first.uncompressed == 0 && first.compressed == 0 => {}
            _ => return Err("zstd seek table does not start at offset (0, 0)".to_string()),
        }
        for (i, pair) in checkpoints.windows(2).enumerate() {
            if let [a, b] = pair {
                if b.uncompressed <= a.uncompressed || b.compressed <= a.compressed {
                    return Err(format!(
                        "zstd seek table checkpoint {} ({}, {}) does not follow ({}, {})",
                        i + 1,
                        b.uncompressed,
                        b.compressed,
                        a.uncompressed,
                        a.compressed
                    ));
                }
            }
        }
        if let Some(last) = checkpoints.last() {
            if count > 1 && last.uncompressed >= uncompressed_size {
                return Err(format!(
                    "zstd seek table checkpoint at {} is not below the stream size {}",
                    last.uncompressed, uncompressed_size
                ));
            }
        }
        if frame_count < count {
            return Err(format!(
                "zstd seek table has {count} checkpoints but only {frame_count} frames"
            ));
        }
        Ok(ZstdSeekTable {
            checkpoints,
            uncompressed_size,
            frame_count,
        })
    }
}

/// Little-endian `u64` at `at` in `bytes`, or an error if out of bounds.
fn le_u64(bytes: &[u8], at: usize) -> Result<u64, String> {
    at.checked_add(8)
        .and_then(|end| bytes.get(at..end))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("zstd seek table truncated at byte {at}"))
}

/// Where a [`Stream`] gets its compressed bytes from.
trait Source {
    /// Read some bytes into `buf`; `Ok(0)` means end of input.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// A sequential reader.
struct ReaderSource<R>(R);

impl<R: Read> Source for ReaderSource<R> {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

/// Positional reads from a shared source, optionally stopping at `end`.
struct FileSource<'a> {
    /// The compressed stream.
    file: &'a dyn crate::source::Source,
    /// Offset of the next read.
    pos: u64,
    /// Offset to stop reading at, if known.
    end: Option<u64>,
}

impl Source for FileSource<'_> {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = match self.end {
            Some(end) => {
                let left = end.saturating_sub(self.pos);
                usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()))
            }
            None => buf.len(),
        };
        let Some(buf) = buf.get_mut(..want) else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.file.read_at(buf, self.pos) {
                Ok(n) => {
                    self.pos = self.pos.checked_add(n as u64).ok_or_else(overflow)?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Outcome of one [`Stream::step`].
#[derive(Debug, Clone, Copy)]
struct Step {
    /// Bytes written to the output buffer.
    produced: usize,
    /// A frame (possibly skippable or empty) ended with this step.
    frame_end: bool,
    /// The input ended cleanly at a frame boundary; nothing was produced.
    eof: bool,
}

/// A streaming zstd decoder over a [`Source`] that knows the compressed
/// offset of every byte it consumes.
struct Stream<S> {
    /// Where compressed bytes come from.
    src: S,
    /// The decoder.
    dctx: DCtx<'static>,
    /// Compressed-input buffer.
    buf: Vec<u8>,
    /// Bytes consumed by the decoder within `buf`.
    pos: usize,
    /// Valid bytes in `buf`.
    len: usize,
    /// Compressed offset of `buf[0]`.
    base: u64,
    /// The source returned end of input.
    eof: bool,
    /// Bytes of the current frame were consumed and it has not ended yet.
    in_frame: bool,
    /// Frames completed so far.
    frames: u64,
}

impl<S: Source> Stream<S> {
    /// Decoder reading from `src`, whose first byte is at compressed offset
    /// `base`, in chunks of `chunk` bytes.
    fn new(src: S, base: u64, chunk: usize) -> io::Result<Self> {
        let mut dctx = DCtx::try_create().ok_or_else(|| {
            io::Error::new(io::ErrorKind::OutOfMemory, "cannot create zstd decoder")
        })?;
        dctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
            .map_err(|code| {
                io::Error::other(format!(
                    "cannot set zstd window log max: {}",
                    zstd_safe::get_error_name(code)
                ))
            })?;
        Ok(Stream {
            src,
            dctx,
            buf: vec![0; chunk.max(1)],
            pos: 0,
            len: 0,
            base,
            eof: false,
            in_frame: false,
            frames: 0,
        })
    }

    /// Compressed offset of the next byte the decoder will consume.
    fn offset(&self) -> u64 {
        self.base.saturating_add(self.pos as u64)
    }

    /// Replace the (fully consumed) input buffer with the next chunk.
    fn refill(&mut self) -> io::Result<()> {
        self.base = self
            .base
            .checked_add(self.len as u64)
            .ok_or_else(overflow)?;
        self.pos = 0;
        self.len = 0;
        let n = self.src.fill(&mut self.buf)?;
        if n == 0 {
            self.eof = true;
        }
        self.len = n.min(self.buf.len());
        Ok(())
    }

    /// The error for input that ends inside a frame (or has no frame).
    fn truncated(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "truncated zstd stream at compressed offset {}",
                self.offset()
            ),
        )
    }

    /// Decode until some output is produced, a frame ends, or the input ends
    /// cleanly. `out` must have free space.
    fn step<C: WriteBuf + ?Sized>(&mut self, out: &mut OutBuffer<'_, C>) -> io::Result<Step> {
        let mut stalls = 0u32;
        loop {
            if self.pos >= self.len && !self.eof {
                self.refill()?;
            }
            let have_input = self.pos < self.len;
            if !have_input && !self.in_frame {
                // End of input at a frame boundary. An input without any
                // frame at all is not a zstd stream.
                if self.frames == 0 {
                    return Err(self.truncated());
                }
                return Ok(Step {
                    produced: 0,
                    frame_end: false,
                    eof: true,
                });
            }
            if out.pos() >= out.capacity() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "zstd decode called without output space",
                ));
            }
            let out_before = out.pos();
            let input_slice = self.buf.get(self.pos..self.len).unwrap_or_default();
            let mut input = InBuffer::around(input_slice);
            let res = self.dctx.decompress_stream(out, &mut input);
            let consumed = input.pos();
            self.pos = self.pos.saturating_add(consumed).min(self.len);
            let produced = out.pos().saturating_sub(out_before);
            let hint = res.map_err(|code| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "corrupt zstd stream at compressed offset {}: {}",
                        self.offset(),
                        zstd_safe::get_error_name(code)
                    ),
                )
            })?;
            if consumed > 0 {
                self.in_frame = true;
            }
            if hint == 0 && self.in_frame {
                self.in_frame = false;
                self.frames = self.frames.checked_add(1).ok_or_else(overflow)?;
                return Ok(Step {
                    produced,
                    frame_end: true,
                    eof: false,
                });
            }
            if produced > 0 {
                return Ok(Step {
                    produced,
                    frame_end: false,
                    eof: false,
                });
            }
            if consumed == 0 {
                if !have_input {
                    // Input is exhausted mid-frame and nothing is pending.
                    return Err(self.truncated());
                }
                stalls += 1;
                if stalls > MAX_STALLS {
                    return Err(io::Error::other(format!(
                        "zstd decoder made no progress at compressed offset {}",
                        self.offset()
                    )));
                }
            }
        }
    }
}

/// The error for offsets that do not fit in a `u64`.
fn overflow() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "zstd stream offset overflow")
}

/// Wraps the compressed stream; `Read` yields uncompressed bytes while
/// recording checkpoints.
///
/// The wrapped reader must start at offset 0 of the compressed file: the
/// recorded compressed offsets count bytes from where it starts. A
/// checkpoint is recorded at a frame boundary once at least `span_bytes`
/// bytes were decoded since the previous one.
pub struct ZstdIndexer<R: Read> {
    /// The decoder over the wrapped reader.
    stream: Stream<ReaderSource<R>>,
    /// Minimum output between checkpoints.
    span_bytes: u64,
    /// Uncompressed bytes decoded so far (delivered or buffered).
    produced: u64,
    /// Checkpoints recorded so far, starting with `(0, 0)`.
    checkpoints: Vec<ZstdCheckpoint>,
    /// Decoded bytes not yet handed out are `out[out_pos..out_len]`.
    out: Vec<u8>,
    /// Start of the undelivered part of `out`.
    out_pos: usize,
    /// End of the decoded part of `out`.
    out_len: usize,
    /// The stream ended cleanly.
    done: bool,
}

impl<R: Read> ZstdIndexer<R> {
    /// Start indexing `inner`, with a checkpoint roughly every `span_bytes`
    /// of output (at the next frame boundary); 0 is treated as 1, which puts
    /// a checkpoint at every frame that produced output.
    pub fn new(inner: R, span_bytes: u64) -> io::Result<Self> {
        Ok(ZstdIndexer {
            stream: Stream::new(ReaderSource(inner), 0, IN_CHUNK)?,
            span_bytes: span_bytes.max(1),
            produced: 0,
            checkpoints: vec![ZstdCheckpoint {
                uncompressed: 0,
                compressed: 0,
            }],
            out: Vec::new(),
            out_pos: 0,
            out_len: 0,
            done: false,
        })
    }

    /// Compressed bytes consumed by the decoder so far (the compressed
    /// offset of the next byte it will decode), for progress reporting.
    pub fn compressed_position(&self) -> u64 {
        self.stream.offset()
    }

    /// Drain any unread remainder of the stream, then return the table.
    pub fn finish(mut self) -> io::Result<ZstdSeekTable> {
        while !self.done {
            self.fill_internal()?;
        }
        let mut checkpoints = self.checkpoints;
        // A checkpoint at the very end would start an empty span.
        if checkpoints.len() > 1
            && checkpoints
                .last()
                .is_some_and(|cp| cp.uncompressed >= self.produced)
        {
            checkpoints.pop();
        }
        Ok(ZstdSeekTable {
            checkpoints,
            uncompressed_size: self.produced,
            frame_count: self.stream.frames,
        })
    }

    /// Book-keeping after a decoding step.
    fn account(&mut self, step: Step) -> io::Result<()> {
        self.produced = self
            .produced
            .checked_add(step.produced as u64)
            .ok_or_else(overflow)?;
        if step.eof {
            self.done = true;
        }
        if step.frame_end {
            let last = self.checkpoints.last().map_or(0, |cp| cp.uncompressed);
            if self.produced.saturating_sub(last) >= self.span_bytes {
                self.checkpoints.push(ZstdCheckpoint {
                    uncompressed: self.produced,
                    compressed: self.stream.offset(),
                });
            }
        }
        Ok(())
    }

    /// Decode the next piece into the internal buffer (which must be empty).
    fn fill_internal(&mut self) -> io::Result<()> {
        if self.out.len() < OUT_CHUNK {
            self.out.resize(OUT_CHUNK, 0);
        }
        let step = {
            let mut ob = OutBuffer::around(self.out.as_mut_slice());
            self.stream.step(&mut ob)?
        };
        self.out_pos = 0;
        self.out_len = step.produced.min(self.out.len());
        self.account(step)
    }
}

impl<R: Read> Read for ZstdIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.out_pos < self.out_len {
                let avail = self.out.get(self.out_pos..self.out_len).unwrap_or_default();
                let n = avail.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
                    dst.copy_from_slice(src);
                }
                self.out_pos += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            if buf.len() >= DIRECT_MIN {
                let step = {
                    let mut ob = OutBuffer::around(&mut *buf);
                    self.stream.step(&mut ob)?
                };
                self.account(step)?;
                if step.produced > 0 {
                    return Ok(step.produced.min(buf.len()));
                }
            } else {
                self.fill_internal()?;
            }
        }
    }
}

/// Decode span `i` of `file` into `out` (cleared first; exactly the span
/// length on success).
///
/// Uses positional reads (`FileExt::read_at`) with a fresh decoder, so it is
/// safe to call concurrently from many threads on one `&File`. Fails if `i`
/// is out of range, if the data is corrupt or truncated, or if the file does
/// not match the table (wrong span length or frame boundary).
pub fn decode_span(
    file: &dyn crate::source::Source,
    table: &ZstdSeekTable,
    i: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    let Some(cp) = table.checkpoints.get(i) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("zstd span {i} out of range ({} spans)", table.span_count()),
        ));
    };
    let (start, end) = table.span_range(i);
    let len = usize::try_from(end.saturating_sub(start)).map_err(|_| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("zstd span {i} too large"),
        )
    })?;
    if len == 0 {
        return Ok(());
    }
    let start_c = cp.compressed;
    let end_c = i
        .checked_add(1)
        .and_then(|j| table.checkpoints.get(j))
        .map(|next| next.compressed);
    let chunk = match end_c {
        Some(end_c) if end_c <= start_c => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("zstd span {i} has an empty compressed range"),
            ));
        }
        Some(end_c) => usize::try_from((end_c - start_c).min(SPAN_READ_MAX)).unwrap_or(IN_CHUNK),
        None => IN_CHUNK,
    };
    // One spare byte so that a span longer than indexed is detected.
    let want = len.checked_add(1).ok_or_else(overflow)?;
    out.try_reserve_exact(want).map_err(|_| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("cannot allocate {len} bytes for zstd span {i}"),
        )
    })?;
    if let Some(end_c) = end_c.filter(|&e| e - start_c <= SPAN_READ_MAX) {
        return decode_whole_frames(file, i, start_c, end_c, len, out);
    }
    let src = FileSource {
        file,
        pos: start_c,
        end: end_c,
    };
    let mut stream = Stream::new(src, start_c, chunk)?;
    loop {
        let pos = out.len();
        let step = {
            let mut ob = OutBuffer::around_pos(&mut *out, pos);
            stream.step(&mut ob)?
        };
        if out.len() > len {
            out.clear();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "zstd span {i} decodes to more than {len} bytes; index does not match file"
                ),
            ));
        }
        if step.eof || (step.frame_end && out.len() == len) {
            break;
        }
    }
    if out.len() != len {
        let got = out.len();
        out.clear();
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "zstd span {i} decoded to {got} bytes, expected {len}; index does not match file"
            ),
        ));
    }
    if let Some(end_c) = end_c {
        if stream.offset() != end_c {
            out.clear();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "zstd span {i} ends at compressed offset {}, expected {end_c}; index does not match file",
                    stream.offset()
                ),
            ));
        }
    }
    Ok(())
}

/// Decodes span `i`, the whole frames in compressed `[start_c, end_c)` that the index
/// says hold `len` bytes, in one call straight into `out` (reserved for more than
/// `len`): zstd's one-shot decoder keeps no window buffer and copies nothing (a
/// streaming decode of an 8 MiB pzstd frame holds a 2 MiB window next to the span).
fn decode_whole_frames(
    file: &dyn crate::source::Source,
    i: usize,
    start_c: u64,
    end_c: u64,
    len: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let size = usize::try_from(end_c - start_c).map_err(|_| overflow())?;
    let mut compressed = Vec::new();
    compressed.try_reserve_exact(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("cannot allocate {size} bytes for zstd span {i}"),
        )
    })?;
    compressed.resize(size, 0);
    file.read_exact_at(&mut compressed, start_c)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("truncated zstd stream: span {i} ends past the end of the file"),
            ),
            _ => e,
        })?;
    let mut dctx = DCtx::try_create()
        .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "cannot create zstd decoder"))?;
    out.clear();
    let decoded = dctx.decompress(out, &compressed);
    let got = out.len();
    let too_long = match decoded {
        Ok(_) => got > len,
        Err(code) => out.capacity() > len && zstd_safe::get_error_name(code) == DST_TOO_SMALL,
    };
    let why = match decoded {
        _ if too_long => {
            format!("zstd span {i} decodes to more than {len} bytes; index does not match file")
        }
        Err(code) => format!(
            "zstd span {i} (compressed offsets {start_c}..{end_c}): {}",
            zstd_safe::get_error_name(code)
        ),
        Ok(_) if got != len => {
            format!(
                "zstd span {i} decoded to {got} bytes, expected {len}; index does not match file"
            )
        }
        Ok(_) => return Ok(()),
    };
    out.clear();
    Err(io::Error::new(io::ErrorKind::InvalidData, why))
}

/// zstd's name for a one-shot decode whose output does not fit.
const DST_TOO_SMALL: &str = "Destination buffer is too small";

/// Stream-decompress the whole file into `dest` (used for the single-frame
/// fallback cache file); returns the number of bytes written.
///
/// Uses positional reads, so the file's cursor is neither used nor moved.
pub fn decompress_all(file: &dyn crate::source::Source, dest: &mut dyn Write) -> io::Result<u64> {
    let src = FileSource {
        file,
        pos: 0,
        end: None,
    };
    let mut stream = Stream::new(src, 0, IN_CHUNK)?;
    let mut buf = vec![0u8; OUT_CHUNK];
    let mut total = 0u64;
    loop {
        let step = {
            let mut ob = OutBuffer::around(buf.as_mut_slice());
            stream.step(&mut ob)?
        };
        if let Some(data) = buf.get(..step.produced) {
            dest.write_all(data)?;
        }
        total = total
            .checked_add(step.produced as u64)
            .ok_or_else(overflow)?;
        if step.eof {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;

    const MIB: usize = 1 << 20;
    const SPAN: u64 = 2 << 20;

    /// Tiny deterministic generator (64-bit LCG).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// ~16 MiB of semi-compressible text: LCG-picked words from an LCG-made
    /// vocabulary, with some numbers mixed in.
    fn data() -> &'static [u8] {
        static DATA: OnceLock<Vec<u8>> = OnceLock::new();
        DATA.get_or_init(|| {
            let mut rng = Lcg(0x5eed);
            let words: Vec<Vec<u8>> = (0..2000)
                .map(|_| {
                    let len = 2 + rng.next() % 9;
                    (0..len).map(|_| b'a' + (rng.next() % 26) as u8).collect()
                })
                .collect();
            let target = 16 * MIB + 12345;
            let mut out = Vec::with_capacity(target + 64);
            while out.len() < target {
                let r = rng.next();
                if r % 11 == 0 {
                    out.extend_from_slice(format!("{} ", rng.next()).as_bytes());
                } else {
                    out.extend_from_slice(&words[(r % words.len() as u64) as usize]);
                    out.push(if r % 13 == 0 { b'\n' } else { b' ' });
                }
            }
            out.truncate(target);
            out
        })
    }

    /// Reference decoding with the zstd crate's own stream decoder.
    fn ref_decode(compressed: &[u8]) -> Vec<u8> {
        let mut dec = ::zstd::stream::read::Decoder::new(compressed).unwrap();
        dec.window_log_max(31).unwrap();
        let mut out = Vec::new();
        dec.read_to_end(&mut out).unwrap();
        out
    }

    /// A skippable frame with `payload_len` bytes of payload.
    fn skippable(payload_len: u32) -> Vec<u8> {
        let mut v = 0x184D_2A5Eu32.to_le_bytes().to_vec();
        v.extend_from_slice(&payload_len.to_le_bytes());
        v.extend((0..payload_len).map(|i| i as u8));
        v
    }

    /// Frames of 1 MiB chunks, alternating known and unknown content size.
    /// Returns the stream and the compressed start of each chunk's frame.
    fn chunked(data: &[u8]) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for (k, chunk) in data.chunks(MIB).enumerate() {
            starts.push(out.len() as u64);
            if k % 2 == 0 {
                out.extend(::zstd::bulk::compress(chunk, 3).unwrap());
            } else {
                out.extend(::zstd::stream::encode_all(chunk, 1).unwrap());
            }
        }
        (out, starts)
    }

    fn temp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// Index `compressed` reading through the indexer with varied buffer
    /// sizes; returns the output and the table.
    fn index(compressed: &[u8], span: u64) -> io::Result<(Vec<u8>, ZstdSeekTable)> {
        let mut ix = ZstdIndexer::new(compressed, span)?;
        let mut got = Vec::new();
        let sizes = [1usize, 512, 4096, 300 << 10, 77, 1 << 20, 65536];
        let mut buf = vec![0u8; 1 << 20];
        let mut k = 0;
        loop {
            let want = sizes[k % sizes.len()];
            k += 1;
            let n = ix.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            assert!(n <= want);
            got.extend_from_slice(&buf[..n]);
            assert!(ix.compressed_position() <= compressed.len() as u64);
        }
        assert_eq!(ix.read(&mut buf)?, 0, "read after EOF");
        Ok((got, ix.finish()?))
    }

    /// Everything that must hold for a valid stream of `data`.
    fn check_stream(compressed: &[u8], data: &[u8], span: u64) -> ZstdSeekTable {
        let (got, table) = index(compressed, span).unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "indexer output differs");
        assert_eq!(table.uncompressed_size, data.len() as u64);
        assert!(table.frame_count >= 1);
        assert_eq!(
            table.checkpoints[0],
            ZstdCheckpoint {
                uncompressed: 0,
                compressed: 0
            }
        );
        for w in table.checkpoints.windows(2) {
            assert!(w[1].uncompressed - w[0].uncompressed >= span);
            assert!(w[1].compressed > w[0].compressed);
        }
        // Every checkpoint is a frame start that decodes to the rest of the data.
        for cp in &table.checkpoints {
            let rest = ref_decode(&compressed[cp.compressed as usize..]);
            assert!(rest == data[cp.uncompressed as usize..]);
        }

        // Encoding round trip.
        let mut enc = vec![0xAA];
        table.encode(&mut enc);
        assert_eq!(ZstdSeekTable::decode(&enc[1..]).unwrap(), table);

        // span_of / span_range agree.
        let size = table.uncompressed_size;
        assert_eq!(table.span_of(size), None);
        assert_eq!(table.span_of(u64::MAX), None);
        let mut max = 0;
        for i in 0..table.span_count() {
            let (s, e) = table.span_range(i);
            assert!(s < e || size == 0);
            max = max.max(e - s);
            if s < e {
                assert_eq!(table.span_of(s), Some(i));
                assert_eq!(table.span_of(e - 1), Some(i));
                assert_eq!(table.span_of(s + (e - s) / 2), Some(i));
            }
        }
        assert_eq!(table.max_span_len(), max);
        assert_eq!(table.span_range(table.span_count()), (size, size));

        let file = temp_with(compressed);
        let f = file.as_file();

        // Every span, in order and then in random order with a reused buffer.
        let mut out = Vec::new();
        for i in 0..table.span_count() {
            decode_span(f, &table, i, &mut out).unwrap();
            let (s, e) = table.span_range(i);
            assert!(out == data[s as usize..e as usize], "span {i} differs");
        }
        let mut order: Vec<usize> = (0..table.span_count()).collect();
        let mut rng = Lcg(99);
        for k in (1..order.len()).rev() {
            order.swap(k, (rng.next() % (k as u64 + 1)) as usize);
        }
        for &i in order.iter().chain(order.iter().rev()) {
            decode_span(f, &table, i, &mut out).unwrap();
            let (s, e) = table.span_range(i);
            assert!(out == data[s as usize..e as usize], "span {i} differs");
        }
        // Concurrently on one &File.
        std::thread::scope(|sc| {
            for t in 0..2 {
                let table = &table;
                sc.spawn(move || {
                    let mut out = Vec::new();
                    for i in (0..table.span_count()).filter(|i| i % 2 == t) {
                        decode_span(f, table, i, &mut out).unwrap();
                        let (s, e) = table.span_range(i);
                        assert!(out == data[s as usize..e as usize]);
                    }
                });
            }
        });
        assert!(decode_span(f, &table, table.span_count(), &mut out).is_err());

        let mut all = Vec::new();
        assert_eq!(decompress_all(f, &mut all).unwrap(), data.len() as u64);
        assert!(all == data);
        table
    }

    #[test]
    fn multi_frame_checkpoints() {
        let data = data();
        let (compressed, starts) = chunked(data);
        let table = check_stream(&compressed, data, SPAN);
        assert_eq!(table.frame_count, starts.len() as u64);
        // 1 MiB frames, 2 MiB spans: a checkpoint at every second frame.
        let expect: Vec<ZstdCheckpoint> = starts
            .iter()
            .enumerate()
            .filter(|(k, _)| k % 2 == 0 && k * MIB < data.len())
            .map(|(k, &c)| ZstdCheckpoint {
                uncompressed: (k * MIB) as u64,
                compressed: c,
            })
            .collect();
        assert_eq!(table.checkpoints, expect);
        assert_eq!(table.max_span_len(), SPAN);
        assert_eq!(table.span_of(SPAN - 1), Some(0));
        assert_eq!(table.span_of(SPAN), Some(1));

        // Span 0 is treated as 1: a checkpoint at every frame.
        let (_, t1) = index(&compressed, 0).unwrap();
        assert_eq!(t1.span_count(), starts.len());
        // Huge span: a single checkpoint.
        let (_, t2) = index(&compressed, u64::MAX).unwrap();
        assert_eq!(t2.span_count(), 1);
        assert_eq!(t2.max_span_len(), data.len() as u64);
    }

    #[test]
    fn single_frame() {
        let data = data();
        let compressed = ::zstd::stream::encode_all(data, 3).unwrap();
        let table = check_stream(&compressed, data, SPAN);
        assert_eq!(table.frame_count, 1);
        assert_eq!(table.span_count(), 1);
        assert_eq!(table.max_span_len(), data.len() as u64);
    }

    fn run_tool(tool: &str, args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
        let path = format!("/usr/bin/{tool}");
        if !Path::new(&path).exists() {
            println!("{path} not found; skipping");
            return None;
        }
        let src = temp_with(input);
        let out = Command::new(&path)
            .args(args)
            .stdin(std::fs::File::open(src.path()).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool} failed");
        Some(out.stdout)
    }

    #[test]
    fn pzstd_output() {
        let data = data();
        let Some(compressed) = run_tool("pzstd", &["-p", "2", "-3", "-c", "-q"], data) else {
            return;
        };
        let table = check_stream(&compressed, data, SPAN);
        println!(
            "pzstd: {} frames, {} spans, max span {}",
            table.frame_count,
            table.span_count(),
            table.max_span_len()
        );
        assert!(table.frame_count > 1);
        assert!(table.span_count() > 1);
    }

    #[test]
    fn long_window_31() {
        // Piped input: unknown size, so the frame really declares a 2 GiB window.
        let data = &data()[..4 * MIB];
        let Some(compressed) = run_tool("zstd", &["--long=31", "-1", "-c", "-q"], data) else {
            return;
        };
        let table = check_stream(&compressed, data, SPAN);
        assert_eq!(table.frame_count, 1);
    }

    #[test]
    fn skippable_frames() {
        let data = data();
        let mut compressed = skippable(5);
        let mut starts = Vec::new();
        for (k, chunk) in data.chunks(MIB).enumerate() {
            starts.push(compressed.len() as u64);
            compressed.extend(::zstd::bulk::compress(chunk, 3).unwrap());
            if k == 2 {
                compressed.extend(skippable(0));
                compressed.extend(skippable(1000));
            }
        }
        // Trailing seek-table-like frame.
        compressed.extend(skippable(300_000));
        let table = check_stream(&compressed, data, SPAN);
        assert_eq!(table.frame_count, starts.len() as u64 + 4);
        // The checkpoint after chunk 3 (frames 2..3) sits right after chunk 3's frame,
        // i.e. at chunk 4's start.
        assert!(table.checkpoints.iter().any(|c| c.compressed == starts[4]));
        assert!(table
            .checkpoints
            .iter()
            .all(|c| c.compressed == 0 || starts.contains(&c.compressed)));
    }

    #[test]
    fn empty_frames() {
        let empty = ::zstd::bulk::compress(&[], 3).unwrap();
        let table = check_stream(&empty, &[], SPAN);
        assert_eq!(table.span_count(), 1);
        assert_eq!(table.span_range(0), (0, 0));
        assert_eq!(table.max_span_len(), 0);
        assert_eq!(table.span_of(0), None);
        let two = [
            empty.clone(),
            ::zstd::stream::encode_all(&[][..], 3).unwrap(),
        ]
        .concat();
        assert_eq!(check_stream(&two, &[], SPAN).frame_count, 2);

        // Empty frames between data frames.
        let data = &data()[..5 * MIB + 7];
        let mut compressed = empty.clone();
        for chunk in data.chunks(MIB) {
            compressed.extend(::zstd::bulk::compress(chunk, 3).unwrap());
            compressed.extend_from_slice(&empty);
        }
        let table = check_stream(&compressed, data, SPAN);
        assert_eq!(table.frame_count, 13);
        assert_eq!(table.span_count(), 3);
    }

    #[test]
    fn table_decode_rejects_bad_bytes() {
        let data = data();
        let (compressed, _) = chunked(data);
        let (_, table) = index(&compressed, SPAN).unwrap();
        let mut enc = Vec::new();
        table.encode(&mut enc);
        assert_eq!(ZstdSeekTable::decode(&enc).unwrap(), table);
        for len in 0..enc.len() {
            assert!(
                ZstdSeekTable::decode(&enc[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(ZstdSeekTable::decode(&longer).is_err());
        for pos in 0..enc.len() {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut bad = enc.clone();
                bad[pos] ^= mask;
                if let Ok(t) = ZstdSeekTable::decode(&bad) {
                    // Only "harmless" fields may change and stay valid.
                    assert_eq!(
                        t.checkpoints[0],
                        ZstdCheckpoint {
                            uncompressed: 0,
                            compressed: 0
                        }
                    );
                    for w in t.checkpoints.windows(2) {
                        assert!(w[0].uncompressed < w[1].uncompressed);
                        assert!(w[0].compressed < w[1].compressed);
                    }
                    assert!(t.checkpoints.last().unwrap().uncompressed < t.uncompressed_size);
                    let _ = t.max_span_len();
                }
            }
        }
        // Hostile counts must not allocate.
        let mut hostile = enc[..TABLE_HEADER_LEN].to_vec();
        hostile[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ZstdSeekTable::decode(&hostile).is_err());
        // Non-monotonic checkpoints.
        let mut t = table.clone();
        t.checkpoints.swap(1, 2);
        let mut bad = Vec::new();
        t.encode(&mut bad);
        assert!(ZstdSeekTable::decode(&bad)
            .unwrap_err()
            .contains("does not follow"));
        // Zero checkpoints, wrong first checkpoint, too few frames.
        let cases = [
            ZstdSeekTable {
                checkpoints: vec![],
                uncompressed_size: 0,
                frame_count: 1,
            },
            ZstdSeekTable {
                checkpoints: vec![ZstdCheckpoint {
                    uncompressed: 1,
                    compressed: 0,
                }],
                uncompressed_size: 5,
                frame_count: 1,
            },
            ZstdSeekTable {
                frame_count: 2,
                ..table.clone()
            },
            ZstdSeekTable {
                uncompressed_size: 6 * MIB as u64,
                ..table.clone()
            },
        ];
        for t in cases {
            let mut bad = Vec::new();
            t.encode(&mut bad);
            assert!(ZstdSeekTable::decode(&bad).is_err(), "{t:?}");
        }
        assert!(ZstdSeekTable::decode(b"garbage garbage garbage garbage garbage").is_err());
    }

    #[test]
    fn inconsistent_table_is_harmless() {
        let t = ZstdSeekTable {
            checkpoints: vec![
                ZstdCheckpoint {
                    uncompressed: 10,
                    compressed: 5,
                },
                ZstdCheckpoint {
                    uncompressed: 3,
                    compressed: 1,
                },
            ],
            uncompressed_size: 2,
            frame_count: 0,
        };
        assert_eq!(t.span_range(0), (10, 10));
        assert_eq!(t.span_range(1), (3, 3));
        assert_eq!(t.span_of(1), None);
        assert_eq!(t.max_span_len(), 0);
        let empty = ZstdSeekTable {
            checkpoints: vec![],
            uncompressed_size: 9,
            frame_count: 0,
        };
        assert_eq!(empty.span_of(0), None);
        assert_eq!(empty.max_span_len(), 0);
        let file = temp_with(b"");
        let mut out = vec![1];
        assert!(decode_span(file.as_file(), &empty, 0, &mut out).is_err());
        assert!(out.is_empty());
    }

    fn frame_ends(compressed: &[u8]) -> Vec<usize> {
        let mut ends = vec![0];
        let mut pos = 0;
        while pos < compressed.len() {
            let n = zstd_safe::find_frame_compressed_size(&compressed[pos..]).unwrap();
            pos += n;
            ends.push(pos);
        }
        ends
    }

    #[test]
    fn truncated_streams_error() {
        let data = &data()[..3 * MIB + 100];
        let (compressed, _) = chunked(data);
        let ends = frame_ends(&compressed);
        let mut lens: Vec<usize> = (0..compressed.len()).step_by(9973).collect();
        lens.extend([
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
            13,
            compressed.len() - 1,
            compressed.len() - 4,
        ]);
        for &e in &ends {
            lens.extend([e.saturating_sub(1), e, e + 1, e + 5]);
        }
        for len in lens {
            if len > compressed.len() {
                continue;
            }
            let cut = &compressed[..len];
            let res = index(cut, SPAN);
            let file = temp_with(cut);
            let all = decompress_all(file.as_file(), &mut io::sink());
            if len > 0 && ends.contains(&len) {
                let (got, table) = res.unwrap();
                assert!(data.starts_with(&got));
                assert_eq!(table.uncompressed_size, got.len() as u64);
                assert_eq!(all.unwrap(), got.len() as u64);
            } else {
                let msg = format!("truncated zstd stream at compressed offset {len}");
                let err = res.unwrap_err();
                assert!(err.to_string().contains(&msg), "len {len}: {err}");
                assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
                assert!(all.unwrap_err().to_string().contains(&msg));
            }
        }
    }

    #[test]
    fn corrupt_streams_error_without_panic() {
        let data = &data()[..MIB + 5000];
        let (compressed, _) = chunked(data);
        // Garbage after the last frame.
        for tail in [
            &b"x"[..],
            b"\0\0\0\0\0\0\0\0\0\0",
            b"garbage after the end of the stream",
        ] {
            let bad = [compressed.as_slice(), tail].concat();
            assert!(index(&bad, SPAN).is_err());
            let file = temp_with(&bad);
            assert!(decompress_all(file.as_file(), &mut io::sink()).is_err());
        }
        // Pure garbage and an empty file.
        assert!(index(b"this is not zstd at all", SPAN).is_err());
        let err = index(b"", SPAN).unwrap_err();
        assert!(err
            .to_string()
            .contains("truncated zstd stream at compressed offset 0"));
        let file = temp_with(b"");
        assert!(decompress_all(file.as_file(), &mut io::sink()).is_err());
        // Byte flips: an error or (without checksums) wrong data, never a panic.
        let mut rng = Lcg(7);
        for _ in 0..100 {
            let mut bad = compressed.clone();
            let pos = (rng.next() % bad.len() as u64) as usize;
            bad[pos] ^= 1 << (rng.next() % 8);
            let _ = index(&bad, SPAN);
        }
    }

    #[test]
    fn decode_span_detects_mismatched_file() {
        let data = &data()[..6 * MIB + 10];
        let (compressed, _) = chunked(data);
        let (_, table) = index(&compressed, SPAN).unwrap();
        let mut out = Vec::new();
        // Truncated file.
        let cut = temp_with(&compressed[..compressed.len() / 2]);
        let last = table.span_count() - 1;
        let err = decode_span(cut.as_file(), &table, last, &mut out).unwrap_err();
        assert!(out.is_empty());
        assert!(err.to_string().contains("truncated zstd stream"), "{err}");
        // A different file entirely.
        let other = temp_with(&::zstd::stream::encode_all(&data[..SPAN as usize * 2], 3).unwrap());
        for i in 0..table.span_count() {
            assert!(decode_span(other.as_file(), &table, i, &mut out).is_err());
        }
        // Corrupted frames: errors or data mismatches, never panics.
        let mut rng = Lcg(3);
        let file = temp_with(&compressed);
        for _ in 0..60 {
            let pos = rng.next() % compressed.len() as u64;
            let orig = compressed[pos as usize];
            file.as_file().write_all_at(&[orig ^ 0x55], pos).unwrap();
            let i = table.span_of(rng.next() % data.len() as u64).unwrap();
            let _ = decode_span(file.as_file(), &table, i, &mut out);
            file.as_file().write_all_at(&[orig], pos).unwrap();
        }
        // Spans claiming the wrong length.
        let good = temp_with(&compressed);
        let mut t = table.clone();
        t.checkpoints[1].uncompressed += 1;
        assert!(decode_span(good.as_file(), &t, 0, &mut out).is_err());
        assert!(decode_span(good.as_file(), &t, 1, &mut out).is_err());
        let mut t = table.clone();
        t.checkpoints[1].compressed += 1;
        assert!(decode_span(good.as_file(), &t, 0, &mut out).is_err());
        assert!(decode_span(good.as_file(), &t, 1, &mut out).is_err());
        let t = ZstdSeekTable {
            uncompressed_size: table.uncompressed_size + 1,
            ..table.clone()
        };
        assert!(decode_span(good.as_file(), &t, last, &mut out).is_err());
        let t = ZstdSeekTable {
            uncompressed_size: table.uncompressed_size - 1,
            ..table.clone()
        };
        assert!(decode_span(good.as_file(), &t, last, &mut out).is_err());
    }

    #[test]
    fn whole_frame_spans_decode_in_one_call_and_name_a_mismatch() {
        let data = &data()[..5 * MIB + 77];
        let (compressed, _) = chunked(data);
        let (_, table) = index(&compressed, SPAN).unwrap();
        let file = temp_with(&compressed);
        let mut out = Vec::new();
        let mut all = Vec::new();
        for i in 0..table.span_count() {
            decode_span(file.as_file(), &table, i, &mut out).unwrap();
            all.extend_from_slice(&out);
        }
        assert_eq!(all, data);
        // Span 0 (one call: its end is known) indexed one byte short, then one long.
        let mut t = table.clone();
        t.checkpoints[1].uncompressed -= 1;
        let err = decode_span(file.as_file(), &t, 0, &mut out).unwrap_err();
        assert!(
            err.to_string().contains("zstd span 0 decodes to more than"),
            "{err}"
        );
        assert!(out.is_empty());
        let mut t = table.clone();
        t.checkpoints[1].uncompressed += 1;
        let err = decode_span(file.as_file(), &t, 0, &mut out).unwrap_err();
        assert!(err.to_string().contains("zstd span 0 decoded to"), "{err}");
        // A span whose compressed bytes end past the end of the file.
        let cut = temp_with(&compressed[..table.checkpoints[1].compressed as usize - 3]);
        let err = decode_span(cut.as_file(), &table, 0, &mut out).unwrap_err();
        assert!(err.to_string().contains("truncated zstd stream"), "{err}");
    }

    #[test]
    fn finish_drains_unread_remainder() {
        let data = data();
        let (compressed, _) = chunked(data);
        let mut ix = ZstdIndexer::new(&compressed[..], SPAN).unwrap();
        let mut buf = vec![0u8; 1000];
        ix.read_exact(&mut buf).unwrap();
        assert_eq!(&buf[..], &data[..1000]);
        let table = ix.finish().unwrap();
        assert_eq!(table.uncompressed_size, data.len() as u64);
        let (_, full) = index(&compressed, SPAN).unwrap();
        assert_eq!(table, full);
        // Untouched indexer, and one over a truncated stream.
        let table = ZstdIndexer::new(&compressed[..], SPAN)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(table, full);
        let cut = &compressed[..compressed.len() - 3];
        assert!(ZstdIndexer::new(cut, SPAN).unwrap().finish().is_err());
    }
}
