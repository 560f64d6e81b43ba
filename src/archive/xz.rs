//! Random access into xz files at block boundaries, through xz's own index.
//!
//! This module owns everything xz-specific in snapfs:
//!
//! * [`parse`] reads the file from its end as `xz --list` does: stream footer, index,
//!   stream header, then the stream before it (several concatenated streams and stream
//!   padding are fine). It lists every block: where its header starts, its unpadded
//!   size, how many bytes it decodes to, and the stream's check type.
//! * [`XzIndexer`] is the indexing pass: its [`Read`] yields the uncompressed stream,
//!   decoding each block on its own (several at a time, on the rayon pool), exactly as
//!   random reads will; [`XzIndexer::finish`] returns the [`XzSeekTable`].
//! * [`XzSeekTable`] holds the blocks and groups them into spans of at least
//!   `span_bytes`; its little-endian encoding is checked as untrusted on load.
//! * [`decode_span_prefix`] decodes the blocks of one span (or only the first ones a
//!   read needs); [`decompress_all`] streams everything out, for the cache file of a
//!   file whose blocks are too long for random access (plain `xz` writes one block).
//!
//! A block is decoded without anything before it by giving liblzma's stream decoder a
//! one-block stream: a stream header with the file's check type, the block's bytes as
//! they are in the file, a one-record index and a stream footer. liblzma then checks the
//! block header's CRC-32, the block's sizes against that index record and the block's
//! check (CRC-32, CRC-64 or SHA-256), so damage after indexing is an error for the
//! blocks it hits, never wrong bytes (unless the file was written with `--check=none`).

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use liblzma::stream::{Action, Status, Stream};

use super::ahead::{Ahead, Decode};
use super::Progress;
use crate::source::Source;

/// First bytes of an xz stream.
pub const MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
/// Last bytes of an xz stream footer.
const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Length of a stream header and of a stream footer.
const HEADER_LEN: u64 = 12;
/// Longest index read (64 MiB holds millions of blocks).
const MAX_INDEX: u64 = 64 << 20;
/// Largest integer the xz format encodes (63 bits).
const VLI_MAX: u64 = u64::MAX / 2;
/// Memory one block decoder may use: a 1.5 GiB dictionary, xz's largest, fits.
const MEMLIMIT: u64 = 1600 << 20;
/// Compressed bytes read at a time while decoding a block: a buffer each decoder
/// holds (64 KiB, not 256: less memory per decoder, sequential reads as fast).
const IN_CHUNK: usize = 64 << 10;
/// Largest block decoded into memory (larger ones only stream, see [`decompress_all`]).
const MAX_BLOCK_IN_MEMORY: u64 = 1 << 30;
/// Blocks up to this size are decoded ahead in parallel by the indexer; longer ones
/// are streamed.
const AHEAD_MAX_BLOCK: u64 = 32 << 20;
/// Decoded bytes the indexer keeps in flight.
const AHEAD_BYTES: u64 = 96 << 20;
/// Blocks the indexer keeps in flight.
const AHEAD_JOBS: usize = 4;

/// Magic at the start of an encoded [`XzSeekTable`].
const TABLE_MAGIC: [u8; 8] = *b"SNXZ1\0\0\0";
/// Encoded header: magic, uncompressed size, stream count, block count.
const TABLE_HEADER_LEN: usize = 8 + 8 + 8 + 8;
/// Encoded size of one block.
const BLOCK_LEN: usize = 8 + 8 + 8 + 1 + 1;
/// Block flag: a span starts here.
const FLAG_SPAN_START: u8 = 1;

/// One block as the xz index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XzBlock {
    /// File offset of its block header.
    pub compressed: u64,
    /// Unpadded size: block header, compressed data and check (as in the xz index).
    pub unpadded: u64,
    /// Bytes it decodes to.
    pub uncompressed_len: u64,
    /// Check type of its stream: 0 none, 1 CRC-32, 4 CRC-64, 10 SHA-256.
    pub check: u8,
    /// A span starts at this block.
    pub span_start: bool,
}

impl XzBlock {
    /// File offset just past its padding and check (where the next block may start).
    fn end(&self) -> Option<u64> {
        self.compressed.checked_add(round4(self.unpadded)?)
    }
}

/// Size of the check of type `id`, for the types liblzma verifies.
fn check_len(id: u8) -> Option<u64> {
    match id {
        0 => Some(0),
        1 => Some(4),
        4 => Some(8),
        10 => Some(32),
        _ => None,
    }
}

/// Smallest possible unpadded size of a block with check `id`: an 8-byte header and
/// one byte of data.
fn min_unpadded(check: u8) -> u64 {
    9 + check_len(check).unwrap_or(0)
}

fn round4(v: u64) -> Option<u64> {
    v.checked_add(3).map(|v| v & !3)
}

/// The blocks of an xz file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Every block in file order.
    pub blocks: Vec<XzBlock>,
    /// Streams in the file.
    pub streams: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// Reads an xz variable-length integer at `*pos`, advancing it.
fn get_varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..9u32 {
        let byte = *b.get(*pos).ok_or("xz index is truncated")?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err("xz index has a non-minimal integer".into());
            }
            return Ok(v);
        }
    }
    Err("xz index has an integer longer than 9 bytes".into())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_at(src: &dyn Source, off: u64, len: u64) -> io::Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| bad("xz structure too large"))?;
    let mut buf = vec![0u8; n];
    src.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

/// Lists the blocks of the xz file `src` of `size` bytes, reading its streams from
/// the end (footer, index, header). Every field is checked; a file that is not a
/// sequence of xz streams and stream padding is refused.
pub fn parse(src: &dyn Source, size: u64) -> io::Result<Layout> {
    let mut pos = size;
    let mut streams: Vec<Vec<XzBlock>> = Vec::new();
    loop {
        // Stream padding: zero bytes, a multiple of four.
        let mut padding = 0u64;
        while pos > 0 {
            let n = pos.min(4096);
            let buf = read_at(src, pos - n, n)?;
            let zeros = buf.iter().rev().take_while(|&&b| b == 0).count() as u64;
            pos -= zeros;
            padding += zeros;
            if zeros < n {
                break;
            }
        }
        if pos == 0 {
            if streams.is_empty() {
                return Err(bad("no xz stream in the file"));
            }
            if padding > 0 {
                return Err(bad("zero bytes before the first xz stream"));
            }
            break;
        }
        if pos % 4 != 0 || padding % 4 != 0 {
            return Err(bad(format!(
                "no xz stream footer ends at offset {pos}: the file is truncated or has garbage after its last stream"
            )));
        }
        let blocks = parse_stream(src, pos)?;
        pos = blocks.0;
        streams.push(blocks.1);
    }
    streams.reverse();
    Ok(Layout {
        streams: streams.len() as u64,
        blocks: streams.into_iter().flatten().collect(),
    })
}

/// Parses the stream that ends at `end`: returns where it starts and its blocks.
fn parse_stream(src: &dyn Source, end: u64) -> io::Result<(u64, Vec<XzBlock>)> {
    let footer_at = end
        .checked_sub(HEADER_LEN)
        .ok_or_else(|| bad("xz file too short for a stream footer"))?;
    let f = read_at(src, footer_at, HEADER_LEN)?;
    if f[10..12] != FOOTER_MAGIC {
        return Err(bad(format!(
            "no xz stream footer at offset {footer_at}: the file is truncated or has garbage after its last stream"
        )));
    }
    if crc32fast::hash(&f[4..10]) != le32(&f, 0) {
        return Err(bad(format!(
            "xz stream footer at offset {footer_at} is corrupt (CRC mismatch)"
        )));
    }
    let flags = [f[8], f[9]];
    let check = stream_check(flags, footer_at)?;
    let index_len = (u64::from(le32(&f, 4)) + 1) * 4;
    if index_len > MAX_INDEX {
        return Err(bad(format!("xz index of {index_len} bytes is too large")));
    }
    let index_at = footer_at
        .checked_sub(index_len)
        .ok_or_else(|| bad("xz index would start before the file"))?;
    let index = read_at(src, index_at, index_len)?;
    let records = parse_index(&index, check).map_err(|m| bad(format!("{m} (at {index_at})")))?;
    let mut blocks_len = 0u64;
    for &(unpadded, _) in &records {
        blocks_len = round4(unpadded)
            .and_then(|r| blocks_len.checked_add(r))
            .ok_or_else(|| bad("xz block sizes overflow"))?;
    }
    let start = index_at
        .checked_sub(blocks_len)
        .and_then(|v| v.checked_sub(HEADER_LEN))
        .ok_or_else(|| bad("xz index lists more blocks than the file holds"))?;
    let h = read_at(src, start, HEADER_LEN)?;
    if h[..6] != MAGIC {
        return Err(bad(format!(
            "no xz stream header at offset {start} where the index says the stream starts"
        )));
    }
    if crc32fast::hash(&h[6..8]) != le32(&h, 8) {
        return Err(bad(format!(
            "xz stream header at offset {start} is corrupt (CRC mismatch)"
        )));
    }
    if h[6..8] != flags {
        return Err(bad(format!(
            "xz stream header and footer of the stream at {start} disagree"
        )));
    }
    let mut at = start + HEADER_LEN;
    let mut blocks = Vec::with_capacity(records.len());
    for (unpadded, uncompressed_len) in records {
        blocks.push(XzBlock {
            compressed: at,
            unpadded,
            uncompressed_len,
            check,
            span_start: false,
        });
        at += round4(unpadded).unwrap_or(0);
    }
    Ok((start, blocks))
}

/// The check type of stream flags (refusing reserved bits and checks liblzma cannot
/// verify).
fn stream_check(flags: [u8; 2], at: u64) -> io::Result<u8> {
    if flags[0] != 0 || flags[1] & 0xf0 != 0 {
        return Err(bad(format!("xz stream flags at {at} are not supported")));
    }
    let check = flags[1];
    if check_len(check).is_none() {
        return Err(bad(format!(
            "xz stream at {at} uses integrity check {check}, which cannot be verified"
        )));
    }
    Ok(check)
}

/// The (unpadded, uncompressed) records of one index.
fn parse_index(b: &[u8], check: u8) -> Result<Vec<(u64, u64)>, String> {
    if b.first() != Some(&0) {
        return Err("xz index does not start with its indicator".into());
    }
    let mut pos = 1;
    let count = get_varint(b, &mut pos)?;
    // Every record takes at least two bytes: a count beyond that is a lie.
    if count > b.len() as u64 / 2 {
        return Err(format!("xz index claims {count} records"));
    }
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        let unpadded = get_varint(b, &mut pos)?;
        let uncompressed = get_varint(b, &mut pos)?;
        if unpadded < min_unpadded(check) || unpadded > VLI_MAX - 3 || uncompressed > VLI_MAX {
            return Err(format!(
                "xz index lists a block of impossible size {unpadded}"
            ));
        }
        out.push((unpadded, uncompressed));
    }
    while pos % 4 != 0 {
        if b.get(pos) != Some(&0) {
            return Err("xz index padding is not zero".into());
        }
        pos += 1;
    }
    if pos + 4 != b.len() {
        return Err("xz index size differs from the footer's".into());
    }
    if crc32fast::hash(&b[..pos]) != le32(b, pos) {
        return Err("xz index is corrupt (CRC mismatch)".into());
    }
    Ok(out)
}

/// Marks span starts: a new span begins at the first non-empty block after the
/// current span reached `span_bytes` (0 is treated as 1: a span per block).
pub fn assign_spans(blocks: &mut [XzBlock], span_bytes: u64) {
    let span = span_bytes.max(1);
    let mut since = 0u64;
    for (i, b) in blocks.iter_mut().enumerate() {
        b.span_start = i == 0 || (since >= span && b.uncompressed_len > 0);
        if b.span_start {
            since = 0;
        }
        since = since.saturating_add(b.uncompressed_len);
    }
}

/// The blocks of one xz file, grouped into spans.
///
/// Span `i` starts at the `i`-th block marked as a span start and runs to the next
/// one; its uncompressed range starts at the sum of the sizes of the blocks before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XzSeekTable {
    /// Every block in file order.
    pub blocks: Vec<XzBlock>,
    /// Total size of the decompressed stream.
    pub uncompressed_size: u64,
    /// Streams in the file.
    pub stream_count: u64,
    /// Derived: uncompressed offset of each block.
    starts: Vec<u64>,
    /// Derived: (uncompressed offset, first block) of each span.
    spans: Vec<(u64, usize)>,
}

impl XzSeekTable {
    /// A table over `blocks`, checked as untrusted: offsets within range and strictly
    /// increasing, no overlapping blocks, spans non-empty, supported checks.
    pub fn new(blocks: Vec<XzBlock>, stream_count: u64) -> Result<XzSeekTable, String> {
        let mut starts = Vec::with_capacity(blocks.len());
        let mut spans = Vec::new();
        let mut total = 0u64;
        let mut prev_end = HEADER_LEN;
        for (i, b) in blocks.iter().enumerate() {
            if check_len(b.check).is_none() {
                return Err(format!("xz block {i} has an unsupported check type"));
            }
            if b.unpadded < min_unpadded(b.check)
                || b.unpadded > VLI_MAX - 3
                || b.uncompressed_len > VLI_MAX
            {
                return Err(format!("xz block {i} has an impossible size"));
            }
            let end = b.end().ok_or_else(|| format!("xz block {i} overflows"))?;
            if b.compressed < prev_end {
                return Err(format!(
                    "xz block {i} at {} overlaps the one before it",
                    b.compressed
                ));
            }
            prev_end = end;
            if i == 0 && !b.span_start {
                return Err("xz seek table does not start a span at block 0".into());
            }
            if b.span_start {
                // Every span but a lone first one holds bytes.
                if i > 0
                    && (b.uncompressed_len == 0 || spans.last().is_some_and(|&(s, _)| s >= total))
                {
                    return Err(format!("xz block {i} starts an empty span or follows one"));
                }
                spans.push((total, i));
            }
            starts.push(total);
            total = total
                .checked_add(b.uncompressed_len)
                .ok_or("xz stream size overflows")?;
        }
        if !blocks.is_empty() && stream_count == 0 {
            return Err("xz seek table has blocks but no stream".into());
        }
        Ok(XzSeekTable {
            blocks,
            uncompressed_size: total,
            stream_count,
            starts,
            spans,
        })
    }

    /// Number of spans.
    pub fn span_count(&self) -> usize {
        self.spans.len()
    }

    /// Uncompressed `[start, end)` range of span `i` (empty past the end).
    pub fn span_range(&self, i: usize) -> (u64, u64) {
        super::spans::range(&self.spans, |s| s.0, self.uncompressed_size, i)
    }

    /// Span containing uncompressed offset `off`, or `None` at or past the end.
    pub fn span_of(&self, off: u64) -> Option<usize> {
        super::spans::of(&self.spans, |s| s.0, self.uncompressed_size, off)
    }

    /// Length of the longest span.
    pub fn max_span_len(&self) -> u64 {
        super::spans::max_len(&self.spans, |s| s.0, self.uncompressed_size)
    }

    /// The blocks of span `i`.
    fn span_blocks(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let first = self.spans.get(i)?.1;
        let end = self.spans.get(i + 1).map_or(self.blocks.len(), |&(_, b)| b);
        Some(first..end)
    }

    /// Appends the little-endian encoding: magic `SNXZ1\0\0\0`, `uncompressed_size
    /// u64`, `stream_count u64`, `count u64`, then per block `compressed u64`,
    /// `unpadded u64`, `uncompressed_len u64`, `check u8`, `flags u8` (bit 0: a span
    /// starts here).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(TABLE_HEADER_LEN + self.blocks.len() * BLOCK_LEN);
        out.extend_from_slice(&TABLE_MAGIC);
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&self.stream_count.to_le_bytes());
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for b in &self.blocks {
            out.extend_from_slice(&b.compressed.to_le_bytes());
            out.extend_from_slice(&b.unpadded.to_le_bytes());
            out.extend_from_slice(&b.uncompressed_len.to_le_bytes());
            out.push(b.check);
            out.push(if b.span_start { FLAG_SPAN_START } else { 0 });
        }
    }

    /// Parses exactly one table written by [`encode`](Self::encode). The bytes are
    /// untrusted: never panics, allocates in proportion to `bytes.len()`, and checks
    /// everything [`new`](Self::new) checks plus the stored size.
    pub fn decode(bytes: &[u8]) -> Result<XzSeekTable, String> {
        if bytes.len() < TABLE_HEADER_LEN || bytes[..8] != TABLE_MAGIC {
            return Err("xz seek table is truncated or has a bad magic number".into());
        }
        let u64_at = |b: &[u8], at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let size = u64_at(bytes, 8);
        let streams = u64_at(bytes, 16);
        let count = u64_at(bytes, 24);
        let body = &bytes[TABLE_HEADER_LEN..];
        if body.len() % BLOCK_LEN != 0 || (body.len() / BLOCK_LEN) as u64 != count {
            return Err(format!(
                "xz seek table claims {count} blocks but has {} bytes of them",
                body.len()
            ));
        }
        let mut blocks = Vec::with_capacity(body.len() / BLOCK_LEN);
        for r in body.chunks_exact(BLOCK_LEN) {
            let flags = r[25];
            if flags & !FLAG_SPAN_START != 0 {
                return Err("xz seek table has unknown block flags".into());
            }
            blocks.push(XzBlock {
                compressed: u64_at(r, 0),
                unpadded: u64_at(r, 8),
                uncompressed_len: u64_at(r, 16),
                check: r[24],
                span_start: flags & FLAG_SPAN_START != 0,
            });
        }
        let table = XzSeekTable::new(blocks, streams)?;
        if table.uncompressed_size != size {
            return Err("xz seek table size differs from the sum of its blocks".into());
        }
        Ok(table)
    }
}

/// The one-block stream around `b`: the bytes before its bytes in the file (a stream
/// header) and after (a one-record index and a stream footer).
fn wrapper(b: &XzBlock) -> io::Result<([u8; 12], Vec<u8>)> {
    let flags = [0u8, b.check];
    let mut head = [0u8; 12];
    head[..6].copy_from_slice(&MAGIC);
    head[6..8].copy_from_slice(&flags);
    head[8..].copy_from_slice(&crc32fast::hash(&flags).to_le_bytes());
    let mut tail = vec![0u8];
    put_varint(&mut tail, 1);
    put_varint(&mut tail, b.unpadded);
    put_varint(&mut tail, b.uncompressed_len);
    while tail.len() % 4 != 0 {
        tail.push(0);
    }
    let crc = crc32fast::hash(&tail);
    tail.extend_from_slice(&crc.to_le_bytes());
    let backward = u32::try_from(tail.len() / 4 - 1).map_err(|_| bad("xz index too large"))?;
    let mut footer = backward.to_le_bytes().to_vec();
    footer.extend_from_slice(&flags);
    tail.extend_from_slice(&crc32fast::hash(&footer).to_le_bytes());
    tail.extend_from_slice(&footer);
    tail.extend_from_slice(&FOOTER_MAGIC);
    Ok((head, tail))
}

/// A source a [`BlockReader`] borrows, or shares (when the reader outlives the call).
enum SrcRef<'a> {
    Borrowed(&'a dyn Source),
    Owned(Arc<dyn Source>),
}

impl SrcRef<'_> {
    fn get(&self) -> &dyn Source {
        match self {
            SrcRef::Borrowed(s) => *s,
            SrcRef::Owned(s) => &**s,
        }
    }
}

/// Decodes one block read from its source, as a [`Read`] of its bytes.
struct BlockReader<'a> {
    src: SrcRef<'a>,
    block: XzBlock,
    head: [u8; 12],
    tail: Vec<u8>,
    /// Next file offset to read, and where the block's bytes end.
    file_pos: u64,
    file_end: u64,
    /// 0: the header is next, 1: file bytes, 2: the tail, 3: nothing left.
    stage: u8,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    stream: Stream,
    done: bool,
}

impl<'a> BlockReader<'a> {
    fn new(src: SrcRef<'a>, block: &XzBlock) -> io::Result<Self> {
        let (head, tail) = wrapper(block)?;
        let file_end = block
            .end()
            .ok_or_else(|| bad("xz block offset overflows"))?;
        let stream = Stream::new_stream_decoder(MEMLIMIT, 0)
            .map_err(|e| io::Error::other(format!("cannot create an xz decoder: {e}")))?;
        Ok(BlockReader {
            src,
            block: *block,
            head,
            tail,
            file_pos: block.compressed,
            file_end,
            stage: 0,
            buf: Vec::new(),
            pos: 0,
            len: 0,
            stream,
            done: false,
        })
    }

    fn refill(&mut self) -> io::Result<()> {
        self.pos = 0;
        self.len = 0;
        if self.stage == 0 {
            self.buf.clear();
            self.buf.extend_from_slice(&self.head);
            self.len = self.buf.len();
            self.stage = 1;
            return Ok(());
        }
        if self.stage == 1 {
            let left = self.file_end - self.file_pos;
            if left > 0 {
                let n = usize::try_from(left).map_or(IN_CHUNK, |l| l.min(IN_CHUNK));
                self.buf.resize(n, 0);
                self.src
                    .get()
                    .read_exact_at(&mut self.buf[..n], self.file_pos)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            bad(format!(
                                "truncated xz file: the block at offset {} is cut short",
                                self.block.compressed
                            ))
                        } else {
                            e
                        }
                    })?;
                self.file_pos += n as u64;
                self.len = n;
                return Ok(());
            }
            self.stage = 2;
        }
        if self.stage == 2 {
            self.buf.clear();
            self.buf.extend_from_slice(&self.tail);
            self.len = self.buf.len();
            self.stage = 3;
        }
        Ok(())
    }

    fn corrupt(&self, e: liblzma::stream::Error) -> io::Error {
        let what = match e {
            liblzma::stream::Error::Data => "data is corrupt or its check does not match",
            liblzma::stream::Error::Format => "not an xz block",
            liblzma::stream::Error::Options => "unsupported block header or filter",
            liblzma::stream::Error::MemLimit => "needs too much memory",
            liblzma::stream::Error::Mem => "out of memory",
            _ => "decoder error",
        };
        bad(format!(
            "corrupt xz block at offset {}: {what}",
            self.block.compressed
        ))
    }
}

impl Read for BlockReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.done {
                return Ok(0);
            }
            if self.pos == self.len {
                self.refill()?;
            }
            let input = self.buf.get(self.pos..self.len).unwrap_or_default();
            let (in0, out0) = (self.stream.total_in(), self.stream.total_out());
            let status = self
                .stream
                .process(input, out, Action::Run)
                .map_err(|e| self.corrupt(e))?;
            let consumed = (self.stream.total_in() - in0) as usize;
            let produced = (self.stream.total_out() - out0) as usize;
            self.pos = (self.pos + consumed).min(self.len);
            if status == Status::StreamEnd {
                self.done = true;
                return Ok(produced);
            }
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 && self.stage == 3 && self.pos == self.len {
                return Err(bad(format!(
                    "xz block at offset {} ends early; the index does not match the file",
                    self.block.compressed
                )));
            }
        }
    }
}

/// Appends block `b` decoded to `out`; exactly `b.uncompressed_len` bytes on success
/// (`out` is left as it was on error).
pub fn decode_block_into(src: &dyn Source, b: &XzBlock, out: &mut Vec<u8>) -> io::Result<()> {
    if b.uncompressed_len > MAX_BLOCK_IN_MEMORY {
        return Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!(
                "xz block at offset {} is too large to decode into memory",
                b.compressed
            ),
        ));
    }
    let start = out.len();
    let len = usize::try_from(b.uncompressed_len)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "xz block too large"))?;
    let mut r = BlockReader::new(SrcRef::Borrowed(src), b)?;
    // The buffer grows with what really comes out (at most doubling), not with the
    // size the file's index claims.
    let mut fill = || -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(done.max(1 << 20));
            out.try_reserve(chunk).map_err(|_| {
                io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate an xz block")
            })?;
            out.resize(start + done + chunk, 0);
            r.read_exact(&mut out[start + done..])?;
            done += chunk;
        }
        let mut one = [0u8; 1];
        match r.read(&mut one)? {
            0 => Ok(()),
            _ => Err(bad("xz block decodes to more bytes than indexed")),
        }
    };
    let result = fill();
    if let Err(e) = result {
        out.truncate(start);
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            bad(format!(
                "xz block at offset {} decodes to fewer bytes than indexed",
                b.compressed
            ))
        } else {
            e
        });
    }
    Ok(())
}

/// Decodes span `i` into `out` (cleared first), or only its first blocks up to at
/// least `limit` bytes. Every block decoded is checked whole.
pub fn decode_span_prefix(
    src: &dyn Source,
    table: &XzSeekTable,
    i: usize,
    limit: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    let blocks = table.span_blocks(i).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("xz span {i} out of range ({} spans)", table.span_count()),
        )
    })?;
    // The blocks needed: up to the one that reaches `limit`.
    let mut need = Vec::new();
    let mut have = 0u64;
    for k in blocks {
        if have >= limit && !need.is_empty() {
            break;
        }
        let b = table
            .blocks
            .get(k)
            .ok_or_else(|| bad("xz span lists a missing block"))?;
        need.push(*b);
        have = have.saturating_add(b.uncompressed_len);
    }
    // One block after the other: a span is decoded on one of the threads that share
    // the decoding (the reader's, or a prefetch thread), so that no more decoders run
    // (each holding its block's working memory) than there are such threads.
    let r = need.iter().try_for_each(|b| decode_block_into(src, b, out));
    if let Err(e) = r {
        out.clear();
        return Err(e);
    }
    Ok(())
}

/// Decodes span `i` whole into `out`.
pub fn decode_span(
    src: &dyn Source,
    table: &XzSeekTable,
    i: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    decode_span_prefix(src, table, i, u64::MAX, out)
}

/// Streams every block out to `dest` (for the cache file); returns the bytes written.
pub fn decompress_all(
    src: &dyn Source,
    table: &XzSeekTable,
    dest: &mut dyn Write,
) -> io::Result<u64> {
    let mut total = 0u64;
    for b in &table.blocks {
        let n = io::copy(&mut BlockReader::new(SrcRef::Borrowed(src), b)?, dest)?;
        if n != b.uncompressed_len {
            return Err(bad(format!(
                "xz block at offset {} decoded to {n} bytes, indexed {}",
                b.compressed, b.uncompressed_len
            )));
        }
        total += n;
    }
    Ok(total)
}

/// The indexing pass over an xz file: its [`Read`] yields the decompressed stream,
/// every block decoded on its own (small ones a few at a time on the rayon pool,
/// large ones streamed), and [`finish`](Self::finish) returns the seek table.
pub struct XzIndexer {
    src: Arc<dyn Source>,
    table: XzSeekTable,
    progress: Progress,
    /// Next block to hand to the decoders.
    next: usize,
    ahead: Ahead<usize>,
    /// Decoded bytes being handed out.
    cur: Vec<u8>,
    cur_pos: usize,
    /// A large block being streamed (the blocks before it were handed out first), and
    /// the bytes it produced so far.
    streaming: Option<(usize, BlockReader<'static>, u64)>,
}

impl XzIndexer {
    /// Parses the blocks of `src` and groups them into spans of `span_bytes`.
    /// `progress` gets the compressed offset of the blocks handed out.
    pub fn new(src: Arc<dyn Source>, span_bytes: u64, progress: Progress) -> io::Result<Self> {
        let layout = parse(&*src, src.identity().size)?;
        let mut blocks = layout.blocks;
        assign_spans(&mut blocks, span_bytes);
        let table = XzSeekTable::new(blocks, layout.streams).map_err(bad)?;
        let decode_src = src.clone();
        let blocks = Arc::new(table.blocks.clone());
        let decode: Decode<usize> = Arc::new(move |&i| {
            let mut out = Vec::new();
            let b = blocks.get(i).ok_or_else(|| bad("no such xz block"))?;
            decode_block_into(&*decode_src, b, &mut out)?;
            Ok(out)
        });
        Ok(XzIndexer {
            src,
            table,
            progress,
            next: 0,
            ahead: Ahead::new(decode, AHEAD_JOBS, AHEAD_BYTES),
            cur: Vec::new(),
            cur_pos: 0,
            streaming: None,
        })
    }

    /// The seek table (after the whole stream was read, which checked every block).
    pub fn finish(mut self) -> io::Result<XzSeekTable> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.table)
    }

    /// Starts decoders on the blocks ahead, up to the first large one, which starts
    /// streaming once the blocks before it were handed out.
    fn top_up(&mut self) -> io::Result<()> {
        while let Some(b) = self.table.blocks.get(self.next) {
            if b.uncompressed_len > AHEAD_MAX_BLOCK {
                if self.ahead.is_empty() {
                    let r = BlockReader::new(SrcRef::Owned(self.src.clone()), b)?;
                    self.streaming = Some((self.next, r, 0));
                    self.next += 1;
                }
                break;
            }
            if !self.ahead.has_room(b.uncompressed_len) {
                break;
            }
            self.ahead.push(self.next, b.uncompressed_len);
            self.next += 1;
        }
        Ok(())
    }

    fn done_with(&self, i: usize) {
        if let Some(end) = self.table.blocks.get(i).and_then(|b| b.end()) {
            self.progress.store(end, Ordering::Relaxed);
        }
    }
}

impl Read for XzIndexer {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.cur_pos < self.cur.len() {
                let n = (self.cur.len() - self.cur_pos).min(out.len());
                out[..n].copy_from_slice(&self.cur[self.cur_pos..self.cur_pos + n]);
                self.cur_pos += n;
                return Ok(n);
            }
            if let Some((i, r, produced)) = &mut self.streaming {
                let n = r.read(out)?;
                *produced += n as u64;
                if n > 0 {
                    return Ok(n);
                }
                let (i, produced) = (*i, *produced);
                let b = self.table.blocks[i];
                if produced != b.uncompressed_len {
                    return Err(bad(format!(
                        "xz block at offset {} decoded to {produced} bytes, indexed {}",
                        b.compressed, b.uncompressed_len
                    )));
                }
                self.streaming = None;
                self.done_with(i);
                continue;
            }
            self.top_up()?;
            if self.streaming.is_some() {
                continue;
            }
            let Some((i, r)) = self.ahead.pop() else {
                return Ok(0);
            };
            self.cur = r?;
            self.cur_pos = 0;
            self.done_with(i);
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

    /// ~6 MiB of semi-compressible text (LCG words and numbers).
    fn data() -> &'static [u8] {
        static DATA: OnceLock<Vec<u8>> = OnceLock::new();
        DATA.get_or_init(|| {
            let mut x = 0x5eedu64;
            let mut next = || {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                x >> 33
            };
            let words: Vec<Vec<u8>> = (0..1500)
                .map(|_| {
                    (0..2 + next() % 9)
                        .map(|_| b'a' + (next() % 26) as u8)
                        .collect()
                })
                .collect();
            let mut out = Vec::new();
            while out.len() < 6 * MIB + 4321 {
                let r = next();
                if r % 11 == 0 {
                    out.extend_from_slice(format!("{} ", next()).as_bytes());
                } else {
                    out.extend_from_slice(&words[(r % words.len() as u64) as usize]);
                    out.push(if r % 13 == 0 { b'\n' } else { b' ' });
                }
            }
            out.truncate(6 * MIB + 4321);
            out
        })
    }

    fn xz_tool(args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
        if !Path::new("/usr/bin/xz").exists() {
            println!("/usr/bin/xz not found; skipping");
            return None;
        }
        let mut child = Command::new("/usr/bin/xz")
            .args(args)
            .args(["-c", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(out.status.success());
        Some(out.stdout)
    }

    fn temp_with(bytes: &[u8]) -> Arc<dyn Source> {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        Arc::new(f)
    }

    fn index(src: &Arc<dyn Source>, span: u64) -> io::Result<(Vec<u8>, XzSeekTable)> {
        let progress = Progress::default();
        let mut ix = XzIndexer::new(src.clone(), span, progress.clone())?;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 300_000];
        let mut k = 0usize;
        loop {
            let want = [1usize, 4096, 300_000, 77][k % 4];
            k += 1;
            let n = ix.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let table = ix.finish()?;
        if !table.blocks.is_empty() {
            assert_eq!(
                progress.load(Ordering::Relaxed),
                table.blocks.last().unwrap().end().unwrap()
            );
        }
        Ok((got, table))
    }

    /// Everything that must hold for a valid file of `data`.
    fn check_file(compressed: &[u8], data: &[u8], span: u64) -> XzSeekTable {
        let src = temp_with(compressed);
        let (got, table) = index(&src, span).unwrap();
        assert!(got == data, "indexer output differs");
        assert_eq!(table.uncompressed_size, data.len() as u64);
        let mut enc = Vec::new();
        table.encode(&mut enc);
        assert_eq!(XzSeekTable::decode(&enc).unwrap(), table);
        let mut out = Vec::new();
        let mut max = 0;
        for i in 0..table.span_count() {
            let (s, e) = table.span_range(i);
            max = max.max(e - s);
            decode_span(&*src, &table, i, &mut out).unwrap();
            assert!(out == data[s as usize..e as usize], "span {i} differs");
            assert_eq!(table.span_of(s), Some(i));
            assert_eq!(table.span_of(e - 1), Some(i));
            // A prefix: whole blocks up to the limit.
            decode_span_prefix(&*src, &table, i, 1, &mut out).unwrap();
            assert!(!out.is_empty() && data[s as usize..].starts_with(&out));
            if i > 0 {
                assert!(e - s >= span.max(1) || i + 1 == table.span_count());
            }
        }
        assert_eq!(table.max_span_len(), max);
        assert_eq!(table.span_of(table.uncompressed_size), None);
        assert!(decode_span(&*src, &table, table.span_count(), &mut out).is_err());
        let mut all = Vec::new();
        assert_eq!(
            decompress_all(&*src, &table, &mut all).unwrap(),
            data.len() as u64
        );
        assert!(all == data);
        table
    }

    #[test]
    fn multi_block_file_has_a_span_per_block() {
        let data = data();
        let Some(xz) = xz_tool(&["-1", "-T2", "--block-size=1MiB"], data) else {
            return;
        };
        let table = check_file(&xz, data, 1);
        assert_eq!(table.blocks.len(), 7);
        assert_eq!(table.span_count(), 7);
        assert_eq!(table.max_span_len(), MIB as u64);
        assert!(table.blocks.iter().all(|b| b.check == 4));
        // 2 MiB spans: every second block starts one.
        let table = check_file(&xz, data, 2 * MIB as u64);
        assert_eq!(table.span_count(), 4);
        assert_eq!(table.span_range(1), (2 * MIB as u64, 4 * MIB as u64));
    }

    #[test]
    fn single_block_and_checks() {
        let data = data();
        for check in ["none", "crc32", "crc64", "sha256"] {
            let Some(xz) = xz_tool(&["-0", "-T1", &format!("--check={check}")], data) else {
                return;
            };
            let table = check_file(&xz, data, 1 << 20);
            assert_eq!(table.blocks.len(), 1, "{check}");
            assert_eq!(table.max_span_len(), data.len() as u64);
        }
    }

    #[test]
    fn concatenated_streams_with_padding_and_empty_streams() {
        let data = &data()[..3 * MIB + 5];
        let Some(a) = xz_tool(&["-1", "-T2", "--block-size=512KiB"], &data[..MIB + 3]) else {
            return;
        };
        let b = xz_tool(&["-1", "-T1", "--check=crc32"], &data[MIB + 3..]).unwrap();
        let empty = xz_tool(&["-1"], b"").unwrap();
        let mut cat = a.clone();
        cat.extend_from_slice(&[0; 8]);
        cat.extend_from_slice(&empty);
        cat.extend_from_slice(&b);
        cat.extend_from_slice(&[0; 4]);
        let table = check_file(&cat, data, 1);
        assert_eq!(table.stream_count, 3);
        assert_eq!(table.blocks.len(), 4);
        assert_eq!(table.blocks[3].check, 1);
        // An empty file is a valid xz file of nothing.
        let t = check_file(&empty, b"", 1);
        assert_eq!((t.span_count(), t.blocks.len()), (0, 0));
    }

    #[test]
    fn damaged_files_are_refused_or_fail_only_where_damaged() {
        let data = data();
        let Some(xz) = xz_tool(&["-1", "-T2", "--block-size=1MiB"], data) else {
            return;
        };
        let src = temp_with(&xz);
        let (_, table) = index(&src, 1).unwrap();
        // Cut short, garbage after, bad padding, damaged footer and index.
        let n = xz.len();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("half", xz[..n / 2].to_vec()),
            ("minus one", xz[..n - 1].to_vec()),
            ("garbage", [&xz[..], b"garbage!"].concat()),
            ("odd padding", [&xz[..], &[0, 0]].concat()),
            ("leading zeros", [&[0u8; 4][..], &xz[..]].concat()),
        ];
        for at in [n - 1, n - 3, n - 6, n - 10, n - 14, n - 20] {
            let mut bad = xz.clone();
            bad[at] ^= 0x10;
            cases.push(("flip in footer or index", bad));
        }
        for (what, bytes) in cases {
            let src = temp_with(&bytes);
            assert!(index(&src, 1).is_err(), "{what} accepted");
        }
        // A block damaged after indexing: that span fails, every other reads fine.
        let victim = &table.blocks[3];
        let mut bad = xz.clone();
        let mid = (victim.compressed + victim.unpadded / 2) as usize;
        bad[mid] ^= 0x55;
        let src = temp_with(&bad);
        let mut out = Vec::new();
        for i in 0..table.span_count() {
            let r = decode_span(&*src, &table, i, &mut out);
            if i == 3 {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("corrupt xz block"), "{e}");
                assert!(out.is_empty());
            } else {
                r.unwrap();
                let (s, e) = table.span_range(i);
                assert!(out == data[s as usize..e as usize]);
            }
        }
        assert!(index(&src, 1).is_err());
        // The file truncated after indexing.
        let src = temp_with(&xz[..victim.compressed as usize + 100]);
        let e = decode_span(&*src, &table, 3, &mut out).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        decode_span(&*src, &table, 2, &mut out).unwrap();
        // A table that does not match the file.
        let other = temp_with(&xz_tool(&["-1", "-T2", "--block-size=1MiB"], &data[5..]).unwrap());
        for i in 0..table.span_count() {
            assert!(decode_span(&*other, &table, i, &mut out).is_err());
        }
        let mut t = table.clone();
        t.blocks[2].uncompressed_len += 1;
        let t = XzSeekTable::new(t.blocks, 1).unwrap();
        assert!(decode_span(&*src, &t, 2, &mut out).is_err());
    }

    #[test]
    fn table_decode_rejects_bad_bytes() {
        let data = &data()[..3 * MIB];
        let Some(xz) = xz_tool(&["-1", "-T2", "--block-size=256KiB"], data) else {
            return;
        };
        let (_, table) = index(&temp_with(&xz), 512 << 10).unwrap();
        let mut enc = Vec::new();
        table.encode(&mut enc);
        for len in 0..enc.len() {
            assert!(XzSeekTable::decode(&enc[..len]).is_err(), "cut to {len}");
        }
        assert!(XzSeekTable::decode(&[enc.as_slice(), &[0]].concat()).is_err());
        for pos in 0..enc.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = enc.clone();
                bad[pos] ^= mask;
                if let Ok(t) = XzSeekTable::decode(&bad) {
                    // Whatever is accepted is consistent.
                    let _ = t.max_span_len();
                    for i in 0..t.span_count() {
                        let (s, e) = t.span_range(i);
                        assert!(s < e);
                    }
                }
            }
        }
        let mut hostile = enc[..TABLE_HEADER_LEN].to_vec();
        hostile[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(XzSeekTable::decode(&hostile).is_err());
        let mut t = table.blocks.clone();
        t.swap(1, 2);
        assert!(XzSeekTable::new(t, 1).is_err());
        let mut t = table.blocks.clone();
        t[0].span_start = false;
        assert!(XzSeekTable::new(t, 1).is_err());
        let mut t = table.blocks.clone();
        t[1].check = 2;
        assert!(XzSeekTable::new(t, 1).is_err());
        assert!(XzSeekTable::new(table.blocks.clone(), 0).is_err());
        // Absurd sizes decode into an error, not an allocation.
        let mut t = table.blocks.clone();
        t[0].uncompressed_len = VLI_MAX;
        let t = XzSeekTable::new(t, 1).unwrap();
        let mut out = Vec::new();
        assert!(decode_span(&*temp_with(&xz), &t, 0, &mut out).is_err());
    }

    #[test]
    fn varints_round_trip_and_reject_overlong() {
        for v in [0u64, 1, 127, 128, 300, 1 << 35, VLI_MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos), Ok(v));
            assert_eq!(pos, b.len());
        }
        assert!(get_varint(&[0x80, 0x00], &mut 0).is_err());
        assert!(get_varint(&[0xff; 10], &mut 0).is_err());
        assert!(get_varint(&[0x80], &mut 0).is_err());
    }
}
