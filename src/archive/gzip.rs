//! Random access into gzip streams (zran-style seek tables).
//!
//! This module owns everything gzip-specific in snapfs:
//!
//! * [`GzipIndexer`] wraps the compressed byte stream of a `.tar.gz` during the
//!   one sequential indexing pass. Its [`Read`] implementation yields the
//!   uncompressed bytes (so the tar walker can run on top of it) while it
//!   records a [`GzipCheckpoint`] at a deflate block boundary roughly every
//!   `span_bytes` of output, and verifies the CRC-32/ISIZE trailer of every
//!   gzip member (multi-member files such as `cat a.gz b.gz` are supported;
//!   trailing zero padding is tolerated, any other trailing data is an error).
//! * [`GzipSeekTable`] is the resulting list of seek points plus the total
//!   uncompressed size, with a compact binary encoding ([`GzipSeekTable::encode`]
//!   / [`GzipSeekTable::decode`]; decoding treats its input as untrusted).
//! * [`decode_span`] decompresses one span (the bytes between two consecutive
//!   checkpoints) from the `.gz` file using positional reads, so many threads
//!   may decode different spans of the same open file concurrently.
//!
//! The technique is the one of zlib's `examples/zran.c`: inflate with
//! `Z_BLOCK` so that inflate stops at every deflate block boundary; at such a
//! boundary the decoder state is fully described by the bit position in the
//! compressed stream plus the last 32 KiB of output (the window), which is what
//! a checkpoint stores. Resuming means starting a raw inflate at that bit
//! position (`inflatePrime` for the partial byte) with the window installed as
//! the preset dictionary. Checkpoints at the start of a gzip member need no
//! window; decoding restarts there in gzip mode.
//!
//! All zlib calls go through the pure-Rust `libz-rs-sys` C API, wrapped in the
//! private `Inflater` type which keeps the `z_stream` boxed (zlib requires a
//! stable address after `inflateInit2_`) and always calls `inflateEnd`.

use std::ffi::{c_int, c_uint, CStr};
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::sync::mpsc;

use crate::source::Source;

use libz_rs_sys as z;

#[cfg(snapfs_isal)]
pub mod isal;
mod window;
pub use window::{SharedBytes, SharedStore, Window};
use window::{WindowProbe, PROBE_LEN};

/// Size of the deflate window (the maximum back-reference distance).
const WINDOW_SIZE: usize = 32 * 1024;
/// Size of the compressed input chunks read from the underlying reader / file.
const IN_CHUNK: usize = 256 * 1024;
/// Size of the internal output buffer used to serve small `read` calls.
const OUT_CHUNK: usize = 256 * 1024;
/// `read` calls with at least this much room inflate directly into the
/// caller's buffer instead of going through the internal output buffer.
const DIRECT_THRESHOLD: usize = 32 * 1024;
/// Largest first positional read in [`decode_span`].
const MAX_SPAN_READ: usize = 8 * 1024 * 1024;
/// Output is reserved in steps of at most this many bytes in [`decode_span`]
/// (a hostile table may claim a huge span; memory grows only with real output).
const OUT_RESERVE_STEP: usize = 16 * 1024 * 1024;
/// `windowBits` for gzip-wrapped inflate (15-bit window, gzip header/trailer).
const WBITS_GZIP: c_int = 31;
/// `windowBits` for raw inflate (15-bit window, no header/trailer).
const WBITS_RAW: c_int = -15;
/// Magic bytes at the start of an encoded [`GzipSeekTable`].
const TABLE_MAGIC: &[u8; 4] = b"GZST";
/// Version of the encoding written by [`GzipSeekTable::encode`]. Version 2 added the
/// CRC-32 of every [`CRC_BLOCK`] of every span (version 1 tables are refused: the
/// index is then rebuilt); version 3 moved the windows behind all fixed-size records
/// and CRCs, so an open reads no window (version 2 tables are still read).
const TABLE_VERSION: u8 = 3;
/// Smallest possible version 2 checkpoint: u64 + u64 + u8 + u8 + u32 + u32 + u32.
const MIN_ENCODED_CHECKPOINT_V2: usize = 8 + 8 + 1 + 1 + 4 + 4 + 4;
/// A version 3 checkpoint record (its CRCs and window come later).
const CHECKPOINT_BYTES: usize = 8 + 8 + 1 + 1 + 2 + 4 + 4 + 4;
/// Uncompressed bytes per CRC-32 in a seek table: each span is cut into blocks of this
/// size from its start (the last one may be shorter). gzip's own CRC covers a whole
/// member, so without these a damaged block in the middle of a member (in an archive
/// whose index still matches) could inflate to wrong bytes without any error.
pub const CRC_BLOCK: usize = 64 * 1024;
/// Flag bit in the encoded checkpoint flags byte: checkpoint is a member start.
const FLAG_MEMBER_START: u8 = 1;
/// A few consecutive inflate calls that neither consume nor produce anything
/// are normal at block boundaries; more than this means the stream is stuck.
const MAX_STALLS: u32 = 4;

/// One seek point.
///
/// A checkpoint describes where decompression can restart: at uncompressed
/// offset `uncompressed`, the next compressed input byte is at file offset
/// `compressed`, preceded by `bits` (0..8) not yet consumed high bits of the
/// byte at `compressed - 1`, and the back-reference history is `window` (the
/// last up to 32 KiB of output of the current gzip member, with the bytes the span
/// never reads zeroed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GzipCheckpoint {
    /// Uncompressed offset (from the start of the whole file's output).
    pub uncompressed: u64,
    /// Compressed file offset of the next input byte.
    pub compressed: u64,
    /// Number of unconsumed bits (0..8) in the byte at `compressed - 1`.
    pub bits: u8,
    /// The checkpoint is at the start of a gzip member (`compressed` points at
    /// its header); it has no window and no bits, and decoding restarts in
    /// gzip mode.
    pub member_start: bool,
    /// Last up to 32 KiB of uncompressed output of the current member
    /// (empty for member starts), deflated; see [`Window`].
    pub window: Window,
    /// CRC-32 of each [`CRC_BLOCK`] of this checkpoint's span, checked by
    /// [`decode_span_prefix`]. Empty while the span is not closed yet.
    pub crcs: Vec<u32>,
}

/// The CRC-32 of each [`CRC_BLOCK`] of `span` (the uncompressed bytes of one span).
pub fn span_crcs(span: &[u8]) -> Vec<u32> {
    span.chunks(CRC_BLOCK).map(crc32fast::hash).collect()
}

/// Block CRCs of the span being produced by the indexer.
#[derive(Default)]
struct BlockCrcs {
    hasher: crc32fast::Hasher,
    in_block: usize,
    done: Vec<u32>,
}

impl BlockCrcs {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = (CRC_BLOCK - self.in_block).min(data.len());
            let (now, rest) = data.split_at(n);
            self.hasher.update(now);
            self.in_block += n;
            data = rest;
            if self.in_block == CRC_BLOCK {
                self.done.push(std::mem::take(&mut self.hasher).finalize());
                self.in_block = 0;
            }
        }
    }

    /// Ends the span: its block CRCs (the last block may be partial).
    fn close(&mut self) -> Vec<u32> {
        if self.in_block > 0 {
            self.done.push(std::mem::take(&mut self.hasher).finalize());
            self.in_block = 0;
        }
        std::mem::take(&mut self.done)
    }
}

/// Checks `data`, the first bytes of span `i`, against the table's block CRCs: every
/// whole block, and a last partial one if `data` is the whole span.
fn verify_blocks(table: &GzipSeekTable, i: usize, data: &[u8]) -> io::Result<()> {
    let (start, end) = table.span_range(i);
    let whole = data.len() as u64 == end - start;
    let crcs = table.checkpoints.get(i).map_or(&[][..], |c| &c.crcs[..]);
    for (k, block) in data.chunks(CRC_BLOCK).enumerate() {
        if block.len() < CRC_BLOCK && !whole {
            break;
        }
        if crcs.get(k) != Some(&crc32fast::hash(block)) {
            let at = start.saturating_add((k * CRC_BLOCK) as u64);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "corrupt gzip data: CRC-32 mismatch in span {i} at uncompressed offset {at}"
                ),
            ));
        }
    }
    Ok(())
}

/// All seek points of one gzip file plus its total uncompressed size.
///
/// Span `i` is the uncompressed range from checkpoint `i` to checkpoint
/// `i + 1` (or to the end of the data for the last one). A table produced by
/// [`GzipIndexer::finish`] or accepted by [`GzipSeekTable::decode`] always has
/// at least one checkpoint, the first at uncompressed offset 0 and at a member
/// start, with strictly increasing uncompressed offsets below
/// `uncompressed_size` (an empty gzip file has one empty span).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GzipSeekTable {
    /// The seek points, in increasing offset order.
    pub checkpoints: Vec<GzipCheckpoint>,
    /// Total uncompressed size of all members.
    pub uncompressed_size: u64,
}

impl GzipSeekTable {
    /// Number of spans (equal to the number of checkpoints).
    pub fn span_count(&self) -> usize {
        self.checkpoints.len()
    }

    /// [start, end) uncompressed range of span i.
    ///
    /// An out-of-range `i` yields the empty range at the end of the data.
    pub fn span_range(&self, i: usize) -> (u64, u64) {
        super::spans::range(
            &self.checkpoints,
            |c| c.uncompressed,
            self.uncompressed_size,
            i,
        )
    }

    /// Index of the span holding uncompressed offset `off` (binary search); None if off >= size.
    pub fn span_of(&self, off: u64) -> Option<usize> {
        super::spans::of(
            &self.checkpoints,
            |c| c.uncompressed,
            self.uncompressed_size,
            off,
        )
    }

    /// Length of the longest span (0 for an empty table).
    pub fn max_span_len(&self) -> u64 {
        super::spans::max_len(
            &self.checkpoints,
            |c| c.uncompressed,
            self.uncompressed_size,
        )
    }

    /// Serialize (little-endian, windows deflate-compressed individually) appending to `out`.
    ///
    /// Layout (version 3): magic `GZST`, version byte, `uncompressed_size: u64`,
    /// `count: u64`; then `count` fixed records of [`CHECKPOINT_BYTES`]:
    /// `uncompressed: u64`, `compressed: u64`, `bits: u8`, `flags: u8` (bit 0 =
    /// member start), two zero bytes, `window_len: u32`, `deflated_len: u32`,
    /// `crc_count: u32`; then every checkpoint's CRC-32s, one per [`CRC_BLOCK`] of its
    /// span, in checkpoint order; then every window's `deflated_len` bytes of raw
    /// deflate data that inflate to it (nothing for an empty window), in checkpoint
    /// order. Everything before the windows is read at open; a window is read (from
    /// the mapped index) and inflated only when its span is decoded, and the span's
    /// CRCs check what it gives, so a damaged window fails that span.
    ///
    /// Version 2 had the same fields per checkpoint, each followed by its window and
    /// its CRCs (so opening read every window); it is still read.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(TABLE_MAGIC);
        out.push(TABLE_VERSION);
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&(self.checkpoints.len() as u64).to_le_bytes());
        // Windows are at most 32 KiB in any table this module produces.
        let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        for cp in &self.checkpoints {
            out.extend_from_slice(&cp.uncompressed.to_le_bytes());
            out.extend_from_slice(&cp.compressed.to_le_bytes());
            out.push(cp.bits);
            out.push(if cp.member_start {
                FLAG_MEMBER_START
            } else {
                0
            });
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&len32(cp.window.len()).to_le_bytes());
            out.extend_from_slice(&len32(cp.window.deflated().len()).to_le_bytes());
            out.extend_from_slice(&len32(cp.crcs.len()).to_le_bytes());
        }
        for c in self.checkpoints.iter().flat_map(|cp| &cp.crcs) {
            out.extend_from_slice(&c.to_le_bytes());
        }
        for cp in &self.checkpoints {
            out.extend_from_slice(cp.window.deflated());
        }
    }

    /// Parse what [`GzipSeekTable::encode`] wrote.
    ///
    /// The bytes are treated as untrusted (a corrupt or hostile index file):
    /// this never panics, never allocates more than the input length
    /// justifies (checkpoint counts are bounded by the remaining input,
    /// windows are capped at 32 KiB), and checks that offsets are monotonic,
    /// `bits < 8`, and the invariants documented on [`GzipSeekTable`] hold.
    /// `bytes` must be exactly what `encode` appended; trailing bytes are an
    /// error. The error string describes the problem.
    pub fn decode(bytes: &[u8]) -> Result<GzipSeekTable, String> {
        Self::decode_in(bytes, None)
    }

    /// How many first bytes of an encoded table [`GzipSeekTable::decode_in`] reads
    /// (all but the windows of a version 3 table); the whole length for anything it
    /// cannot parse that far (the decode then reports the problem).
    pub fn head_len(bytes: &[u8]) -> usize {
        let head = || -> Option<usize> {
            let fixed_at = TABLE_MAGIC.len() + 1 + 8 + 8;
            if bytes.len() < fixed_at || bytes[TABLE_MAGIC.len()] != TABLE_VERSION {
                return None;
            }
            let count = usize::try_from(le_u64(&bytes[fixed_at - 8..])).ok()?;
            let crcs_at = fixed_at.checked_add(count.checked_mul(CHECKPOINT_BYTES)?)?;
            let crcs = bytes
                .get(fixed_at..crcs_at)?
                .chunks_exact(CHECKPOINT_BYTES)
                .try_fold(0usize, |n, c| n.checked_add(le_u32(&c[28..32]) as usize))?;
            let end = crcs_at.checked_add(crcs.checked_mul(4)?)?;
            (end <= bytes.len()).then_some(end)
        };
        head().unwrap_or(bytes.len())
    }

    /// Like [`GzipSeekTable::decode`], for `bytes` that lie at offset `at` of `shared`
    /// (an index file's mapping): the windows point into `shared` instead of being
    /// copied.
    pub fn decode_in(
        bytes: &[u8],
        shared: Option<(&SharedBytes, usize)>,
    ) -> Result<GzipSeekTable, String> {
        let mut r = ByteReader { rest: bytes };
        if r.take(TABLE_MAGIC.len())? != TABLE_MAGIC {
            return Err("gzip seek table: bad magic".into());
        }
        let version = r.u8()?;
        let min_checkpoint = match version {
            2 => MIN_ENCODED_CHECKPOINT_V2,
            TABLE_VERSION => CHECKPOINT_BYTES,
            _ => return Err(format!("gzip seek table: unsupported version {version}")),
        };
        let uncompressed_size = r.u64()?;
        let count = r.u64()?;
        let max_count = r.rest.len() / min_checkpoint;
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c <= max_count)
            .ok_or_else(|| {
                format!(
                    "gzip seek table: checkpoint count {count} exceeds what {} remaining bytes can hold",
                    r.rest.len()
                )
            })?;
        if count == 0 {
            return Err("gzip seek table: no checkpoints".into());
        }
        let raw = if version == 2 {
            raw_checkpoints_v2(bytes, &mut r, count)?
        } else {
            raw_checkpoints(bytes, &mut r, count)?
        };
        if !r.rest.is_empty() {
            return Err(format!("gzip seek table: {} trailing bytes", r.rest.len()));
        }
        let mut checkpoints: Vec<GzipCheckpoint> = Vec::with_capacity(count);
        for (i, c) in raw.into_iter().enumerate() {
            let (uncompressed, compressed, bits, flags) =
                (c.uncompressed, c.compressed, c.bits, c.flags);
            let (window_len, deflated_at, deflated_len) =
                (c.window_len as usize, c.deflated_at, c.deflated_len);
            let deflated = &bytes[deflated_at..deflated_at + deflated_len];
            let bad = |what: &str| format!("gzip seek table: checkpoint {i}: {what}");
            if flags & !FLAG_MEMBER_START != 0 {
                return Err(bad(&format!("unknown flags {flags:#x}")));
            }
            let member_start = flags & FLAG_MEMBER_START != 0;
            if bits >= 8 {
                return Err(bad(&format!("bit count {bits} is not below 8")));
            }
            if window_len > WINDOW_SIZE {
                return Err(bad(&format!("window length {window_len} exceeds 32 KiB")));
            }
            if member_start && (bits != 0 || window_len != 0) {
                return Err(bad("member start with bits or window"));
            }
            if bits > 0 && compressed == 0 {
                return Err(bad("bits set at compressed offset 0"));
            }
            if window_len as u64 > uncompressed {
                return Err(bad("window longer than the preceding output"));
            }
            if let Some(prev) = checkpoints.last() {
                if uncompressed <= prev.uncompressed {
                    return Err(bad("uncompressed offsets not increasing"));
                }
                if compressed < prev.compressed {
                    return Err(bad("compressed offsets decreasing"));
                }
                if uncompressed >= uncompressed_size {
                    return Err(bad("offset beyond the uncompressed size"));
                }
            } else if uncompressed != 0 || !member_start {
                return Err(bad("first checkpoint is not a member start at offset 0"));
            }
            if window_len == 0 && deflated_len != 0 {
                return Err(bad("data for an empty window"));
            }
            if window_len != 0 && deflated_len == 0 {
                return Err(bad("no data for a window"));
            }
            // At most 32 KiB, checked above.
            let window = match shared {
                Some((all, at)) => {
                    Window::shared(window_len as u32, all, at + deflated_at, deflated_len)
                        .ok_or_else(|| bad("window outside the shared bytes"))?
                }
                None => Window::from_parts(window_len as u32, deflated),
            };
            checkpoints.push(GzipCheckpoint {
                uncompressed,
                compressed,
                bits,
                member_start,
                window,
                crcs: c.crcs,
            });
        }
        let table = GzipSeekTable {
            checkpoints,
            uncompressed_size,
        };
        for (i, cp) in table.checkpoints.iter().enumerate() {
            let (start, end) = table.span_range(i);
            if (end - start).div_ceil(CRC_BLOCK as u64) != cp.crcs.len() as u64 {
                return Err(format!(
                    "gzip seek table: checkpoint {i}: {} CRCs for a span of {} bytes",
                    cp.crcs.len(),
                    end - start
                ));
            }
        }
        Ok(table)
    }
}

/// One checkpoint's fields as encoded, before they are checked: its window's deflated
/// bytes are `deflated_len` bytes at `deflated_at` of the encoded table.
struct RawCheckpoint {
    uncompressed: u64,
    compressed: u64,
    bits: u8,
    flags: u8,
    window_len: u32,
    deflated_at: usize,
    deflated_len: usize,
    crcs: Vec<u32>,
}

/// The `count` checkpoints of a version 3 table (`r` is past its count), up to the
/// end of its windows.
fn raw_checkpoints(
    bytes: &[u8],
    r: &mut ByteReader<'_>,
    count: usize,
) -> Result<Vec<RawCheckpoint>, String> {
    let records = r.take(count * CHECKPOINT_BYTES)?;
    let mut raw = Vec::with_capacity(count);
    let mut window_bytes = 0usize;
    for (i, c) in records.chunks_exact(CHECKPOINT_BYTES).enumerate() {
        if c[18] != 0 || c[19] != 0 {
            return Err(format!("gzip seek table: checkpoint {i}: nonzero padding"));
        }
        let deflated_len = le_u32(&c[24..28]) as usize;
        window_bytes = window_bytes
            .checked_add(deflated_len)
            .ok_or("gzip seek table: window lengths overflow")?;
        raw.push(RawCheckpoint {
            uncompressed: le_u64(&c[0..8]),
            compressed: le_u64(&c[8..16]),
            bits: c[16],
            flags: c[17],
            window_len: le_u32(&c[20..24]),
            deflated_at: 0,
            deflated_len,
            crcs: Vec::new(),
        });
    }
    for (c, record) in raw.iter_mut().zip(records.chunks_exact(CHECKPOINT_BYTES)) {
        let crc_count = le_u32(&record[28..32]) as usize;
        let crc_bytes = r.take(
            crc_count
                .checked_mul(4)
                .ok_or("gzip seek table: CRC count overflows")?,
        )?;
        c.crcs = crc_bytes.chunks_exact(4).map(le_u32).collect();
    }
    let mut at = bytes.len() - r.rest.len();
    r.take(window_bytes)?;
    for c in &mut raw {
        c.deflated_at = at;
        at += c.deflated_len;
    }
    Ok(raw)
}

/// The `count` checkpoints of a version 2 table (each record followed by its window
/// and its CRCs; `r` is past the count), up to their end.
fn raw_checkpoints_v2(
    bytes: &[u8],
    r: &mut ByteReader<'_>,
    count: usize,
) -> Result<Vec<RawCheckpoint>, String> {
    let mut raw = Vec::with_capacity(count);
    for _ in 0..count {
        let uncompressed = r.u64()?;
        let compressed = r.u64()?;
        let bits = r.u8()?;
        let flags = r.u8()?;
        let window_len = r.u32()?;
        let deflated_len = r.u32()? as usize;
        let deflated_at = bytes.len() - r.rest.len();
        r.take(deflated_len)?;
        let crc_count = r.u32()? as usize;
        let crc_bytes = r.take(
            crc_count
                .checked_mul(4)
                .ok_or("gzip seek table: CRC count overflows")?,
        )?;
        raw.push(RawCheckpoint {
            uncompressed,
            compressed,
            bits,
            flags,
            window_len,
            deflated_at,
            deflated_len,
            crcs: crc_bytes.chunks_exact(4).map(le_u32).collect(),
        });
    }
    Ok(raw)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Compress `data` completely into `out` as one raw deflate stream.
fn deflate_all(compressor: &mut flate2::Compress, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + data.len() / 8 + 64);
    loop {
        let consumed = usize::try_from(compressor.total_in()).unwrap_or(usize::MAX);
        let input = data.get(consumed..).unwrap_or(&[]);
        match compressor.compress_vec(input, out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => return,
            Ok(_) => out.reserve(out.capacity().max(1024)),
            // Cannot happen for a well-formed stream object; an empty window
            // in the encoding is still self-consistent if it ever did.
            Err(_) => {
                out.clear();
                return;
            }
        }
    }
}

/// Inflate one encoded window, which must decode to exactly `len` bytes.
fn inflate_window(
    decompressor: &mut flate2::Decompress,
    deflated: &[u8],
    len: usize,
) -> Result<Vec<u8>, String> {
    decompressor.reset(false);
    // One spare byte so that a window longer than declared is detected.
    let mut window = Vec::with_capacity(len + 1);
    match decompressor.decompress_vec(deflated, &mut window, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) => {}
        Ok(_) => return Err("window data is truncated or too long".into()),
        Err(e) => return Err(format!("corrupt window data: {e}")),
    }
    if window.len() != len {
        return Err(format!(
            "window inflates to {} bytes, expected {len}",
            window.len()
        ));
    }
    if decompressor.total_in() != deflated.len() as u64 {
        return Err("garbage after window data".into());
    }
    Ok(window)
}

/// Bounds-checked little-endian reader over untrusted bytes.
struct ByteReader<'a> {
    /// Bytes not yet consumed.
    rest: &'a [u8],
}

impl<'a> ByteReader<'a> {
    /// Take the next `n` bytes or fail with a "truncated" error.
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err("gzip seek table: truncated".into());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// Take `N` bytes as an array.
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// Read one byte.
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    /// Read a little-endian u32.
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Read a little-endian u64.
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Result of one `inflate` call.
struct Step {
    /// zlib return code.
    ret: c_int,
    /// Input bytes consumed (moved into inflate's bit buffer or state).
    consumed: usize,
    /// Output bytes produced.
    produced: usize,
}

/// Owned zlib inflate stream; the `z_stream` is boxed so that its address never
/// changes after `inflateInit2_`, and `inflateEnd` runs on drop.
struct Inflater {
    /// The initialized stream. `next_in`/`next_out` only point at caller
    /// buffers for the duration of one `inflate` call and are reset to null
    /// afterwards.
    strm: Box<z::z_stream>,
}

impl Inflater {
    /// `inflateInit2_` with the given `windowBits`.
    fn new(window_bits: c_int) -> io::Result<Self> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a default-initialized z_stream (null buffers,
        // allocator fields valid) living in a Box, so its address is stable
        // for the lifetime of the stream; the version string is the library's
        // own NUL-terminated version and the size is that of the struct the
        // library defines.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if ret != z::Z_OK {
            // Not initialized: nothing to inflateEnd, the Box is simply freed.
            return Err(io::Error::other(format!("inflateInit2 failed ({ret})")));
        }
        Ok(Inflater { strm })
    }

    /// Run `inflate` on `input` writing into `out_ptr[..out_len]`.
    ///
    /// # Safety
    /// `out_ptr` must be valid for writes of `out_len` bytes (they may be
    /// uninitialized) for the duration of the call.
    unsafe fn run(&mut self, input: &[u8], out_ptr: *mut u8, out_len: usize, flush: c_int) -> Step {
        let in_len = input.len().min(c_uint::MAX as usize);
        let out_len = out_len.min(c_uint::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as c_uint;
        self.strm.next_out = out_ptr;
        self.strm.avail_out = out_len as c_uint;
        // SAFETY: the stream was initialized by inflateInit2_ and has not
        // moved (boxed); next_in/avail_in describe the live `input` slice and
        // next_out/avail_out a writable region per this function's contract.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = in_len.saturating_sub(self.strm.avail_in as usize);
        let produced = out_len.saturating_sub(self.strm.avail_out as usize);
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        Step {
            ret,
            consumed,
            produced,
        }
    }

    /// Inflate into an initialized buffer.
    fn inflate(&mut self, input: &[u8], out: &mut [u8], flush: c_int) -> Step {
        // SAFETY: `out` is a valid mutable slice for the whole call.
        unsafe { self.run(input, out.as_mut_ptr(), out.len(), flush) }
    }

    /// Inflate into possibly uninitialized memory; the first `produced` bytes
    /// of `out` are initialized afterwards.
    fn inflate_uninit(&mut self, input: &[u8], out: &mut [MaybeUninit<u8>], flush: c_int) -> Step {
        // SAFETY: `out` is valid for writes of its length; inflate only writes
        // (never reads) the output region.
        unsafe { self.run(input, out.as_mut_ptr().cast::<u8>(), out.len(), flush) }
    }

    /// `strm.data_type`: bits held (low 6 bits), 64 = last block seen,
    /// 128 = at a block boundary.
    fn data_type(&self) -> c_int {
        self.strm.data_type
    }

    /// The library's error message for the last call, if any.
    fn msg(&self) -> String {
        if self.strm.msg.is_null() {
            return String::new();
        }
        // SAFETY: zlib only ever stores pointers to static NUL-terminated
        // strings in `msg`.
        unsafe { CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }

    /// `inflatePrime`: feed `bits` low bits of `value` before the next input.
    fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: the stream is initialized and boxed.
        let ret =
            unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) };
        check_ok(ret, "inflatePrime")
    }

    /// `inflateSetDictionary` (raw mode only).
    fn set_dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        let len = c_uint::try_from(dict.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "window too large"))?;
        // SAFETY: the stream is initialized and boxed; `dict` is a live slice
        // of `len` bytes which inflate copies before returning.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        check_ok(ret, "inflateSetDictionary")
    }

    /// Copy the current sliding window (last up to 32 KiB of output) into `out`.
    fn get_dictionary(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let mut len: c_uint = 0;
        // SAFETY: a null dictionary pointer only queries the length.
        let ret = unsafe { z::inflateGetDictionary(&*self.strm, std::ptr::null_mut(), &mut len) };
        check_ok(ret, "inflateGetDictionary")?;
        let len = len as usize;
        if len > WINDOW_SIZE {
            return Err(io::Error::other("inflate window larger than 32 KiB"));
        }
        let mut buf = vec![0u8; len];
        let mut got: c_uint = 0;
        // SAFETY: `buf` has room for `len` bytes, the exact dictionary length
        // just reported by the same (unchanged) stream.
        let ret = unsafe { z::inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut got) };
        check_ok(ret, "inflateGetDictionary")?;
        if got as usize != len {
            return Err(io::Error::other("inflate window length changed"));
        }
        *out = buf;
        Ok(())
    }

    /// `inflateReset`: start a new stream with the same parameters.
    fn reset(&mut self) -> io::Result<()> {
        // SAFETY: the stream is initialized and boxed.
        let ret = unsafe { z::inflateReset(&mut *self.strm) };
        check_ok(ret, "inflateReset")
    }

    /// `inflateReset2`: start a new stream with a different `windowBits`.
    fn reset2(&mut self, window_bits: c_int) -> io::Result<()> {
        // SAFETY: the stream is initialized and boxed.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        check_ok(ret, "inflateReset2")
    }
}

// SAFETY: the z_stream and the inflate state it points to are exclusively
// owned by this Inflater (allocated through the Rust global allocator, no
// thread-local data), and next_in/next_out never point at borrowed buffers
// between calls, so moving the Inflater to another thread is sound.
unsafe impl Send for Inflater {}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was successfully initialized (an Inflater only
        // exists after inflateInit2_ returned Z_OK) and is ended exactly once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

/// Map a non-`Z_OK` return of a setup call to an error.
fn check_ok(ret: c_int, what: &str) -> io::Result<()> {
    if ret == z::Z_OK {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what} failed ({ret})")))
    }
}

/// Error for a failed `inflate` call.
fn inflate_error(inf: &Inflater, ret: c_int, offset: u64) -> io::Error {
    let msg = inf.msg();
    let what = match ret {
        z::Z_NEED_DICT => "unexpected preset dictionary".to_string(),
        z::Z_MEM_ERROR => "out of memory".to_string(),
        _ if msg.is_empty() => format!("inflate error {ret}"),
        _ => msg,
    };
    let kind = if ret == z::Z_MEM_ERROR {
        io::ErrorKind::OutOfMemory
    } else {
        io::ErrorKind::InvalidData
    };
    io::Error::new(
        kind,
        format!("corrupt gzip data near compressed offset {offset}: {what}"),
    )
}

/// Error for offset arithmetic that would overflow.
fn overflow() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "gzip offset overflow")
}

/// Where the [`GzipIndexer`] is in the gzip container format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IndexState {
    /// Inside a member (header, deflate data or trailer).
    Member,
    /// A member just ended; the next byte decides what follows.
    Between,
    /// Trailing zero padding; only zero bytes may follow until EOF.
    Zeros,
    /// End of input reached cleanly.
    Done,
}

/// Wraps the compressed byte stream; `Read` yields the uncompressed bytes while recording checkpoints every `span_bytes` of output.
pub struct GzipIndexer<R: Read> {
    /// Compressed input.
    inner: R,
    /// The gzip-mode inflater (None if initialization failed; the error is
    /// then in `error`).
    inf: Option<Inflater>,
    /// Minimum uncompressed distance between checkpoints.
    span: u64,
    /// Compressed input buffer.
    inbuf: Box<[u8]>,
    /// Next unconsumed byte in `inbuf`.
    in_pos: usize,
    /// End of valid data in `inbuf`.
    in_end: usize,
    /// Compressed offset of `inbuf[0]`.
    in_base: u64,
    /// The inner reader reported end of input.
    in_eof: bool,
    /// Output buffer for small reads (allocated on first use).
    outbuf: Vec<u8>,
    /// Next byte of `outbuf` to hand out.
    out_pos: usize,
    /// End of buffered output in `outbuf`.
    out_end: usize,
    /// Uncompressed bytes produced so far.
    total_out: u64,
    /// Uncompressed bytes produced by the current member.
    member_out: u64,
    /// Uncompressed offset of the last checkpoint.
    last_cp: u64,
    /// Checkpoints recorded so far.
    checkpoints: Vec<GzipCheckpoint>,
    /// Block CRCs of the current span.
    crcs: BlockCrcs,
    /// The start of the current span, while its window's used bytes are being found.
    probe: Option<WindowProbe>,
    /// Windows being made sparse and deflated on the thread pool, by checkpoint.
    pending: Vec<(usize, mpsc::Receiver<Window>)>,
    /// Deflates the windows that are not probed.
    compressor: flate2::Compress,
    /// Container state.
    state: IndexState,
    /// Sticky error: once the stream failed, every later call fails the same way.
    error: Option<(io::ErrorKind, String)>,
}

impl<R: Read> GzipIndexer<R> {
    /// Start indexing `inner` (positioned at the start of the gzip file),
    /// recording a checkpoint at the first deflate block boundary after every
    /// `span_bytes` (at least 1) of uncompressed output.
    pub fn new(inner: R, span_bytes: u64) -> Self {
        let (inf, error) = match Inflater::new(WBITS_GZIP) {
            Ok(inf) => (Some(inf), None),
            Err(e) => (None, Some((e.kind(), e.to_string()))),
        };
        GzipIndexer {
            inner,
            inf,
            span: span_bytes.max(1),
            inbuf: vec![0u8; IN_CHUNK].into_boxed_slice(),
            in_pos: 0,
            in_end: 0,
            in_base: 0,
            in_eof: false,
            outbuf: Vec::new(),
            out_pos: 0,
            out_end: 0,
            total_out: 0,
            member_out: 0,
            last_cp: 0,
            checkpoints: vec![GzipCheckpoint {
                uncompressed: 0,
                compressed: 0,
                bits: 0,
                member_start: true,
                window: Window::default(),
                crcs: Vec::new(),
            }],
            crcs: BlockCrcs::default(),
            probe: None,
            pending: Vec::new(),
            compressor: flate2::Compress::new(flate2::Compression::new(3), false),
            state: IndexState::Member,
            error,
        }
    }

    /// Finish indexing and return the seek table; call after reading to EOF.
    ///
    /// If the caller stopped reading early, the rest of the input is drained
    /// (decompressed, verified and indexed) first. Fails with the error that
    /// made the stream invalid (corrupt or truncated data, CRC/length
    /// mismatch, trailing garbage), with the compressed offset in the message.
    pub fn finish(mut self) -> io::Result<GzipSeekTable> {
        self.out_pos = 0;
        self.out_end = 0;
        let mut scratch = std::mem::take(&mut self.outbuf);
        scratch.resize(OUT_CHUNK, 0);
        while self.fill(&mut scratch)? > 0 {}
        self.finish_probe();
        let size = self.total_out;
        let last_crcs = self.crcs.close();
        let mut checkpoints = self.checkpoints;
        for (at, window) in self.pending {
            let window = window
                .recv()
                .map_err(|_| io::Error::other("a window probe did not finish"))?;
            if let Some(cp) = checkpoints.get_mut(at) {
                cp.window = window;
            }
        }
        if let Some(last) = checkpoints.last_mut() {
            last.crcs = last_crcs;
        }
        // Boundaries followed only by empty blocks or empty members can yield
        // checkpoints at the very end; they would describe empty spans.
        while checkpoints.len() > 1 && checkpoints.last().is_some_and(|c| c.uncompressed >= size) {
            checkpoints.pop();
        }
        Ok(GzipSeekTable {
            checkpoints,
            uncompressed_size: size,
        })
    }

    /// Compressed bytes consumed so far (for a progress bar).
    pub fn compressed_position(&self) -> u64 {
        self.in_base.saturating_add(self.in_pos as u64)
    }

    /// Absolute compressed offset of the next unconsumed input byte.
    fn in_offset(&self) -> io::Result<u64> {
        self.in_base
            .checked_add(self.in_pos as u64)
            .ok_or_else(overflow)
    }

    /// Refill the (fully consumed) input buffer; returns false at EOF.
    fn refill(&mut self) -> io::Result<bool> {
        self.in_base = self.in_offset()?;
        self.in_pos = 0;
        self.in_end = 0;
        loop {
            match self.inner.read(&mut self.inbuf) {
                Ok(n) => {
                    self.in_end = n.min(self.inbuf.len());
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Produce uncompressed bytes into `dst`, remembering any error.
    /// Returns 0 only at the clean end of the input (or for an empty `dst`).
    fn fill(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, msg)) = &self.error {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        match self.fill_inner(dst) {
            Ok(n) => Ok(n),
            Err(e) => {
                // Input I/O errors that may be transient are not sticky.
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    self.error = Some((e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }

    /// The indexing state machine; see [`GzipIndexer::fill`].
    fn fill_inner(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let mut produced = 0usize;
        let mut stalls = 0u32;
        let mut last_dt: c_int = -1;
        while produced < dst.len() {
            if self.in_pos == self.in_end && !self.in_eof && self.state != IndexState::Done {
                // Never block on more input once we have something to return.
                if produced > 0 {
                    break;
                }
                if !self.refill()? {
                    self.in_eof = true;
                }
                continue;
            }
            // From here on, an empty input buffer means end of input.
            let at_eof = self.in_pos == self.in_end;
            match self.state {
                IndexState::Done => break,
                IndexState::Zeros | IndexState::Between if at_eof => {
                    self.state = IndexState::Done;
                    break;
                }
                IndexState::Zeros => {
                    let rest = &self.inbuf[self.in_pos..self.in_end];
                    if let Some(p) = rest.iter().position(|&b| b != 0) {
                        let at = self
                            .in_offset()?
                            .checked_add(p as u64)
                            .ok_or_else(overflow)?;
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("trailing garbage after gzip data at compressed offset {at}"),
                        ));
                    }
                    self.in_pos = self.in_end;
                }
                IndexState::Between => match self.inbuf[self.in_pos] {
                    0x1f => {
                        if self.total_out - self.last_cp >= self.span {
                            let compressed = self.in_offset()?;
                            self.close_span();
                            self.checkpoints.push(GzipCheckpoint {
                                uncompressed: self.total_out,
                                compressed,
                                bits: 0,
                                member_start: true,
                                window: Window::default(),
                                crcs: Vec::new(),
                            });
                            self.last_cp = self.total_out;
                        }
                        self.inflater()?.reset()?;
                        self.member_out = 0;
                        self.state = IndexState::Member;
                    }
                    0 => self.state = IndexState::Zeros,
                    _ => {
                        let at = self.in_offset()?;
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("trailing garbage after gzip member at compressed offset {at}"),
                        ));
                    }
                },
                IndexState::Member => {
                    let (in_pos, in_end) = (self.in_pos, self.in_end);
                    let inf = self
                        .inf
                        .as_mut()
                        .ok_or_else(|| io::Error::other("no inflater"))?;
                    let step = inf.inflate(
                        &self.inbuf[in_pos..in_end],
                        &mut dst[produced..],
                        z::Z_BLOCK,
                    );
                    let consumed = step.consumed.min(in_end - in_pos);
                    self.in_pos = in_pos + consumed;
                    if let Some(out) = dst.get(produced..produced + step.produced) {
                        self.crcs.feed(out);
                        if let Some(probe) = self.probe.as_mut() {
                            probe
                                .input
                                .extend_from_slice(&self.inbuf[in_pos..in_pos + consumed]);
                            probe
                                .output
                                .extend_from_slice(&out[..out.len().min(probe.wants())]);
                            if probe.wants() == 0 {
                                self.finish_probe();
                            }
                        }
                    }
                    produced += step.produced;
                    let n = step.produced as u64;
                    self.total_out = self.total_out.checked_add(n).ok_or_else(overflow)?;
                    self.member_out += n;
                    match step.ret {
                        z::Z_OK | z::Z_BUF_ERROR => {
                            // At end of input inflate may still hold bits and
                            // pending output, so keep calling it until it
                            // visibly stops changing state.
                            let dt = self.inflater()?.data_type();
                            if step.consumed == 0 && step.produced == 0 && dt == last_dt {
                                stalls += 1;
                                if stalls > MAX_STALLS {
                                    return Err(self.stuck_error(at_eof)?);
                                }
                            } else {
                                stalls = 0;
                            }
                            last_dt = dt;
                            if dt & 128 != 0
                                && dt & 64 == 0
                                && self.member_out > 0
                                && self.total_out - self.last_cp >= self.span
                            {
                                self.checkpoint(dt)?;
                            }
                        }
                        z::Z_STREAM_END => {
                            // Later members never read this member's windows.
                            self.finish_probe();
                            // Give back whole bytes still held in the bit
                            // buffer (normally none after the trailer).
                            let held = (self.inflater()?.data_type() & 63) as usize / 8;
                            if held > self.in_pos {
                                return Err(io::Error::other(
                                    "inflate holds bytes from a previous buffer",
                                ));
                            }
                            self.in_pos -= held;
                            self.state = IndexState::Between;
                        }
                        ret => {
                            let at = self.in_offset()?;
                            let first_header = self.total_out == 0
                                && self.checkpoints.len() == 1
                                && self.in_base == 0;
                            let inf = self.inflater()?;
                            let msg = inf.msg();
                            if first_header && msg.contains("header") {
                                return Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("not a gzip stream ({msg}) at compressed offset 0"),
                                ));
                            }
                            return Err(inflate_error(inf, ret, at));
                        }
                    }
                }
            }
        }
        Ok(produced)
    }

    /// Error for an inflate that stopped making progress (truncated input
    /// when at end of input).
    fn stuck_error(&self, at_eof: bool) -> io::Result<io::Error> {
        let at = self.in_offset()?;
        Ok(if !at_eof {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("inflate made no progress at compressed offset {at}"),
            )
        } else if at == 0 {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "not a gzip stream (empty input)",
            )
        } else {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("truncated gzip stream at compressed offset {at}"),
            )
        })
    }

    /// The inflater, or an error if initialization failed.
    fn inflater(&mut self) -> io::Result<&mut Inflater> {
        self.inf
            .as_mut()
            .ok_or_else(|| io::Error::other("no inflater"))
    }

    /// Record a checkpoint at the block boundary the inflater stopped at;
    /// `dt` is its `data_type`.
    fn checkpoint(&mut self, dt: c_int) -> io::Result<()> {
        let held = (dt & 63) as u64;
        let bitpos = self
            .in_offset()?
            .checked_mul(8)
            .and_then(|b| b.checked_sub(held))
            .ok_or_else(overflow)?;
        let compressed = bitpos.div_ceil(8);
        // 0..=7 by construction.
        let bits = (compressed * 8 - bitpos) as u8;
        let mut window = Vec::new();
        self.inflater()?.get_dictionary(&mut window)?;
        self.close_span();
        // The compressed bytes from the checkpoint's (partial) byte up to `in_pos`
        // sit in inflate's bit buffer; the probe needs them, unless a refill has
        // already dropped them from `inbuf` (rare: then the whole window is kept).
        let behind = self.in_offset()? - compressed;
        let partial = usize::from(bits > 0);
        let start = usize::try_from(behind)
            .ok()
            .and_then(|b| self.in_pos.checked_sub(b.checked_add(partial)?));
        let mut stored = Window::default();
        match start {
            Some(start) => {
                self.probe = Some(WindowProbe {
                    checkpoint: self.checkpoints.len(),
                    window,
                    prime: (bits > 0).then(|| (bits, self.inbuf[start] >> (8 - bits))),
                    input: self.inbuf[start + partial..self.in_pos].to_vec(),
                    output: Vec::with_capacity(PROBE_LEN),
                })
            }
            None => stored = Window::deflate(&mut self.compressor, &window),
        }
        self.checkpoints.push(GzipCheckpoint {
            uncompressed: self.total_out,
            compressed,
            bits,
            member_start: false,
            window: stored,
            crcs: Vec::new(),
        });
        self.last_cp = self.total_out;
        Ok(())
    }

    /// Has the window of the probed checkpoint made sparse (where the probe shows
    /// it) and deflated on the thread pool, beside the inflating thread.
    fn finish_probe(&mut self) {
        if let Some(probe) = self.probe.take() {
            let (tx, rx) = mpsc::channel();
            self.pending.push((probe.checkpoint, rx));
            rayon::spawn(move || {
                let _ = tx.send(probe.finish());
            });
        }
    }

    /// Gives the last checkpoint the CRCs of its (now complete) span.
    fn close_span(&mut self) {
        self.finish_probe();
        let crcs = self.crcs.close();
        if let Some(last) = self.checkpoints.last_mut() {
            last.crcs = crcs;
        }
    }
}

impl<R: Read> Read for GzipIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.out_pos < self.out_end {
            let n = buf.len().min(self.out_end - self.out_pos);
            buf[..n].copy_from_slice(&self.outbuf[self.out_pos..self.out_pos + n]);
            self.out_pos += n;
            return Ok(n);
        }
        if buf.len() >= DIRECT_THRESHOLD {
            return self.fill(buf);
        }
        let mut ob = std::mem::take(&mut self.outbuf);
        if ob.len() < OUT_CHUNK {
            ob.resize(OUT_CHUNK, 0);
        }
        let res = self.fill(&mut ob);
        self.outbuf = ob;
        let got = res?;
        self.out_pos = 0;
        self.out_end = got;
        let n = buf.len().min(got);
        buf[..n].copy_from_slice(&self.outbuf[..n]);
        self.out_pos = n;
        Ok(n)
    }
}

/// Positional, buffered reader over the compressed source for [`decode_span`].
struct FileInput<'a> {
    /// The gzip stream.
    file: &'a dyn Source,
    /// Buffered compressed bytes.
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    base: u64,
    /// Next unconsumed byte in `buf`.
    pos: usize,
    /// End of valid data in `buf`.
    end: usize,
}

thread_local! {
    /// Compressed-input buffer of this thread's span decodes, kept between them so a
    /// decode allocates (and faults in) nothing new.
    static SPAN_INPUT: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<'a> FileInput<'a> {
    /// Input from `file` starting at `base`, read `first_read` bytes at a time, in
    /// this thread's reusable buffer.
    fn new(file: &'a dyn Source, base: u64, first_read: usize) -> Self {
        let mut buf = SPAN_INPUT.take();
        buf.resize(first_read, 0);
        FileInput {
            file,
            buf,
            base,
            pos: 0,
            end: 0,
        }
    }
}

impl Drop for FileInput<'_> {
    fn drop(&mut self) {
        // Keep at most one span read's worth per thread.
        if self.buf.capacity() <= MAX_SPAN_READ {
            SPAN_INPUT.set(std::mem::take(&mut self.buf));
        }
    }
}

impl FileInput<'_> {
    /// Absolute offset of the next unconsumed byte.
    fn offset(&self) -> io::Result<u64> {
        self.base.checked_add(self.pos as u64).ok_or_else(overflow)
    }

    /// The unconsumed buffered bytes.
    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Consume `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
    }

    /// Move to absolute offset `at` (keeping buffered data when possible).
    fn seek(&mut self, at: u64) {
        if at >= self.base && at - self.base <= self.end as u64 {
            self.pos = (at - self.base) as usize;
        } else {
            self.base = at;
            self.pos = 0;
            self.end = 0;
        }
    }

    /// Read more input at the current offset; returns false at end of file.
    fn refill(&mut self) -> io::Result<bool> {
        self.base = self.offset()?;
        self.pos = 0;
        self.end = 0;
        loop {
            match self.file.read_at(&mut self.buf, self.base) {
                Ok(n) => {
                    self.end = n.min(self.buf.len());
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Decode span `i` of the gzip file `file` into `out`.
///
/// `out` is cleared first and holds exactly `table.span_range(i)` bytes on
/// success. Only positional reads (`FileExt::read_at`) are used, so this may
/// be called concurrently from many threads on one source. Errors (span out
/// of range, I/O errors, truncated or corrupt data, or a table that does not
/// match the file) are `io::Error`s whose message includes the compressed
/// offset. A span may cross gzip member boundaries; CRCs are not checked here
/// (the indexing pass verified them).
pub fn decode_span(
    file: &dyn Source,
    table: &GzipSeekTable,
    i: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    decode_span_prefix(file, table, i, u64::MAX, out)
}

/// Like [`decode_span`], but stops after the first `limit` bytes of the span (a
/// random read deep into a span needs only the bytes up to it).
pub fn decode_span_prefix(
    file: &dyn Source,
    table: &GzipSeekTable,
    i: usize,
    limit: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    #[cfg(snapfs_isal)]
    let isal = isal::enabled();
    #[cfg(not(snapfs_isal))]
    let isal = false;
    decode_span_with(file, table, i, limit, isal, out)
}

/// [`decode_span_prefix`], inflating inside members with ISA-L if `isal` (and it is
/// built in and loaded), else with zlib-rs.
#[cfg_attr(not(snapfs_isal), allow(unused_variables))]
fn decode_span_with(
    file: &dyn Source,
    table: &GzipSeekTable,
    i: usize,
    limit: u64,
    isal: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    let cp = table.checkpoints.get(i).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("gzip span {i} out of range ({} spans)", table.span_count()),
        )
    })?;
    let (start, end) = table.span_range(i);
    // Whole CRC blocks only, so that every byte handed out is checked.
    let limit = limit
        .div_ceil(CRC_BLOCK as u64)
        .saturating_mul(CRC_BLOCK as u64);
    let want = usize::try_from((end - start).min(limit))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "gzip span too large"))?;
    if want == 0 {
        return Ok(());
    }
    if cp.bits >= 8 || cp.window.len() > WINDOW_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid gzip checkpoint",
        ));
    }

    // Size the first read to cover the wanted part of the span (in proportion to
    // its compressed size) when the next checkpoint tells where the span ends.
    let span_out = (end - start).max(1);
    let first_read = table
        .checkpoints
        .get(i + 1)
        .and_then(|next| next.compressed.checked_sub(cp.compressed))
        .map(|len| {
            let part = u128::from(len) * want as u128 / u128::from(span_out);
            usize::try_from(part)
                .unwrap_or(usize::MAX)
                .saturating_add(64 * 1024)
        })
        .map_or(IN_CHUNK, |len| len.clamp(64 * 1024, MAX_SPAN_READ));
    let mut input = FileInput::new(file, cp.compressed, first_read);
    let resume = match cp.member_start {
        true => None,
        false => Some(resume_point(file, cp, i)?),
    };
    let resume = resume
        .as_ref()
        .map(|(bits, window)| (&window[..], *bits, cp.bits));
    #[cfg(snapfs_isal)]
    if isal && isal::enabled() {
        isal_span(&mut input, i, want, resume, out)?;
        return verify_blocks(table, i, out);
    }
    zlib_span(&mut input, i, want, resume, out)?;
    verify_blocks(table, i, out)
}

/// Where a span's inflate starts: `None` at a gzip member header, else inside a member
/// at a block boundary, as `(window, bits, nbits)` (see [`resume_point`]).
type Resume<'w> = Option<(&'w [u8], u8, u8)>;

/// Fills `out` (empty) with the first `want` bytes of a span. `step` inflates into the
/// room it is given (never more than is still wanted) and returns how many bytes it
/// wrote there.
fn fill_span(
    want: usize,
    out: &mut Vec<u8>,
    mut step: impl FnMut(&mut [MaybeUninit<u8>]) -> io::Result<usize>,
) -> io::Result<()> {
    out.reserve(want.min(OUT_RESERVE_STEP));
    while out.len() < want {
        if out.capacity() == out.len() {
            out.reserve((want - out.len()).min(OUT_RESERVE_STEP));
        }
        let room = want - out.len();
        let spare = out.spare_capacity_mut();
        let spare_len = spare.len().min(room);
        let produced = step(&mut spare[..spare_len])?.min(spare_len);
        // SAFETY: both inflaters report the bytes they wrote, which are the first
        // `produced` bytes of the spare capacity, and `produced` does not exceed it.
        unsafe { out.set_len(out.len() + produced) };
    }
    Ok(())
}

/// Inflates the first `want` bytes of span `i` with zlib-rs into `out`, from `resume`
/// on, going on into the next gzip member where one ends inside the span.
fn zlib_span(
    input: &mut FileInput<'_>,
    i: usize,
    want: usize,
    resume: Resume<'_>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut inf;
    match resume {
        None => inf = Inflater::new(WBITS_GZIP)?,
        Some((window, bits, nbits)) => {
            inf = Inflater::new(WBITS_RAW)?;
            if nbits > 0 {
                inf.prime(nbits, bits)?;
            }
            if !window.is_empty() {
                inf.set_dictionary(window)?;
            }
        }
    }
    let mut raw = resume.is_some();
    let mut stalls = 0u32;
    let mut last_dt: c_int = -1;
    let mut eof = false;
    fill_span(want, out, |spare| {
        if input.avail().is_empty() && !eof && !input.refill()? {
            // Inflate may still hold the last bits and pending output; the
            // stall check below reports truncation once it stops changing.
            eof = true;
        }
        let step = inf.inflate_uninit(input.avail(), spare, z::Z_NO_FLUSH);
        input.consume(step.consumed);
        match step.ret {
            z::Z_OK | z::Z_BUF_ERROR => {
                let dt = inf.data_type();
                if step.consumed == 0 && step.produced == 0 && dt == last_dt {
                    stalls += 1;
                    if stalls > MAX_STALLS {
                        return Err(stuck(eof, input.offset()?, i));
                    }
                } else {
                    stalls = 0;
                }
                last_dt = dt;
            }
            z::Z_STREAM_END => {
                // The member ended: go on with the next one (if more is wanted).
                // Give back whole bytes held in the bit buffer, skip the 8-byte
                // trailer if raw inflate left it unread.
                let held = (inf.data_type() & 63) as u64 / 8;
                let mut next = input.offset()?.checked_sub(held).ok_or_else(overflow)?;
                if raw {
                    next = next.checked_add(8).ok_or_else(overflow)?;
                }
                input.seek(next);
                eof = false;
                stalls = 0;
                last_dt = -1;
                inf.reset2(WBITS_GZIP)?;
                raw = false;
            }
            ret => return Err(inflate_error(&inf, ret, input.offset()?)),
        }
        Ok(step.produced)
    })
}

/// Inflate of span `i` stopped moving at compressed offset `at`: the stream is
/// truncated (`eof`) or corrupt.
fn stuck(eof: bool, at: u64, i: usize) -> io::Error {
    if eof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("truncated gzip stream at compressed offset {at} (span {i})"),
        )
    } else {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("inflate made no progress at compressed offset {at} (span {i})"),
        )
    }
}

/// The partial byte's unread bits and the window a raw checkpoint `cp` (of span `i`)
/// resumes with.
fn resume_point(file: &dyn Source, cp: &GzipCheckpoint, i: usize) -> io::Result<(u8, Vec<u8>)> {
    let mut bits = 0;
    if cp.bits > 0 {
        let at = cp.compressed.checked_sub(1).ok_or_else(overflow)?;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("reading gzip data at compressed offset {at}: {e}"),
            )
        })?;
        bits = byte[0] >> (8 - cp.bits);
    }
    let mut window = Vec::new();
    if !cp.window.is_empty() {
        window = cp.window.inflate().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("gzip seek table: window of span {i}: {e}"),
            )
        })?;
    }
    Ok((bits, window))
}

/// Inflates the first `want` bytes of span `i` with ISA-L into `out`, from `resume`
/// on, going on into the next gzip member where one ends inside the span (ISA-L checks
/// the CRC and length of every member it reads from its header on).
#[cfg(snapfs_isal)]
fn isal_span(
    input: &mut FileInput<'_>,
    i: usize,
    want: usize,
    resume: Resume<'_>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut inf = match resume {
        None => isal::Inflater::gzip()?,
        Some((window, bits, nbits)) => isal::Inflater::resume(window, bits, nbits)?,
    };
    let mut raw = resume.is_some();
    let mut stalls = 0u32;
    let mut eof = false;
    fill_span(want, out, |spare| {
        if input.avail().is_empty() && !eof && !input.refill()? {
            eof = true;
        }
        let step = inf.step(input.avail(), spare);
        input.consume(step.consumed);
        if step.given_back > 0 {
            let back = input.offset()?.checked_sub(step.given_back as u64);
            input.seek(back.ok_or_else(overflow)?);
        }
        if step.ret < 0 {
            let at = input.offset()?;
            let what = match step.ret {
                isal::CHECKSUM_MISMATCH => "CRC or length mismatch".to_string(),
                ret => format!("invalid deflate data (ISA-L error {ret})"),
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt gzip data near compressed offset {at}: {what}"),
            ));
        }
        if step.finished {
            // The member ended: go on with the next one (if more is wanted). Raw
            // inflate leaves the 8-byte trailer unread.
            if raw {
                input.seek(input.offset()?.checked_add(8).ok_or_else(overflow)?);
                raw = false;
            }
            inf.next_member()?;
            eof = false;
            stalls = 0;
        } else if step.consumed == 0 && step.produced == 0 {
            stalls += 1;
            if stalls > MAX_STALLS {
                return Err(stuck(eof, input.offset()?, i));
            }
        } else {
            stalls = 0;
        }
        Ok(step.produced)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;
    use std::sync::OnceLock;

    const MIB: u64 = 1024 * 1024;

    /// Deterministic, semi-compressible text: words picked by an LCG.
    fn gen_data(len: usize, seed: u64) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "alpha",
            "bravo",
            "charlie",
            "delta",
            "echo",
            "foxtrot",
            "golf",
            "hotel",
            "india",
            "juliet",
            "kilo",
            "lima",
            "mike",
            "november",
            "oscar",
            "papa",
            "quebec",
            "romeo",
            "sierra",
            "tango",
            "uniform",
            "victor",
            "whiskey",
            "xray",
            "yankee",
            "zulu",
            "\n",
            "snapshot",
            "tarball",
            "filesystem",
            "0123456789",
            "/usr/lib/",
            ".so.1",
        ];
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut out = Vec::with_capacity(len + 32);
        while out.len() < len {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = state >> 33;
            if r % 97 == 3 {
                // A sprinkle of incompressible-ish bytes.
                out.extend_from_slice(&state.to_le_bytes());
            } else {
                out.extend_from_slice(WORDS[(r as usize) % WORDS.len()].as_bytes());
                out.push(b' ');
            }
        }
        out.truncate(len);
        out
    }

    /// The shared ~20 MiB test input.
    fn data() -> &'static [u8] {
        static DATA: OnceLock<Vec<u8>> = OnceLock::new();
        DATA.get_or_init(|| gen_data(20 * MIB as usize + 12345, 7))
    }

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::new(level));
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// Single-member gzip of `data()` (cached).
    fn single() -> &'static [u8] {
        static GZ: OnceLock<Vec<u8>> = OnceLock::new();
        GZ.get_or_init(|| gzip(data(), 2))
    }

    /// Multi-member gzip of `data()`: uneven pieces, including empty members.
    fn multi() -> &'static [u8] {
        static GZ: OnceLock<Vec<u8>> = OnceLock::new();
        GZ.get_or_init(|| {
            let d = data();
            let m = MIB as usize;
            // (end, level) pieces; level 1 (zlib-rs "quick" strategy) emits
            // multi-megabyte blocks.
            let pieces = [
                (m + m / 2, 1),
                (m + m / 2, 1),
                (3 * m + 900, 1),
                (9 * m, 2),
                (10 * m + m / 2, 1),
                (d.len(), 2),
            ];
            let mut out = Vec::new();
            let mut start = 0;
            for (end, level) in pieces {
                out.extend_from_slice(&gzip(&d[start..end], level));
                start = end;
            }
            out.extend_from_slice(&gzip(&[], 1));
            out
        })
    }

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// Index `gz` reading through the indexer with reads of `read_size`.
    fn index(gz: &[u8], span: u64, read_size: usize) -> io::Result<(Vec<u8>, GzipSeekTable)> {
        let mut ix = GzipIndexer::new(gz, span);
        let mut out = Vec::new();
        let mut buf = vec![0u8; read_size];
        loop {
            let n = ix.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(ix.compressed_position(), gz.len() as u64);
        Ok((out, ix.finish()?))
    }

    fn check_table(t: &GzipSeekTable, size: u64, span: u64) {
        assert_eq!(t.uncompressed_size, size);
        assert!(!t.checkpoints.is_empty());
        assert_eq!(t.checkpoints[0].uncompressed, 0);
        assert!(t.checkpoints[0].member_start);
        for w in t.checkpoints.windows(2) {
            assert!(w[1].uncompressed - w[0].uncompressed >= span);
            assert!(w[1].compressed >= w[0].compressed);
            assert!(w[1].uncompressed < size);
        }
        for cp in &t.checkpoints {
            assert!(cp.bits < 8);
            if cp.member_start {
                assert!(cp.window.is_empty());
            } else {
                assert!(!cp.window.is_empty() && cp.window.len() <= WINDOW_SIZE);
                assert!(cp.window.len() as u64 <= cp.uncompressed);
            }
        }
        let total: u64 = (0..t.span_count())
            .map(|i| {
                let (s, e) = t.span_range(i);
                e - s
            })
            .sum();
        assert_eq!(total, size);
        // Round-trip through the encoding.
        let mut enc = Vec::new();
        t.encode(&mut enc);
        assert_eq!(&GzipSeekTable::decode(&enc).unwrap(), t);
    }

    fn check_all_spans(gz: &[u8], t: &GzipSeekTable, data: &[u8]) {
        let f = write_tmp(gz);
        let mut out = Vec::new();
        for i in 0..t.span_count() {
            decode_span(f.as_file(), t, i, &mut out).unwrap();
            let (s, e) = t.span_range(i);
            assert_eq!(out.len() as u64, e - s, "span {i}");
            assert!(out == data[s as usize..e as usize], "span {i} content");
        }
    }

    #[test]
    fn single_member() {
        let (out, t) = index(single(), MIB, 1 << 20).unwrap();
        assert!(out == data());
        check_table(&t, data().len() as u64, MIB);
        let n = t.span_count() as u64;
        assert!((15..=21).contains(&n), "span count {n}");
        assert!(t.max_span_len() < 2 * MIB);
        check_all_spans(single(), &t, data());
    }

    #[test]
    fn windows_keep_only_the_bytes_their_span_reads() {
        let (_, t) = index(single(), MIB, 1 << 20).unwrap();
        let d = data();
        let mut compressor = flate2::Compress::new(Compression::new(3), false);
        let (mut kept, mut total, mut stored, mut whole) = (0, 0, 0, 0);
        for cp in t.checkpoints.iter().filter(|c| !c.member_start) {
            let sparse = cp.window.inflate().unwrap();
            let at = cp.uncompressed as usize;
            let real = &d[at - sparse.len()..at];
            // Every kept byte is the real one; the rest are zero.
            assert!(sparse.iter().zip(real).all(|(&s, &r)| s == 0 || s == r));
            kept += sparse.iter().zip(real).filter(|(&s, _)| s != 0).count();
            total += sparse.len();
            stored += cp.window.deflated().len();
            whole += Window::deflate(&mut compressor, real).deflated().len();
        }
        assert!(total > 0);
        // Text of 33 words: a span reads few of the window's bytes.
        assert!(kept * 4 < total, "kept {kept} of {total} window bytes");
        assert!(
            stored * 2 < whole,
            "sparse windows {stored} bytes, whole {whole}"
        );
        // And every span still decodes exactly (each byte is CRC-checked too).
        check_all_spans(single(), &t, d);
    }

    #[test]
    fn small_reads_yield_same_data() {
        let (out, t) = index(single(), MIB, 509).unwrap();
        assert!(out == data());
        let (_, t2) = index(single(), MIB, 1 << 16).unwrap();
        assert_eq!(t, t2);
    }

    #[test]
    fn multi_member() {
        let (out, t) = index(multi(), MIB, 1 << 17).unwrap();
        assert!(out == data());
        check_table(&t, data().len() as u64, MIB);
        check_all_spans(multi(), &t, data());
    }

    #[test]
    fn member_start_checkpoints() {
        // Each 2 MiB zero run at level 9 is a single (final) deflate block,
        // so the member that follows it must start with a checkpoint.
        let text = &data()[..MIB as usize + 77];
        let zeros = vec![0u8; 2 * MIB as usize];
        let mut d = Vec::new();
        let mut gz = Vec::new();
        for _ in 0..3 {
            for (piece, level) in [(&zeros[..], 9), (text, 6)] {
                d.extend_from_slice(piece);
                gz.extend_from_slice(&gzip(piece, level));
            }
        }
        let (out, t) = index(&gz, MIB, 1 << 16).unwrap();
        assert!(out == d);
        check_table(&t, d.len() as u64, MIB);
        let starts: Vec<u64> = t
            .checkpoints
            .iter()
            .filter(|c| c.member_start)
            .map(|c| c.uncompressed)
            .collect();
        let step = (zeros.len() + text.len()) as u64;
        for k in 0..3 {
            assert!(
                starts.contains(&(k * step + zeros.len() as u64)),
                "{starts:?}"
            );
        }
        check_all_spans(&gz, &t, &d);
    }

    #[test]
    fn spans_crossing_members() {
        // Many small members and a span larger than each of them.
        let d = &data()[..3 * MIB as usize];
        let mut gz = Vec::new();
        for chunk in d.chunks(100_000) {
            gz.extend_from_slice(&gzip(chunk, 6));
        }
        let (out, t) = index(&gz, 256 * 1024, 1 << 16).unwrap();
        assert!(out == d);
        check_table(&t, d.len() as u64, 256 * 1024);
        check_all_spans(&gz, &t, d);
    }

    #[test]
    fn pigz_output() {
        let pigz = std::path::Path::new("/usr/bin/pigz");
        if !pigz.exists() {
            println!("pigz not installed; skipping");
            return;
        }
        let mut child = std::process::Command::new(pigz)
            .args(["-c", "-p", "2"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(data()).unwrap());
        let mut gz = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut gz).unwrap();
        writer.join().unwrap();
        assert!(child.wait().unwrap().success());
        // Concatenate two pigz outputs as well.
        let mut gz2 = gz.clone();
        gz2.extend_from_slice(&gz);
        let (out, t) = index(&gz, MIB, 1 << 20).unwrap();
        assert!(out == data());
        check_table(&t, data().len() as u64, MIB);
        check_all_spans(&gz, &t, data());
        let (out2, t2) = index(&gz2, MIB, 1 << 20).unwrap();
        assert_eq!(out2.len(), 2 * data().len());
        check_table(&t2, out2.len() as u64, MIB);
        check_all_spans(&gz2, &t2, &out2);
    }

    #[test]
    fn empty_input_gzip() {
        let gz = gzip(&[], 6);
        let (out, t) = index(&gz, MIB, 4096).unwrap();
        assert!(out.is_empty());
        assert_eq!(t.span_count(), 1);
        assert_eq!(t.uncompressed_size, 0);
        assert_eq!(t.span_of(0), None);
        assert_eq!(t.max_span_len(), 0);
        check_table(&t, 0, MIB);
        let f = write_tmp(&gz);
        let mut buf = vec![1, 2, 3];
        decode_span(f.as_file(), &t, 0, &mut buf).unwrap();
        assert!(buf.is_empty());
        assert!(decode_span(f.as_file(), &t, 1, &mut buf).is_err());
    }

    #[test]
    fn empty_file_is_error() {
        let err = index(&[], MIB, 4096).unwrap_err();
        assert!(err.to_string().contains("not a gzip stream"), "{err}");
        let err = GzipIndexer::new(&[][..], MIB).finish().unwrap_err();
        assert!(err.to_string().contains("not a gzip stream"), "{err}");
        let err = index(b"hello world, definitely not gzip", MIB, 4096).unwrap_err();
        assert!(err.to_string().contains("not a gzip stream"), "{err}");
    }

    #[test]
    fn damage_that_still_inflates_is_caught_by_the_block_crcs() {
        // Stored blocks: a flipped byte inflates to a wrong byte without any error.
        let d = &data()[..5 * MIB as usize + 3];
        let gz = gzip(d, 0);
        let (_, t) = index(&gz, MIB, 1 << 16).unwrap();
        let mut enc = Vec::new();
        t.encode(&mut enc);
        assert_eq!(GzipSeekTable::decode(&enc).unwrap(), t);
        for (i, cp) in t.checkpoints.iter().enumerate() {
            let (a, b) = t.span_range(i);
            assert_eq!(cp.crcs, span_crcs(&d[a as usize..b as usize]), "span {i}");
        }
        let mut bad = gz.clone();
        let at = gz.len() / 2;
        bad[at] ^= 0x20;
        let f = write_tmp(&bad);
        let damaged = (0..t.span_count())
            .find(|&i| {
                t.checkpoints
                    .get(i + 1)
                    .is_none_or(|n| n.compressed > at as u64)
            })
            .unwrap();
        let mut out = Vec::new();
        for i in 0..t.span_count() {
            let r = decode_span(f.as_file(), &t, i, &mut out);
            if i == damaged {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("CRC-32 mismatch"), "{e}");
            } else {
                r.unwrap();
                let (a, b) = t.span_range(i);
                assert!(out == d[a as usize..b as usize], "span {i}");
            }
        }
        // Prefixes are checked too: the shortest one covering the damage fails.
        let r = decode_span_prefix(f.as_file(), &t, damaged, u64::MAX, &mut out);
        assert!(r.is_err());
    }

    #[test]
    fn stored_blocks_level0() {
        let d = &data()[..5 * MIB as usize + 3];
        let gz = gzip(d, 0);
        let (out, t) = index(&gz, MIB, 1 << 16).unwrap();
        assert!(out == d);
        check_table(&t, d.len() as u64, MIB);
        assert!(t.span_count() >= 5);
        check_all_spans(&gz, &t, d);
    }

    #[test]
    fn huge_blocks() {
        // Long zero runs compress into blocks covering megabytes of output.
        let mut d = vec![0u8; 12 * MIB as usize];
        d.extend_from_slice(&data()[..2 * MIB as usize]);
        d.extend(std::iter::repeat_n(b'x', 5 * MIB as usize));
        let gz = gzip(&d, 9);
        let (out, t) = index(&gz, MIB, 1 << 20).unwrap();
        assert!(out == d);
        check_table(&t, d.len() as u64, MIB);
        assert!(t.max_span_len() > MIB);
        check_all_spans(&gz, &t, &d);
    }

    #[test]
    fn tiny_span_every_boundary() {
        let d = &data()[..2 * MIB as usize];
        let gz = gzip(d, 6);
        let (out, t) = index(&gz, 1, 1 << 16).unwrap();
        assert!(out == d);
        check_table(&t, d.len() as u64, 1);
        assert!(t.span_count() > 10);
        assert!(t.checkpoints.iter().any(|c| c.bits != 0));
        check_all_spans(&gz, &t, d);
        // A span larger than the whole file gives one span.
        let (_, t) = index(&gz, u64::MAX, 1 << 16).unwrap();
        assert_eq!(t.span_count(), 1);
        check_all_spans(&gz, &t, d);
    }

    #[test]
    fn random_order_and_concurrent_spans() {
        let (_, t) = index(multi(), MIB, 1 << 20).unwrap();
        let f = write_tmp(multi());
        let d = data();
        let n = t.span_count();
        let mut state = 12345u64;
        let mut out = Vec::new();
        for _ in 0..40 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let i = (state >> 33) as usize % n;
            decode_span(f.as_file(), &t, i, &mut out).unwrap();
            let (s, e) = t.span_range(i);
            assert!(out == d[s as usize..e as usize], "span {i}");
        }
        std::thread::scope(|sc| {
            for k in 0..4 {
                let (t, f) = (&t, f.as_file());
                sc.spawn(move || {
                    let mut out = Vec::new();
                    for i in (k..n).step_by(4).rev() {
                        decode_span(f, t, i, &mut out).unwrap();
                        let (s, e) = t.span_range(i);
                        assert!(out == d[s as usize..e as usize]);
                    }
                });
            }
        });
    }

    #[test]
    fn indexer_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<GzipIndexer<std::fs::File>>();
        assert_send::<GzipSeekTable>();
    }

    #[test]
    fn span_of_lookup() {
        let (_, t) = index(single(), MIB, 1 << 20).unwrap();
        for i in 0..t.span_count() {
            let (s, e) = t.span_range(i);
            assert_eq!(t.span_of(s), Some(i));
            assert_eq!(t.span_of(e - 1), Some(i));
        }
        assert_eq!(t.span_of(t.uncompressed_size), None);
        assert_eq!(t.span_of(u64::MAX), None);
        assert_eq!(
            t.span_range(t.span_count()),
            (t.uncompressed_size, t.uncompressed_size)
        );
    }

    #[test]
    fn trailing_zeros_ok_garbage_err() {
        let d = &data()[..300_000];
        let mut gz = gzip(d, 6);
        gz.extend_from_slice(&[0u8; 1000]);
        let (out, _) = index(&gz, 65536, 4096).unwrap();
        assert!(out == d);
        gz.push(1);
        assert!(index(&gz, 65536, 4096).is_err());
        let mut gz = gzip(d, 6);
        gz.extend_from_slice(b"garbage");
        let err = index(&gz, 65536, 4096).unwrap_err();
        assert!(err.to_string().contains("trailing garbage"), "{err}");
        // finish() alone drains and verifies everything.
        let err = GzipIndexer::new(&gz[..], 65536).finish().unwrap_err();
        assert!(err.to_string().contains("trailing garbage"), "{err}");
    }

    #[test]
    fn output_full_near_end_of_input() {
        // First read sized to end just before the end of the data, so that
        // inflate may hold the last input bits and pending output when the
        // input is exhausted.
        let d = &data()[..60_000];
        for gz in [gzip(d, 6), gzip(d, 1), gzip(d, 0)] {
            for k in (1..600).step_by(7) {
                let mut ix = GzipIndexer::new(&gz[..], 4096);
                let mut buf = vec![0u8; d.len() - k];
                let mut got = 0;
                while got < buf.len() {
                    let n = ix.read(&mut buf[got..]).unwrap();
                    assert!(n > 0);
                    got += n;
                }
                let mut rest = Vec::new();
                ix.read_to_end(&mut rest).unwrap();
                assert_eq!(rest.len(), k);
                assert!(buf == d[..d.len() - k] && rest == d[d.len() - k..]);
                assert_eq!(ix.finish().unwrap().uncompressed_size, d.len() as u64);
            }
        }
    }

    /// A reader that hands out its data a few bytes at a time.
    struct Trickle<'a> {
        data: &'a [u8],
        n: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.n = self.n % 7 + 1;
            let k = self.n.min(buf.len()).min(self.data.len());
            buf[..k].copy_from_slice(&self.data[..k]);
            self.data = &self.data[k..];
            Ok(k)
        }
    }

    #[test]
    fn trickling_input() {
        let d = &data()[..150_000];
        let mut gz = gzip(&d[..70_000], 6);
        gz.extend_from_slice(&gzip(&d[70_000..], 0));
        gz.extend_from_slice(&[0u8; 20]);
        let (_, want) = index(&gz, 8192, 1 << 16).unwrap();
        let mut ix = GzipIndexer::new(Trickle { data: &gz, n: 0 }, 8192);
        let mut out = Vec::new();
        ix.read_to_end(&mut out).unwrap();
        assert!(out == d);
        assert_eq!(ix.finish().unwrap(), want);
    }

    #[test]
    fn finish_drains_remaining_input() {
        let mut ix = GzipIndexer::new(single(), MIB);
        let mut buf = vec![0u8; 1000];
        ix.read_exact(&mut buf).unwrap();
        let t = ix.finish().unwrap();
        let (_, t2) = index(single(), MIB, 1 << 20).unwrap();
        assert_eq!(t, t2);
    }

    #[test]
    fn corrupt_and_truncated_data() {
        let gz = &gzip(&data()[..4 * MIB as usize], 2)[..];
        // Flip bytes at several places: indexing must fail, not panic.
        for frac in [2usize, 3, 5, 7] {
            let mut bad = gz.to_vec();
            let at = bad.len() / frac;
            bad[at] ^= 0x55;
            let err = index(&bad, 512 * 1024, 1 << 20).unwrap_err();
            assert!(err.to_string().contains("offset"), "{err}");
        }
        // Corrupt trailer (CRC).
        let mut bad = gz.to_vec();
        let n = bad.len();
        bad[n - 6] ^= 1;
        let err = index(&bad, 512 * 1024, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("offset"), "{err}");
        // Truncation at many lengths.
        for cut in [
            1usize,
            5,
            10,
            11,
            100,
            gz.len() / 2,
            gz.len() - 8,
            gz.len() - 1,
        ] {
            let err = index(&gz[..cut], 512 * 1024, 1 << 20).unwrap_err();
            assert!(
                err.to_string().contains("truncated") || err.to_string().contains("offset"),
                "{cut}: {err}"
            );
        }
        // Every truncation of a small stream is an error.
        let small = gzip(&data()[..20_000], 6);
        for cut in 0..small.len() {
            assert!(index(&small[..cut], 4096, 4096).is_err(), "cut {cut}");
        }
        // decode_span on damaged files with the good table: error or wrong
        // bytes, never a panic.
        let (_, t) = index(gz, 512 * 1024, 1 << 20).unwrap();
        let mut bad = gz.to_vec();
        for k in (1000..bad.len()).step_by(bad.len() / 50) {
            bad[k] ^= 0xa5;
        }
        let f = write_tmp(&bad);
        let mut out = Vec::new();
        for i in 0..t.span_count() {
            let _ = decode_span(f.as_file(), &t, i, &mut out);
        }
        let f = write_tmp(&gz[..gz.len() / 2]);
        let last = t.span_count() - 1;
        let err = decode_span(f.as_file(), &t, last, &mut out).unwrap_err();
        assert!(err.to_string().contains("offset"), "{err}");
    }

    /// ISA-L and zlib-rs inflate every span of a single-member stream (seek points at
    /// bit offsets), of a multi-member one (members ending inside spans) and of every
    /// prefix length alike; on damaged data both fail, naming an offset.
    #[cfg(snapfs_isal)]
    #[test]
    fn isal_and_zlib_decode_every_span_alike() {
        assert!(
            isal::enabled(),
            "libisal.so.2 not loaded (is libisal2 installed?)"
        );
        for (gz, span) in [
            (single(), MIB),
            (multi(), MIB),
            (&gzip(&data()[..6 * MIB as usize], 9)[..], 256 * 1024),
        ] {
            let (data, t) = index(gz, span, 1 << 20).unwrap();
            assert!(
                t.checkpoints.iter().any(|c| c.bits > 0),
                "no bit-offset seek point"
            );
            let f = write_tmp(gz);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for i in 0..t.span_count() {
                for limit in [1, 70_000, u64::MAX] {
                    decode_span_with(f.as_file(), &t, i, limit, true, &mut a).unwrap();
                    decode_span_with(f.as_file(), &t, i, limit, false, &mut b).unwrap();
                    assert!(a == b, "span {i}, limit {limit}");
                }
                let (s, e) = t.span_range(i);
                assert!(a == data[s as usize..e as usize], "span {i} content");
            }
        }
        let gz = &gzip(&data()[..4 * MIB as usize], 2)[..];
        let (_, t) = index(gz, 512 * 1024, 1 << 20).unwrap();
        for k in [gz.len() / 3, gz.len() / 2, gz.len() * 4 / 5] {
            let mut bad = gz.to_vec();
            bad[k] ^= 0x5a;
            fails_both_ways(&bad, &t, k, "damaged span decoded");
        }
        // Small members, many inside one span: a member's CRC that does not match
        // fails its span either way.
        let mut many = Vec::new();
        let mut trailers = Vec::new();
        for chunk in data()[..2 * MIB as usize].chunks(40_000) {
            many.extend_from_slice(&gzip(chunk, 6));
            trailers.push(many.len() - 8);
        }
        let (_, t) = index(&many, MIB, 1 << 20).unwrap();
        let mut bad = many.clone();
        let k = trailers[trailers.len() / 3];
        bad[k] ^= 1;
        fails_both_ways(&bad, &t, k, "span with a bad member CRC decoded");
    }

    /// The span of `t` holding compressed offset `k` of the damaged `bad` fails with
    /// both inflaters, naming an offset.
    #[cfg(snapfs_isal)]
    fn fails_both_ways(bad: &[u8], t: &GzipSeekTable, k: usize, what: &str) {
        let f = write_tmp(bad);
        let i = (0..t.span_count())
            .rev()
            .find(|&i| t.checkpoints[i].compressed < k as u64)
            .unwrap();
        let mut out = Vec::new();
        for isal in [true, false] {
            let err = decode_span_with(f.as_file(), t, i, u64::MAX, isal, &mut out);
            let err = err.expect_err(what);
            assert!(err.to_string().contains("offset"), "{err}");
        }
    }

    #[test]
    fn hostile_tables_do_not_panic() {
        let (_, t) = index(multi(), MIB, 1 << 20).unwrap();
        let f = write_tmp(multi());
        let mut out = Vec::new();
        // Shifted offsets / bits: errors or garbage, never panics.
        for delta in [1u64, 7, 1000] {
            let mut bad = t.clone();
            for cp in &mut bad.checkpoints {
                cp.compressed = cp.compressed.wrapping_add(delta);
                cp.bits = (cp.bits + 3) % 8;
            }
            for i in 0..bad.span_count() {
                let _ = decode_span(f.as_file(), &bad, i, &mut out);
            }
        }
        let mut bad = t.clone();
        bad.uncompressed_size = u64::MAX;
        let last = bad.span_count() - 1;
        assert!(decode_span(f.as_file(), &bad, last, &mut out).is_err());
    }

    /// `t` in the version 2 encoding (each checkpoint's window and CRCs after it).
    fn encode_v2(t: &GzipSeekTable) -> Vec<u8> {
        let mut out = TABLE_MAGIC.to_vec();
        out.push(2);
        out.extend_from_slice(&t.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&(t.checkpoints.len() as u64).to_le_bytes());
        for cp in &t.checkpoints {
            out.extend_from_slice(&cp.uncompressed.to_le_bytes());
            out.extend_from_slice(&cp.compressed.to_le_bytes());
            out.push(cp.bits);
            out.push(u8::from(cp.member_start));
            out.extend_from_slice(&(cp.window.len() as u32).to_le_bytes());
            out.extend_from_slice(&(cp.window.deflated().len() as u32).to_le_bytes());
            out.extend_from_slice(cp.window.deflated());
            out.extend_from_slice(&(cp.crcs.len() as u32).to_le_bytes());
            for c in &cp.crcs {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn windows_come_last_and_version_2_tables_still_decode() {
        let (_, t) = index(single(), MIB, 1 << 20).unwrap();
        let mut enc = Vec::new();
        t.encode(&mut enc);
        let windows: usize = t
            .checkpoints
            .iter()
            .map(|c| c.window.deflated().len())
            .sum();
        assert!(windows > 0);
        // What an open reads: everything but the windows.
        assert_eq!(GzipSeekTable::head_len(&enc), enc.len() - windows);
        assert_eq!(GzipSeekTable::head_len(&enc[..30]), 30);
        let v2 = encode_v2(&t);
        assert_eq!(
            v2.len() + 2 * t.span_count(),
            enc.len(),
            "two padding bytes more"
        );
        assert_eq!(GzipSeekTable::decode(&v2).unwrap(), t);
        assert_eq!(GzipSeekTable::head_len(&v2), v2.len());
        // Windows shared from the encoding: a damaged one decodes (it is not read),
        // and fails its span only, with an error, never with other bytes.
        let mut bad = enc.clone();
        let victim = t
            .checkpoints
            .iter()
            .rposition(|c| !c.window.is_empty())
            .unwrap();
        let at = enc.len() - windows
            + t.checkpoints[..victim]
                .iter()
                .map(|c| c.window.deflated().len())
                .sum::<usize>();
        for b in &mut bad[at..at + t.checkpoints[victim].window.deflated().len()] {
            *b ^= 0x55;
        }
        let shared: SharedBytes = std::sync::Arc::new(bad.clone());
        let damaged = GzipSeekTable::decode_in(&bad, Some((&shared, 0))).unwrap();
        let f = write_tmp(single());
        let mut out = Vec::new();
        for i in 0..damaged.span_count() {
            let r = decode_span(f.as_file(), &damaged, i, &mut out);
            if i == victim {
                assert!(r.is_err(), "span {i} of a damaged window decoded");
            } else {
                r.unwrap();
                let (s, e) = damaged.span_range(i);
                assert!(out == data()[s as usize..e as usize], "span {i}");
            }
        }
    }

    #[test]
    fn decode_rejects_garbled_encodings() {
        let d = &data()[..3 * MIB as usize];
        let (_, t) = index(&gzip(d, 2), 512 * 1024, 1 << 20).unwrap();
        let mut enc = Vec::new();
        t.encode(&mut enc);
        assert_eq!(GzipSeekTable::decode(&enc).unwrap(), t);
        for cut in 0..enc.len() {
            if cut < 200 || cut % 97 == 0 || enc.len() - cut < 200 {
                assert!(GzipSeekTable::decode(&enc[..cut]).is_err(), "cut {cut}");
            }
        }
        let mut long = enc.clone();
        long.push(0);
        assert!(GzipSeekTable::decode(&long).is_err());
        // Byte flips: must never panic; flips in the header fields must fail.
        let mut state = 99u64;
        for k in 0..1000 {
            let mut bad = enc.clone();
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = if k < 200 {
                k % 64
            } else {
                (state >> 20) as usize % bad.len()
            };
            bad[at] ^= 1 << ((state >> 60) % 8);
            // (A flip in the padding bits of a deflated window may go
            // unnoticed; anything else yields Err or a different table.)
            let _ = GzipSeekTable::decode(&bad);
        }
        // Huge counts and window lengths are rejected without allocating.
        let mut bad = enc.clone();
        bad[13..21].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GzipSeekTable::decode(&bad).is_err());
        let mut bad = enc.clone();
        // First checkpoint's window_len field.
        bad[21 + 20..21 + 24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(GzipSeekTable::decode(&bad).is_err());
        for bytes in [&b""[..], b"GZST", b"GZST\x01", b"XXXX\x01\0\0\0\0\0\0\0\0"] {
            assert!(GzipSeekTable::decode(bytes).is_err());
        }
    }
}
