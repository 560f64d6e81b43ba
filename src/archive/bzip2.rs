//! Random access into bzip2 files at block boundaries.
//!
//! This module owns everything bzip2-specific in snapfs:
//!
//! * [`Scanner`] finds where every block starts and ends. bzip2 blocks are independent
//!   but bit-aligned, and a block's magic (`0x314159265359`) may also occur inside
//!   compressed data, so the scanner does not search for it: it parses each block's
//!   header, tables and Huffman-coded symbols up to the end-of-block symbol, which is
//!   where the next block's magic (or the end-of-stream marker `0x177245385090`) must
//!   follow. It checks each stream's combined CRC against its blocks' CRCs. Several
//!   concatenated streams (`pbzip2`, `cat a.bz2 b.bz2`) are fine; what follows the last
//!   stream, if it does not start like a stream, is trailing garbage that bzip2 itself
//!   ignores with a warning (and so GNU tar extracts such a file): it is reported and
//!   ignored.
//! * [`Bz2Indexer`] is the indexing pass: its [`Read`] yields the decompressed stream,
//!   each block decoded on its own on the rayon pool (a few ahead), exactly as random
//!   reads will; [`Bz2Indexer::finish`] returns the [`Bz2SeekTable`].
//! * [`Bz2SeekTable`] holds the blocks (bit offset, bit length, size, CRC, level) and
//!   groups them into spans of at least `span_bytes`; its encoding is checked as
//!   untrusted on load.
//! * [`decode_span_prefix`] decodes the blocks of a span (or the first ones a read
//!   needs).
//!
//! One block is decoded by giving the `bzip2` crate's decoder a synthesized stream:
//! `BZh` and the level, the block's bits realigned to a byte boundary, and an
//! end-of-stream marker whose combined CRC is the block's CRC. The decoder checks the
//! block CRC, so damage after indexing is an error for that block, never wrong bytes.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ::bzip2::{Decompress, Status};

use super::ahead::{Ahead, Decode};
use super::Progress;
use crate::source::Source;

/// 48-bit magic at the start of every block.
pub const BLOCK_MAGIC: u64 = 0x3141_5926_5359;
/// 48-bit magic of the end-of-stream marker.
pub const EOS_MAGIC: u64 = 0x1772_4538_5090;
/// Symbols per Huffman group.
const GROUP_SIZE: u32 = 50;
/// Most selectors bzip2 uses (more are read and ignored, as bzip2 1.0.8 does).
const MAX_SELECTORS: usize = 2 + 900_000 / GROUP_SIZE as usize;
/// Longest Huffman code.
const MAX_CODE_LEN: u32 = 20;
/// Size of bzip2's code-length-indexed tables.
const CODE_TABLE: usize = 23;
/// Largest alphabet: 256 byte values, RUNA/RUNB and end-of-block, minus one.
const MAX_ALPHA: usize = 258;
/// Fewest bits a block can take (magic, CRC and the smallest tables).
const MIN_BLOCK_BITS: u32 = 48 + 32 + 40;
/// Most bits a block can take: 900,001 symbols of 20 bits plus its tables.
const MAX_BLOCK_BITS: u32 = 24 << 20;
/// Bytes one block of level `level` can decode to at most: the run-length stage turns
/// 5 bytes into at most 259.
fn max_block_out(level: u8) -> u64 {
    u64::from(level) * 100_000 / 5 * 259 + 4
}
/// Compressed bytes buffered by the scanner.
const SCAN_CHUNK: usize = 1 << 20;
/// Blocks the indexer keeps in flight.
const AHEAD_JOBS: usize = 4;

/// Magic at the start of an encoded [`Bz2SeekTable`].
const TABLE_MAGIC: [u8; 8] = *b"SNBZ2v1\0";
/// Encoded header: magic, uncompressed size, stream count, block count.
const TABLE_HEADER_LEN: usize = 8 + 8 + 8 + 8;
/// Encoded size of one block.
const BLOCK_LEN: usize = 8 + 4 + 4 + 4 + 1 + 1;
/// Block flag: a span starts here.
const FLAG_SPAN_START: u8 = 1;

/// One bzip2 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bz2Block {
    /// Bit offset in the file of its block magic (bit 0 is the top bit of byte 0).
    pub bit_offset: u64,
    /// Its length in bits, magic and CRC included.
    pub bit_len: u32,
    /// Bytes it decodes to (0 while unknown, during the scan).
    pub uncompressed_len: u32,
    /// Its CRC (as stored after the magic).
    pub crc: u32,
    /// Its stream's block size level, 1 to 9.
    pub level: u8,
    /// A span starts at this block.
    pub span_start: bool,
}

impl Bz2Block {
    fn end_bit(&self) -> Option<u64> {
        self.bit_offset.checked_add(u64::from(self.bit_len))
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

// ------------------------------------------------------------------ scanning

/// Big-endian bit reader over a byte stream that knows its bit position.
struct Bits<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Bits not yet consumed, top-aligned.
    acc: u64,
    /// Valid bits in `acc`.
    n: u32,
    /// Bit position (in the file) of the next bit.
    bit_pos: u64,
    eof: bool,
}

impl<R: Read> Bits<R> {
    fn new(inner: R) -> Self {
        Bits {
            inner,
            buf: vec![0u8; SCAN_CHUNK].into_boxed_slice(),
            pos: 0,
            len: 0,
            acc: 0,
            n: 0,
            bit_pos: 0,
            eof: false,
        }
    }

    /// Tops `acc` up to at least 57 bits (fewer only at the end of input).
    #[inline(never)]
    fn fill(&mut self) -> io::Result<()> {
        while self.n <= 56 {
            if let Some(w) = self
                .buf
                .get(..self.len)
                .and_then(|b| b.get(self.pos..self.pos + 8))
            {
                // Whole bytes that fit, from one big-endian load.
                let mut a = [0u8; 8];
                a.copy_from_slice(w);
                let take = (64 - self.n) / 8;
                let mask = if take == 8 {
                    u64::MAX
                } else {
                    !(u64::MAX >> (take * 8))
                };
                self.acc |= (u64::from_be_bytes(a) & mask) >> self.n;
                self.n += take * 8;
                self.pos += take as usize;
                continue;
            }
            if self.pos >= self.len {
                if self.eof {
                    return Ok(());
                }
                self.pos = 0;
                self.len = loop {
                    match self.inner.read(&mut self.buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        other => break other?.min(self.buf.len()),
                    }
                };
                if self.len == 0 {
                    self.eof = true;
                    return Ok(());
                }
                continue;
            }
            self.acc |= u64::from(self.buf[self.pos]) << (56 - self.n);
            self.pos += 1;
            self.n += 8;
        }
        Ok(())
    }

    /// The next `k` bits (1..=32) without consuming them; zeros past the end.
    #[inline(always)]
    fn peek(&mut self, k: u32) -> io::Result<u32> {
        if self.n < k {
            self.fill()?;
        }
        Ok((self.acc >> (64 - k)) as u32)
    }

    fn truncated(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "truncated bzip2 stream at byte {} (bit {})",
                self.bit_pos / 8,
                self.bit_pos
            ),
        )
    }

    /// Consumes `k` bits (1..=32).
    #[inline(always)]
    fn skip(&mut self, k: u32) -> io::Result<()> {
        if self.n < k {
            self.fill()?;
            if self.n < k {
                return Err(self.truncated());
            }
        }
        self.acc <<= k;
        self.n -= k;
        self.bit_pos += u64::from(k);
        Ok(())
    }

    #[inline(always)]
    fn get(&mut self, k: u32) -> io::Result<u32> {
        let v = self.peek(k)?;
        self.skip(k)?;
        Ok(v)
    }

    fn bit(&mut self) -> io::Result<bool> {
        Ok(self.get(1)? == 1)
    }

    fn get48(&mut self) -> io::Result<u64> {
        let hi = u64::from(self.get(24)?);
        Ok(hi << 24 | u64::from(self.get(24)?))
    }

    /// Bits left before the end of input (at most 64 are looked at).
    fn available(&mut self) -> io::Result<u32> {
        self.fill()?;
        Ok(self.n)
    }

    fn align(&mut self) -> io::Result<()> {
        let k = ((8 - self.bit_pos % 8) % 8) as u32;
        if k > 0 {
            self.skip(k)?;
        }
        Ok(())
    }
}

/// Bits a [`Huffman`] lookup table resolves at once.
const LUT_BITS: u32 = 10;

/// bzip2's canonical Huffman decoding tables for one group (`BZ2_hbCreateDecodeTables`),
/// plus a lookup table for the codes of up to [`LUT_BITS`] bits.
struct Huffman {
    min_len: u32,
    limit: [i32; CODE_TABLE],
    base: [i32; CODE_TABLE],
    perm: [u16; MAX_ALPHA],
    /// Per `LUT_BITS`-bit window: symbol << 8 | code length (0: take the slow path).
    lut: Box<[u32; 1 << LUT_BITS]>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Huffman {
        let min_len = u32::from(lengths.iter().copied().min().unwrap_or(1));
        let max_len = u32::from(lengths.iter().copied().max().unwrap_or(1));
        let mut h = Huffman {
            min_len,
            limit: [0; CODE_TABLE],
            base: [0; CODE_TABLE],
            perm: [0; MAX_ALPHA],
            lut: Box::new([0; 1 << LUT_BITS]),
        };
        let mut pp = 0;
        for len in min_len..=max_len {
            for (sym, &l) in lengths.iter().enumerate() {
                if u32::from(l) == len && pp < MAX_ALPHA {
                    h.perm[pp] = sym as u16;
                    pp += 1;
                }
            }
        }
        // Lengths are 1..=20 (checked by the caller), so every index is in range.
        for &l in lengths {
            h.base[usize::from(l) + 1] += 1;
        }
        for i in 1..CODE_TABLE {
            h.base[i] += h.base[i - 1];
        }
        let mut vec = 0i32;
        for i in min_len as usize..=max_len as usize {
            vec += h.base[i + 1] - h.base[i];
            h.limit[i] = vec - 1;
            vec <<= 1;
        }
        for i in min_len as usize + 1..=max_len as usize {
            h.base[i] = ((h.limit[i - 1] + 1) << 1) - h.base[i];
        }
        for w in 0..1u32 << LUT_BITS {
            for zn in min_len..=LUT_BITS {
                let zvec = (w >> (LUT_BITS - zn)) as i32;
                if zvec <= h.limit[zn as usize] {
                    let sym = usize::try_from(zvec - h.base[zn as usize])
                        .ok()
                        .and_then(|i| h.perm.get(i));
                    if let Some(&sym) = sym {
                        h.lut[w as usize] = u32::from(sym) << 8 | zn;
                    }
                    break;
                }
            }
        }
        h
    }

    #[inline(always)]
    fn decode<R: Read>(&self, bits: &mut Bits<R>) -> io::Result<u16> {
        let window = bits.peek(MAX_CODE_LEN)?;
        let hit = self.lut[(window >> (MAX_CODE_LEN - LUT_BITS)) as usize];
        if hit != 0 {
            bits.skip(hit & 0xff)?;
            return Ok((hit >> 8) as u16);
        }
        self.decode_long(bits, window)
    }

    /// Codes longer than the lookup table (and invalid ones).
    #[cold]
    fn decode_long<R: Read>(&self, bits: &mut Bits<R>, window: u32) -> io::Result<u16> {
        let mut zn = self.min_len;
        loop {
            if zn > MAX_CODE_LEN {
                return Err(bad(format!(
                    "corrupt bzip2 block: bad Huffman code at bit {}",
                    bits.bit_pos
                )));
            }
            let zvec = (window >> (MAX_CODE_LEN - zn)) as i32;
            if zvec <= self.limit[zn as usize] {
                bits.skip(zn)?;
                let idx = zvec - self.base[zn as usize];
                return usize::try_from(idx)
                    .ok()
                    .and_then(|i| self.perm.get(i).copied())
                    .ok_or_else(|| bad("corrupt bzip2 block: Huffman code out of range"));
            }
            zn += 1;
        }
    }
}

/// Parses one block after its magic and CRC, up to its end-of-block symbol (the
/// checks are bzip2 1.0.8's).
fn skip_block_body<R: Read>(bits: &mut Bits<R>, level: u8) -> io::Result<()> {
    let corrupt = |what: &str, at: u64| bad(format!("corrupt bzip2 block at bit {at}: {what}"));
    let at = bits.bit_pos;
    let _randomised = bits.bit()?;
    let orig_ptr = bits.get(24)?;
    if orig_ptr > 10 + 100_000 * u32::from(level) {
        return Err(corrupt("origin pointer out of range", at));
    }
    let used16 = bits.get(16)?;
    let mut n_in_use = 0u32;
    for i in 0..16 {
        if used16 & (0x8000 >> i) != 0 {
            n_in_use += bits.get(16)?.count_ones();
        }
    }
    if n_in_use == 0 {
        return Err(corrupt("no symbols in use", at));
    }
    let alpha = (n_in_use + 2) as usize;
    let n_groups = bits.get(3)? as usize;
    if !(2..=6).contains(&n_groups) {
        return Err(corrupt("bad number of Huffman tables", at));
    }
    let n_selectors = bits.get(15)? as usize;
    if n_selectors == 0 {
        return Err(corrupt("no selectors", at));
    }
    let mut mtf: [u8; 6] = [0, 1, 2, 3, 4, 5];
    let mut selectors = Vec::with_capacity(n_selectors.min(MAX_SELECTORS));
    for i in 0..n_selectors {
        let mut j = 0usize;
        while bits.bit()? {
            j += 1;
            if j >= n_groups {
                return Err(corrupt("bad selector", at));
            }
        }
        if i < MAX_SELECTORS {
            let v = mtf[j];
            mtf.copy_within(0..j, 1);
            mtf[0] = v;
            selectors.push(v);
        }
    }
    let mut tables = Vec::with_capacity(n_groups);
    let mut lengths = [0u8; MAX_ALPHA];
    for _ in 0..n_groups {
        let mut curr = bits.get(5)?;
        for len in lengths.iter_mut().take(alpha) {
            loop {
                if !(1..=MAX_CODE_LEN).contains(&curr) {
                    return Err(corrupt("bad code length", at));
                }
                if !bits.bit()? {
                    break;
                }
                if bits.bit()? {
                    curr -= 1;
                } else {
                    curr += 1;
                }
            }
            *len = curr as u8;
        }
        tables.push(Huffman::new(&lengths[..alpha]));
    }
    let eob = (n_in_use + 1) as u16;
    let max = 100_000 * u32::from(level);
    let mut nblock = 0u32;
    let mut group = 0usize;
    let mut left = 0u32;
    let mut table = &tables[0];
    // A run of RUNA/RUNB symbols: its length so far and the weight of the next one.
    let mut run: Option<(u32, u32)> = None;
    loop {
        if left == 0 {
            let sel = *selectors
                .get(group)
                .ok_or_else(|| corrupt("more groups than selectors", at))?;
            table = tables
                .get(usize::from(sel))
                .ok_or_else(|| corrupt("bad selector", at))?;
            group += 1;
            left = GROUP_SIZE;
        }
        left -= 1;
        let sym = table.decode(bits)?;
        if sym <= 1 {
            let (es, n) = run.unwrap_or((0, 1));
            let es = es.saturating_add((u32::from(sym) + 1).saturating_mul(n));
            let n = n.saturating_mul(2);
            if n >= 2 * 1024 * 1024 {
                return Err(corrupt("run too long", at));
            }
            run = Some((es, n));
            continue;
        }
        if let Some((es, _)) = run.take() {
            nblock = nblock.saturating_add(es);
            if nblock > max {
                return Err(corrupt("block longer than its level allows", at));
            }
        }
        if sym == eob {
            break;
        }
        if nblock >= max {
            return Err(corrupt("block longer than its level allows", at));
        }
        nblock += 1;
    }
    if orig_ptr >= nblock {
        return Err(corrupt("origin pointer out of range", at));
    }
    Ok(())
}

/// Finds the blocks of a bzip2 file read sequentially from its start.
pub struct Scanner<R> {
    bits: Bits<R>,
    /// Level and combined CRC so far of the stream being read, if inside one.
    stream: Option<(u8, u32)>,
    streams: u64,
    /// Byte offset where trailing garbage starts, once seen.
    garbage: Option<u64>,
    done: bool,
}

impl<R: Read> Scanner<R> {
    /// A scanner over `inner`, which starts at byte 0 of the file.
    pub fn new(inner: R) -> Self {
        Scanner {
            bits: Bits::new(inner),
            stream: None,
            streams: 0,
            garbage: None,
            done: false,
        }
    }

    /// Streams seen so far.
    pub fn streams(&self) -> u64 {
        self.streams
    }

    /// Byte offset of ignored trailing garbage, if any.
    pub fn trailing_garbage(&self) -> Option<u64> {
        self.garbage
    }

    /// The next block (its `uncompressed_len` 0), or `None` after the last stream.
    pub fn next_block(&mut self) -> io::Result<Option<Bz2Block>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some((level, combined)) = self.stream else {
                self.start_stream()?;
                continue;
            };
            let start = self.bits.bit_pos;
            let magic = self.bits.get48()?;
            let crc = self.bits.get(32)?;
            if magic == EOS_MAGIC {
                if crc != combined {
                    return Err(bad(format!(
                        "corrupt bzip2 stream: the combined CRC at bit {start} does not match its blocks"
                    )));
                }
                self.bits.align()?;
                self.stream = None;
                continue;
            }
            if magic != BLOCK_MAGIC {
                return Err(bad(format!(
                    "corrupt bzip2 stream: no block or end-of-stream marker at bit {start}"
                )));
            }
            skip_block_body(&mut self.bits, level)?;
            let bit_len = u32::try_from(self.bits.bit_pos - start)
                .ok()
                .filter(|&l| l <= MAX_BLOCK_BITS)
                .ok_or_else(|| bad(format!("bzip2 block at bit {start} is too long")))?;
            self.stream = Some((level, combined.rotate_left(1) ^ crc));
            return Ok(Some(Bz2Block {
                bit_offset: start,
                bit_len,
                uncompressed_len: 0,
                crc,
                level,
                span_start: false,
            }));
        }
    }

    /// Reads a stream header at a byte boundary, or notes the end of the file (or the
    /// trailing garbage after the last stream).
    fn start_stream(&mut self) -> io::Result<()> {
        let at = self.bits.bit_pos / 8;
        let avail = self.bits.available()?;
        let head = self.bits.peek(32)?;
        let level = (head & 0xff) as u8;
        let is_stream = avail >= 32 && head >> 8 == 0x42_5a_68 && (b'1'..=b'9').contains(&level);
        if !is_stream {
            if self.streams == 0 {
                return Err(bad(if avail == 0 {
                    "empty file, not bzip2".to_string()
                } else if avail < 32 {
                    "truncated bzip2 stream header".to_string()
                } else {
                    "not a bzip2 stream".to_string()
                }));
            }
            if avail > 0 {
                self.garbage = Some(at);
            }
            self.done = true;
            return Ok(());
        }
        self.bits.skip(32)?;
        self.streams += 1;
        self.stream = Some((level - b'0', 0));
        Ok(())
    }
}

// ------------------------------------------------------------------ the table

/// Marks span starts: a new span begins at the block after the current span reached
/// `span_bytes` (0 is treated as 1: a span per block).
fn is_span_start(first: bool, since: u64, span_bytes: u64) -> bool {
    first || since >= span_bytes.max(1)
}

/// The blocks of one bzip2 file, grouped into spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bz2SeekTable {
    /// Every block in file order.
    pub blocks: Vec<Bz2Block>,
    /// Total size of the decompressed stream.
    pub uncompressed_size: u64,
    /// Streams in the file.
    pub stream_count: u64,
    /// Derived: (uncompressed offset, first block) of each span.
    spans: Vec<(u64, usize)>,
}

impl Bz2SeekTable {
    /// A table over `blocks`, checked as untrusted: levels 1-9, bit ranges in order and
    /// not overlapping, sizes possible for their level, a span at block 0.
    pub fn new(blocks: Vec<Bz2Block>, stream_count: u64) -> Result<Bz2SeekTable, String> {
        let mut spans = Vec::new();
        let mut total = 0u64;
        let mut prev_end = 32u64;
        for (i, b) in blocks.iter().enumerate() {
            if !(1..=9).contains(&b.level) {
                return Err(format!("bzip2 block {i} has level {}", b.level));
            }
            if !(MIN_BLOCK_BITS..=MAX_BLOCK_BITS).contains(&b.bit_len)
                || b.uncompressed_len == 0
                || u64::from(b.uncompressed_len) > max_block_out(b.level)
            {
                return Err(format!("bzip2 block {i} has an impossible size"));
            }
            if b.bit_offset < prev_end {
                return Err(format!("bzip2 block {i} overlaps the one before it"));
            }
            prev_end = b
                .end_bit()
                .ok_or_else(|| format!("bzip2 block {i} overflows"))?;
            if i == 0 && !b.span_start {
                return Err("bzip2 seek table does not start a span at block 0".into());
            }
            if b.span_start {
                spans.push((total, i));
            }
            total = total
                .checked_add(u64::from(b.uncompressed_len))
                .ok_or("bzip2 stream size overflows")?;
        }
        if !blocks.is_empty() && stream_count == 0 {
            return Err("bzip2 seek table has blocks but no stream".into());
        }
        Ok(Bz2SeekTable {
            blocks,
            uncompressed_size: total,
            stream_count,
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

    fn span_blocks(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let first = self.spans.get(i)?.1;
        let end = self.spans.get(i + 1).map_or(self.blocks.len(), |&(_, b)| b);
        Some(first..end)
    }

    /// Appends the little-endian encoding: magic `SNBZ2v1\0`, `uncompressed_size u64`,
    /// `stream_count u64`, `count u64`, then per block `bit_offset u64`, `bit_len u32`,
    /// `uncompressed_len u32`, `crc u32`, `level u8`, `flags u8` (bit 0: a span starts
    /// here).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(TABLE_HEADER_LEN + self.blocks.len() * BLOCK_LEN);
        out.extend_from_slice(&TABLE_MAGIC);
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&self.stream_count.to_le_bytes());
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for b in &self.blocks {
            out.extend_from_slice(&b.bit_offset.to_le_bytes());
            out.extend_from_slice(&b.bit_len.to_le_bytes());
            out.extend_from_slice(&b.uncompressed_len.to_le_bytes());
            out.extend_from_slice(&b.crc.to_le_bytes());
            out.push(b.level);
            out.push(if b.span_start { FLAG_SPAN_START } else { 0 });
        }
    }

    /// Parses exactly one table written by [`encode`](Self::encode); the bytes are
    /// untrusted (never panics, allocates in proportion to their length, checks what
    /// [`new`](Self::new) checks and the stored size).
    pub fn decode(bytes: &[u8]) -> Result<Bz2SeekTable, String> {
        if bytes.len() < TABLE_HEADER_LEN || bytes[..8] != TABLE_MAGIC {
            return Err("bzip2 seek table is truncated or has a bad magic number".into());
        }
        let u64_at = |b: &[u8], at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let size = u64_at(bytes, 8);
        let streams = u64_at(bytes, 16);
        let count = u64_at(bytes, 24);
        let body = &bytes[TABLE_HEADER_LEN..];
        if body.len() % BLOCK_LEN != 0 || (body.len() / BLOCK_LEN) as u64 != count {
            return Err(format!(
                "bzip2 seek table claims {count} blocks but has {} bytes of them",
                body.len()
            ));
        }
        let mut blocks = Vec::with_capacity(body.len() / BLOCK_LEN);
        for r in body.chunks_exact(BLOCK_LEN) {
            let flags = r[21];
            if flags & !FLAG_SPAN_START != 0 {
                return Err("bzip2 seek table has unknown block flags".into());
            }
            blocks.push(Bz2Block {
                bit_offset: u64_at(r, 0),
                bit_len: u32_at(r, 8),
                uncompressed_len: u32_at(r, 12),
                crc: u32_at(r, 16),
                level: r[20],
                span_start: flags & FLAG_SPAN_START != 0,
            });
        }
        let table = Bz2SeekTable::new(blocks, streams)?;
        if table.uncompressed_size != size {
            return Err("bzip2 seek table size differs from the sum of its blocks".into());
        }
        Ok(table)
    }
}

// ------------------------------------------------------------------ decoding

/// Appends `n` (≤ 57) low bits of `v` at bit position `*nbits` of `out`.
fn put_bits(out: &mut Vec<u8>, nbits: &mut u64, v: u64, n: u32) {
    for k in (0..n).rev() {
        let bit = (v >> k) & 1;
        let byte = (*nbits / 8) as usize;
        if byte == out.len() {
            out.push(0);
        }
        if bit == 1 {
            out[byte] |= 0x80 >> (*nbits % 8);
        }
        *nbits += 1;
    }
}

/// The one-block stream around block `b`, its bits read from `src`.
fn synthesize(src: &dyn Source, b: &Bz2Block) -> io::Result<Vec<u8>> {
    if !(MIN_BLOCK_BITS..=MAX_BLOCK_BITS).contains(&b.bit_len) || !(1..=9).contains(&b.level) {
        return Err(bad("bzip2 block entry is impossible"));
    }
    let end = b
        .end_bit()
        .ok_or_else(|| bad("bzip2 block offset overflows"))?;
    let first = b.bit_offset / 8;
    let shift = (b.bit_offset % 8) as u32;
    let raw_len = usize::try_from(end.div_ceil(8) - first)
        .map_err(|_| bad("bzip2 block entry is impossible"))?;
    let mut raw = vec![0u8; raw_len];
    src.read_exact_at(&mut raw, first).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            bad(format!(
                "truncated bzip2 file: the block at byte {first} is cut short"
            ))
        } else {
            e
        }
    })?;
    let len_bytes = (b.bit_len as usize).div_ceil(8);
    let mut out = Vec::with_capacity(4 + len_bytes + 11);
    out.extend_from_slice(b"BZh");
    out.push(b'0' + b.level);
    for i in 0..len_bytes {
        let hi = raw.get(i).copied().unwrap_or(0);
        let lo = raw.get(i + 1).copied().unwrap_or(0);
        out.push(if shift == 0 {
            hi
        } else {
            (hi << shift) | (lo >> (8 - shift))
        });
    }
    let rem = b.bit_len % 8;
    if rem != 0 {
        if let Some(last) = out.last_mut() {
            *last &= 0xffu8 << (8 - rem);
        }
    }
    let head = out.get(4..14).unwrap_or_default();
    let magic = head
        .iter()
        .take(6)
        .fold(0u64, |a, &x| a << 8 | u64::from(x));
    let crc = head
        .iter()
        .skip(6)
        .fold(0u32, |a, &x| a << 8 | u32::from(x));
    if magic != BLOCK_MAGIC || crc != b.crc {
        return Err(bad(format!(
            "no bzip2 block with the indexed CRC at bit {}; the index does not match the file",
            b.bit_offset
        )));
    }
    let mut nbits = 32 + u64::from(b.bit_len);
    put_bits(&mut out, &mut nbits, EOS_MAGIC, 48);
    put_bits(&mut out, &mut nbits, u64::from(b.crc), 32);
    Ok(out)
}

/// Appends block `b` decoded to `out`. With `expect`, exactly that many bytes must
/// come out; `out` is left as it was on error.
pub fn decode_block_into(
    src: &dyn Source,
    b: &Bz2Block,
    expect: Option<u32>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let start = out.len();
    let r = decode_block_raw(src, b, expect, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn decode_block_raw(
    src: &dyn Source,
    b: &Bz2Block,
    expect: Option<u32>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let corrupt = |what: String| {
        bad(format!(
            "corrupt bzip2 block at bit {}: {what}",
            b.bit_offset
        ))
    };
    let stream = synthesize(src, b)?;
    let start = out.len();
    let cap = max_block_out(b.level) as usize;
    let first = expect.map_or(1 << 20, |e| e as usize + 1).min(cap + 1);
    out.try_reserve_exact(first)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate a bzip2 block"))?;
    let mut d = Decompress::new(false);
    let mut input = &stream[..];
    loop {
        if out.len() == out.capacity() {
            if out.len() - start > cap {
                return Err(corrupt("decodes to more than a block can hold".into()));
            }
            out.try_reserve(out.capacity().max(1 << 20)).map_err(|_| {
                io::Error::new(io::ErrorKind::OutOfMemory, "cannot grow a bzip2 block")
            })?;
        }
        let (in0, out0) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(input, out)
            .map_err(|e| corrupt(format!("{e} (its data or CRC does not match)")))?;
        let used = (d.total_in() - in0) as usize;
        input = input.get(used..).unwrap_or_default();
        if status == Status::StreamEnd {
            break;
        }
        if used == 0 && d.total_out() == out0 && out.len() < out.capacity() {
            return Err(corrupt(
                "it ends early; the index does not match the file".into(),
            ));
        }
    }
    if !input.is_empty() {
        return Err(corrupt("it ends before its indexed end".into()));
    }
    let got = out.len() - start;
    match expect {
        Some(e) if got != e as usize => Err(corrupt(format!(
            "decoded to {got} bytes, indexed {e}; the index does not match the file"
        ))),
        _ if got == 0 || got > cap => Err(corrupt(format!("decoded to {got} bytes"))),
        _ => Ok(()),
    }
}

/// Decodes span `i` into `out` (cleared first), or only its first blocks up to at
/// least `limit` bytes. Every block decoded is checked whole.
pub fn decode_span_prefix(
    src: &dyn Source,
    table: &Bz2SeekTable,
    i: usize,
    limit: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    let blocks = table.span_blocks(i).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bzip2 span {i} out of range ({} spans)", table.span_count()),
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
            .ok_or_else(|| bad("bzip2 span lists a missing block"))?;
        need.push(*b);
        have = have.saturating_add(u64::from(b.uncompressed_len));
    }
    // One block after the other: a span is decoded on one of the threads that share
    // the decoding (the reader's, or a prefetch thread), so that no more decoders run
    // (each holding its block's working memory) than there are such threads.
    let r = need
        .iter()
        .try_for_each(|b| decode_block_into(src, b, Some(b.uncompressed_len), out));
    if let Err(e) = r {
        out.clear();
        return Err(e);
    }
    Ok(())
}

/// Decodes span `i` whole into `out`.
pub fn decode_span(
    src: &dyn Source,
    table: &Bz2SeekTable,
    i: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    decode_span_prefix(src, table, i, u64::MAX, out)
}

/// Streams every block out to `dest` (for a cache file); returns the bytes written.
pub fn decompress_all(
    src: &dyn Source,
    table: &Bz2SeekTable,
    dest: &mut dyn io::Write,
) -> io::Result<u64> {
    let mut buf = Vec::new();
    let mut total = 0u64;
    for b in &table.blocks {
        buf.clear();
        decode_block_into(src, b, Some(b.uncompressed_len), &mut buf)?;
        dest.write_all(&buf)?;
        total += buf.len() as u64;
    }
    Ok(total)
}

// ------------------------------------------------------------------ indexing

/// The indexing pass over a bzip2 file: its [`Read`] yields the decompressed stream,
/// every block decoded on its own on the rayon pool, a few ahead of the reader; then
/// [`finish`](Self::finish) returns the seek table.
pub struct Bz2Indexer<R> {
    scanner: Scanner<R>,
    /// The scan failed here; reported once the blocks before it were handed out.
    scan_error: Option<io::Error>,
    scanned: bool,
    ahead: Ahead<Bz2Block>,
    blocks: Vec<Bz2Block>,
    span_bytes: u64,
    /// Bytes in the current span so far.
    since: u64,
    progress: Progress,
    cur: Vec<u8>,
    cur_pos: usize,
}

impl<R: Read> Bz2Indexer<R> {
    /// Indexes the file that `input` reads from its start; blocks are decoded from
    /// `src` (the same file). `progress` gets the byte offset of the blocks handed out.
    pub fn new(input: R, src: Arc<dyn Source>, span_bytes: u64, progress: Progress) -> Self {
        let decode: Decode<Bz2Block> = Arc::new(move |b| {
            let mut out = Vec::new();
            decode_block_into(&*src, b, None, &mut out)?;
            Ok(out)
        });
        Bz2Indexer {
            scanner: Scanner::new(input),
            scan_error: None,
            scanned: false,
            ahead: Ahead::new(decode, AHEAD_JOBS, u64::MAX),
            blocks: Vec::new(),
            span_bytes,
            since: 0,
            progress,
            cur: Vec::new(),
            cur_pos: 0,
        }
    }

    /// Byte offset of trailing garbage that was ignored, if any.
    pub fn trailing_garbage(&self) -> Option<u64> {
        self.scanner.trailing_garbage()
    }

    /// Reads what is left, then returns the seek table.
    pub fn finish(mut self) -> io::Result<Bz2SeekTable> {
        io::copy(&mut self, &mut io::sink())?;
        Bz2SeekTable::new(self.blocks, self.scanner.streams()).map_err(bad)
    }

    fn top_up(&mut self) {
        while !self.scanned && self.scan_error.is_none() && self.ahead.has_room(1) {
            match self.scanner.next_block() {
                Ok(Some(b)) => self.ahead.push(b, 1),
                Ok(None) => self.scanned = true,
                Err(e) => self.scan_error = Some(e),
            }
        }
    }
}

impl<R: Read> Read for Bz2Indexer<R> {
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
            self.top_up();
            let Some((mut b, r)) = self.ahead.pop() else {
                return match self.scan_error.take() {
                    Some(e) => Err(e),
                    None => Ok(0),
                };
            };
            self.cur = r?;
            self.cur_pos = 0;
            b.uncompressed_len = u32::try_from(self.cur.len())
                .map_err(|_| bad("bzip2 block decodes to too many bytes"))?;
            b.span_start = is_span_start(self.blocks.is_empty(), self.since, self.span_bytes);
            if b.span_start {
                self.since = 0;
            }
            self.since += u64::from(b.uncompressed_len);
            if let Some(end) = b.end_bit() {
                self.progress.store(end / 8, Ordering::Relaxed);
            }
            self.blocks.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;

    const MIB: usize = 1 << 20;

    /// ~3 MiB of semi-compressible text, with long runs (the run-length stage).
    fn data() -> &'static [u8] {
        static DATA: OnceLock<Vec<u8>> = OnceLock::new();
        DATA.get_or_init(|| {
            let mut x = 0xb2u64;
            let mut next = || {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                x >> 33
            };
            let mut out = Vec::new();
            while out.len() < 3 * MIB + 777 {
                let r = next();
                match r % 17 {
                    0 => out.extend(std::iter::repeat_n(b'z', (next() % 40) as usize)),
                    1 => out.extend_from_slice(format!("{} ", next()).as_bytes()),
                    // Every byte value: symbols past 255 in the Huffman tables.
                    2 => out.extend((0..8).map(|_| next() as u8)),
                    _ => {
                        let len = 2 + next() % 7;
                        out.extend((0..len).map(|_| b'!' + (next() % 90) as u8));
                        out.push(b' ');
                    }
                }
            }
            out.truncate(3 * MIB + 777);
            out
        })
    }

    fn tool(name: &str, args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
        let path = format!("/usr/bin/{name}");
        if !Path::new(&path).exists() {
            println!("{path} not found; skipping");
            return None;
        }
        let mut child = Command::new(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(out.status.success(), "{name} failed");
        Some(out.stdout)
    }

    fn compress(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = ::bzip2::write::BzEncoder::new(Vec::new(), ::bzip2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn temp_with(bytes: &[u8]) -> Arc<dyn Source> {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        Arc::new(f)
    }

    fn index(bytes: &[u8], span: u64) -> io::Result<(Vec<u8>, Bz2SeekTable, Option<u64>)> {
        let src = temp_with(bytes);
        let mut ix = Bz2Indexer::new(bytes, src, span, Progress::default());
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
        let garbage = ix.trailing_garbage();
        Ok((got, ix.finish()?, garbage))
    }

    fn check_file(compressed: &[u8], data: &[u8], span: u64) -> Bz2SeekTable {
        let (got, table, garbage) = index(compressed, span).unwrap();
        assert_eq!(garbage, None);
        assert!(got == data, "indexer output differs");
        assert_eq!(table.uncompressed_size, data.len() as u64);
        let mut enc = Vec::new();
        table.encode(&mut enc);
        assert_eq!(Bz2SeekTable::decode(&enc).unwrap(), table);
        let src = temp_with(compressed);
        let mut out = Vec::new();
        for i in 0..table.span_count() {
            let (s, e) = table.span_range(i);
            decode_span(&*src, &table, i, &mut out).unwrap();
            assert!(out == data[s as usize..e as usize], "span {i} differs");
            assert_eq!(table.span_of(s), Some(i));
            decode_span_prefix(&*src, &table, i, 1, &mut out).unwrap();
            assert!(!out.is_empty() && data[s as usize..].starts_with(&out));
        }
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
    fn levels_one_and_nine_and_unaligned_blocks() {
        let data = data();
        let t1 = check_file(&compress(data, 1), data, 1);
        assert!(t1.blocks.len() > 20, "{} blocks", t1.blocks.len());
        assert_eq!(t1.span_count(), t1.blocks.len());
        assert!(t1.blocks.iter().any(|b| b.bit_offset % 8 != 0));
        let t9 = check_file(&compress(data, 9), data, 1 << 20);
        assert!(t9.blocks.len() >= 3);
        assert!(t9.span_count() < t9.blocks.len());
        assert!(t9.blocks.iter().all(|b| b.level == 9));
    }

    #[test]
    fn tools_and_concatenated_streams() {
        let data = data();
        let Some(bz) = tool("bzip2", &["-9", "-c"], data) else {
            return;
        };
        check_file(&bz, data, 1);
        if let Some(p) = tool("pbzip2", &["-1", "-p2", "-c"], data) {
            let t = check_file(&p, data, 1);
            assert!(
                t.stream_count > 1,
                "pbzip2 wrote {} streams",
                t.stream_count
            );
        }
        if let Some(l) = tool("lbzip2", &["-1", "-n2", "-c"], data) {
            check_file(&l, data, 1);
        }
        let empty = compress(b"", 9);
        let cat = [
            compress(&data[..1000], 3),
            empty.clone(),
            compress(&data[1000..], 2),
        ]
        .concat();
        let t = check_file(&cat, data, 1);
        assert_eq!(t.stream_count, 3);
        let t = check_file(&empty, b"", 1);
        assert_eq!((t.span_count(), t.blocks.len(), t.stream_count), (0, 0, 1));
    }

    #[test]
    fn trailing_garbage_is_ignored_like_bzip2_does() {
        let data = &data()[..200_000];
        let bz = compress(data, 9);
        for tail in [&b"garbage"[..], &[0u8; 1000], b"B", b"BZ", b"BZh"] {
            let (got, table, garbage) = index(&[bz.as_slice(), tail].concat(), 1).unwrap();
            assert!(got == data);
            assert_eq!(garbage, Some(bz.len() as u64));
            assert_eq!(table.stream_count, 1);
        }
        // What starts like a stream is one: a bad one is an error.
        for tail in [&b"BZh9garbage"[..], b"BZh9"] {
            assert!(index(&[bz.as_slice(), tail].concat(), 1).is_err());
        }
    }

    #[test]
    fn damaged_files_are_refused_or_fail_only_where_damaged() {
        let data = data();
        let bz = compress(data, 1);
        let (_, table, _) = index(&bz, 1).unwrap();
        for cut in [0, 3, 4, 10, bz.len() / 2, bz.len() - 1] {
            let e = index(&bz[..cut], 1).unwrap_err().to_string();
            assert!(
                e.contains("truncated") || e.contains("empty") || cut < 4,
                "{cut}: {e}"
            );
        }
        assert!(index(b"BZh9 not a block at all", 1).is_err());
        assert!(index(b"plain text", 1).is_err());
        // Flips anywhere: an error or the exact bytes, never a panic or other bytes.
        let mut x = 7u64;
        for _ in 0..60 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut bad = bz.clone();
            let at = (x >> 20) as usize % bad.len();
            bad[at] ^= 1 << ((x >> 60) % 8);
            if let Ok((got, _, _)) = index(&bad, 1) {
                assert!(got == data, "a flip at {at} gave other bytes");
            }
        }
        // A block damaged after indexing: only its span fails.
        let victim = table.blocks[5];
        let mut bad = bz.clone();
        let mid = ((victim.bit_offset + u64::from(victim.bit_len) / 2) / 8) as usize;
        bad[mid] ^= 0x21;
        let src = temp_with(&bad);
        let mut out = Vec::new();
        for i in 0..table.span_count() {
            let r = decode_span(&*src, &table, i, &mut out);
            if i == 5 {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("corrupt bzip2 block"), "{e}");
                assert!(out.is_empty());
            } else {
                r.unwrap();
                let (s, e) = table.span_range(i);
                assert!(out == data[s as usize..e as usize]);
            }
        }
        // Truncated after indexing.
        let src = temp_with(&bz[..(victim.bit_offset / 8) as usize + 10]);
        let e = decode_span(&*src, &table, 5, &mut out).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        decode_span(&*src, &table, 4, &mut out).unwrap();
        // A table that does not match the file.
        let other = temp_with(&compress(&data[1..], 1));
        for i in 0..table.span_count() {
            assert!(decode_span(&*other, &table, i, &mut out).is_err());
        }
        let mut t = table.blocks.clone();
        t[2].uncompressed_len += 1;
        let t = Bz2SeekTable::new(t, 1).unwrap();
        assert!(decode_span(&*temp_with(&bz), &t, 2, &mut out).is_err());
    }

    #[test]
    fn table_decode_rejects_bad_bytes() {
        let data = &data()[..MIB];
        let (_, table, _) = index(&compress(data, 1), 300_000).unwrap();
        let mut enc = Vec::new();
        table.encode(&mut enc);
        for len in 0..enc.len() {
            assert!(Bz2SeekTable::decode(&enc[..len]).is_err(), "cut to {len}");
        }
        assert!(Bz2SeekTable::decode(&[enc.as_slice(), &[0]].concat()).is_err());
        for pos in 0..enc.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = enc.clone();
                bad[pos] ^= mask;
                if let Ok(t) = Bz2SeekTable::decode(&bad) {
                    for i in 0..t.span_count() {
                        let (s, e) = t.span_range(i);
                        assert!(s < e);
                    }
                }
            }
        }
        let mut hostile = enc[..TABLE_HEADER_LEN].to_vec();
        hostile[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Bz2SeekTable::decode(&hostile).is_err());
        for f in [
            |b: &mut Bz2Block| b.level = 0,
            |b: &mut Bz2Block| b.level = 10,
            |b: &mut Bz2Block| b.uncompressed_len = 0,
            |b: &mut Bz2Block| b.uncompressed_len = u32::MAX,
            |b: &mut Bz2Block| b.bit_len = 3,
            |b: &mut Bz2Block| b.bit_offset = 0,
        ] {
            let mut t = table.blocks.clone();
            f(&mut t[1]);
            assert!(Bz2SeekTable::new(t, 1).is_err());
        }
    }

    #[test]
    fn huffman_scan_speed_note() {
        // Not a threshold: prints the scan rate for the record.
        let bz = match std::env::var_os("SNAPFS_BZ2_SCAN") {
            Some(p) => std::fs::read(p).unwrap(),
            None => compress(data(), 9),
        };
        let t = std::time::Instant::now();
        let mut s = Scanner::new(&bz[..]);
        let mut n = 0;
        while s.next_block().unwrap().is_some() {
            n += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "scanned {n} blocks, {} compressed bytes in {secs:.3}s ({:.0} MB/s)",
            bz.len(),
            bz.len() as f64 / secs / 1e6
        );
    }
}
