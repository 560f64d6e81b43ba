//! The embedded index of a snapshot: the 512-byte footer block, its fixed-size
//! gzip / zstd wrappers, and [`read_embedded`], which finds and loads the index from
//! the end of an archive without decompressing anything else.
//!
//! Footer block (all integers little-endian):
//! ```text
//!   0  16  magic "SNAPFS-EMBEDDED\0"
//!  16   4  version (1)
//!  20   4  compression code (0 tar, 1 gzip, 2 zstd)
//!  24   8  index offset in the uncompressed stream
//!  32   8  index length (bytes of the encoded index, before padding)
//!  40   8  compressed offset of the index (file offset of its gzip member / zstd
//!          frame; for plain tar the same as the stream offset)
//!  48   8  compressed length of the index (member / frame; plain tar: index length)
//!  56   4  CRC-32 of the encoded index
//!  60 448  zero
//! 508   4  CRC-32 of bytes 0..508
//! ```
//! Wrappers: plain tar — the footer is the last 512 bytes. gzip — a final gzip member
//! of exactly [`GZIP_FOOTER_LEN`] bytes holding one stored deflate block. zstd — a
//! final frame of exactly [`ZSTD_FOOTER_LEN`] bytes holding one raw block.

use crate::source::SourceReader;
use std::io::{self, Read};

use crate::archive::{Archive, Compression, SeekTable};
use crate::error::{Error, Result};
use crate::index::{format as index_format, Index};

/// Size of the footer block.
pub const FOOTER_LEN: usize = 512;
/// Footer magic.
pub const FOOTER_MAGIC: &[u8; 16] = b"SNAPFS-EMBEDDED\0";
/// Footer version written and read.
pub const FOOTER_VERSION: u32 = 1;
/// Size of the gzip member that wraps the footer.
pub const GZIP_FOOTER_LEN: usize = 10 + 1 + 4 + FOOTER_LEN + 8;
/// Size of the zstd frame that wraps the footer.
pub const ZSTD_FOOTER_LEN: usize = 4 + 1 + 2 + 3 + FOOTER_LEN;

/// gzip header (no name, mtime 0, XFL 0, OS 255) + stored final block header
/// (BFINAL=1, BTYPE=00, LEN=512, NLEN=!512).
const GZIP_FOOTER_HEAD: [u8; 15] = [
    0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xff, 0x01, 0x00, 0x02, 0xff, 0xfd,
];
/// zstd magic, FHD 0x60 (single segment, 2-byte FCS), FCS = 512 - 256, and the block
/// header of a last raw block of 512 bytes (1 | 0 << 1 | 512 << 3).
const ZSTD_FOOTER_HEAD: [u8; 10] = [0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x01, 0x01, 0x10, 0x00];

/// What the footer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Compression of the archive.
    pub compression: Compression,
    /// Offset of the index in the uncompressed stream.
    pub index_offset: u64,
    /// Length of the encoded index.
    pub index_len: u64,
    /// File offset of the compressed index (member / frame).
    pub compressed_offset: u64,
    /// Length of the compressed index.
    pub compressed_len: u64,
    /// CRC-32 of the encoded index.
    pub index_crc: u32,
}

impl Footer {
    /// The 512-byte footer block.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[..16].copy_from_slice(FOOTER_MAGIC);
        b[16..20].copy_from_slice(&FOOTER_VERSION.to_le_bytes());
        b[20..24].copy_from_slice(&u32::from(self.compression.code()).to_le_bytes());
        b[24..32].copy_from_slice(&self.index_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.compressed_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.compressed_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.index_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..508]);
        b[508..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a footer block. `Ok(None)`: not a snapfs footer (or a newer version);
    /// `Err`: a snapfs footer that is corrupt.
    pub fn decode(b: &[u8; FOOTER_LEN]) -> std::result::Result<Option<Footer>, String> {
        if &b[..16] != FOOTER_MAGIC {
            return Ok(None);
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if crc32fast::hash(&b[..508]) != u32_at(508) {
            return Err("embedded index footer checksum mismatch".into());
        }
        let version = u32_at(16);
        if version != FOOTER_VERSION {
            log::info!("embedded index footer version {version}, this snapfs reads {FOOTER_VERSION}; ignoring it");
            return Ok(None);
        }
        let compression = u8::try_from(u32_at(20))
            .ok()
            .and_then(Compression::from_code)
            .ok_or("embedded index footer has an unknown compression code")?;
        Ok(Some(Footer {
            compression,
            index_offset: u64_at(24),
            index_len: u64_at(32),
            compressed_offset: u64_at(40),
            compressed_len: u64_at(48),
            index_crc: u32_at(56),
        }))
    }
}

/// The footer block wrapped for `compression`: as is, as a gzip member with one stored
/// block, or as a zstd frame with one raw block. (snapfs writes no xz or bzip2
/// snapshots; for them the block is returned as is, and readers never look for it.)
pub fn wrap_footer(block: &[u8; FOOTER_LEN], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None | Compression::Xz | Compression::Bzip2 => block.to_vec(),
        Compression::Gzip => {
            let mut out = Vec::with_capacity(GZIP_FOOTER_LEN);
            out.extend_from_slice(&GZIP_FOOTER_HEAD);
            out.extend_from_slice(block);
            out.extend_from_slice(&crc32fast::hash(block).to_le_bytes());
            out.extend_from_slice(&(FOOTER_LEN as u32).to_le_bytes());
            out
        }
        Compression::Zstd => {
            let mut out = Vec::with_capacity(ZSTD_FOOTER_LEN);
            out.extend_from_slice(&ZSTD_FOOTER_HEAD);
            out.extend_from_slice(block);
            out
        }
    }
}

/// Extracts the footer block from the wrapped tail of a file (exactly the wrapper's
/// length). `Ok(None)` when the tail is not such a wrapper.
fn unwrap_footer(
    tail: &[u8],
    compression: Compression,
) -> std::result::Result<Option<[u8; FOOTER_LEN]>, String> {
    let mut block = [0u8; FOOTER_LEN];
    match compression {
        Compression::None => {
            if tail.len() != FOOTER_LEN {
                return Ok(None);
            }
            block.copy_from_slice(tail);
        }
        Compression::Gzip => {
            if tail.len() != GZIP_FOOTER_LEN || tail[..15] != GZIP_FOOTER_HEAD {
                return Ok(None);
            }
            block.copy_from_slice(&tail[15..15 + FOOTER_LEN]);
            let t = &tail[15 + FOOTER_LEN..];
            if u32::from_le_bytes([t[4], t[5], t[6], t[7]]) != FOOTER_LEN as u32 {
                return Ok(None);
            }
            if u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != crc32fast::hash(&block) {
                if &block[..16] == FOOTER_MAGIC {
                    return Err("embedded index footer: gzip CRC mismatch".into());
                }
                return Ok(None);
            }
        }
        Compression::Zstd => {
            if tail.len() != ZSTD_FOOTER_LEN || tail[..10] != ZSTD_FOOTER_HEAD {
                return Ok(None);
            }
            block.copy_from_slice(&tail[10..]);
        }
        Compression::Xz | Compression::Bzip2 => return Ok(None),
    }
    Ok(Some(block))
}

/// Loads the index embedded in a snapshot written by
/// [`SnapshotWriter`](crate::snapshot::SnapshotWriter): reads the footer at the end of
/// the file, then only the index's member / frame. `Ok(None)` when the archive has no
/// (readable-version) footer; an error naming the archive when it has one that is
/// corrupt or inconsistent. The returned index has `id` set to `archive.id`.
///
/// Nothing is trusted: lengths are checked against the file size, arithmetic is
/// checked, and memory grows only with data actually decompressed (capped by the
/// footer's index length, itself capped relative to the file size).
pub fn read_embedded(archive: &Archive) -> Result<Option<Index>> {
    let err = |m: String| Error::archive(&archive.path, None, None, m);
    let size = archive.id.size;
    let wrap_len = match archive.compression {
        Compression::None => FOOTER_LEN,
        Compression::Gzip => GZIP_FOOTER_LEN,
        Compression::Zstd => ZSTD_FOOTER_LEN,
        // snapfs writes no xz or bzip2 snapshots: such a file is indexed.
        Compression::Xz | Compression::Bzip2 => return Ok(None),
    } as u64;
    if size < wrap_len {
        return Ok(None);
    }
    let footer_start = size - wrap_len;
    let mut tail = vec![0u8; wrap_len as usize];
    archive
        .source
        .read_exact_at(&mut tail, footer_start)
        .map_err(|e| Error::io("reading", &archive.path, e))?;
    let Some(block) = unwrap_footer(&tail, archive.compression).map_err(&err)? else {
        return Ok(None);
    };
    let Some(f) = Footer::decode(&block).map_err(&err)? else {
        return Ok(None);
    };
    load_index(archive, &f, footer_start).map_err(|m| err(format!("embedded index: {m}")))
}

/// The embedded index; `None` if another snapfs version wrote it (the archive is then
/// indexed the ordinary way).
fn load_index(
    archive: &Archive,
    f: &Footer,
    footer_start: u64,
) -> std::result::Result<Option<Index>, String> {
    if f.compression != archive.compression {
        return Err(format!(
            "footer says {} but the file is {}",
            f.compression.name(),
            archive.compression.name()
        ));
    }
    f.compressed_offset
        .checked_add(f.compressed_len)
        .filter(|&e| e <= footer_start)
        .ok_or("index range lies outside the file")?;
    // Longest index a file of this size can justify (compressed ones expand).
    let max_len = match f.compression {
        Compression::None => f.compressed_len,
        _ => f.compressed_len.saturating_mul(64),
    };
    if f.index_len > max_len || f.index_len == 0 {
        return Err(format!("implausible index length {}", f.index_len));
    }
    let index_len = usize::try_from(f.index_len).map_err(|_| "index too large")?;
    let padded = f
        .index_len
        .checked_add(511)
        .map(|v| v / 512 * 512)
        .ok_or("index length overflow")?;
    if f.compression == Compression::None
        && (f.compressed_offset != f.index_offset || f.compressed_len != f.index_len)
    {
        return Err("plain tar index offsets disagree".into());
    }
    // Plain tar: the padding up to the footer is read (and checked) too.
    let range_len = match f.compression {
        Compression::None => padded,
        _ => f.compressed_len,
    };
    let end = f
        .compressed_offset
        .checked_add(range_len)
        .filter(|&e| e <= footer_start)
        .ok_or("index range lies outside the file")?;
    let src = SourceReader::range(archive.source.clone(), f.compressed_offset, end);
    let mut bytes = Vec::with_capacity(index_len.min(64 << 20));
    let read = match f.compression {
        Compression::None => src.take(padded).read_to_end(&mut bytes),
        Compression::Gzip => flate2::read::GzDecoder::new(io::BufReader::new(src))
            .take(padded + 1)
            .read_to_end(&mut bytes),
        Compression::Zstd => zstd::stream::read::Decoder::new(src)
            .and_then(|d| d.single_frame().take(padded + 1).read_to_end(&mut bytes)),
        // Never embedded (read_embedded does not look for them).
        Compression::Xz | Compression::Bzip2 => return Ok(None),
    };
    read.map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 != padded {
        return Err(format!(
            "it decompressed to {} bytes, expected {padded}",
            bytes.len()
        ));
    }
    if bytes[index_len..].iter().any(|&b| b != 0) {
        return Err("non-zero padding after the index".into());
    }
    bytes.truncate(index_len);
    if crc32fast::hash(&bytes) != f.index_crc {
        return Err("index checksum mismatch".into());
    }
    let mut index = match index_format::decode(&bytes) {
        Ok(i) => i,
        Err(m) if m.contains("unsupported version") || m.contains("index format version") => {
            log::info!(
                "{}: embedded index from another snapfs version ({m}); indexing it",
                archive.path.display()
            );
            return Ok(None);
        }
        Err(m) => return Err(m),
    };
    // The stream described must end before the index; seek points before it too.
    if index.stream_size > f.index_offset || index.table.compression() != f.compression {
        return Err("index does not describe this file".into());
    }
    let table_ok = match &*index.table {
        SeekTable::Plain => true,
        SeekTable::Gzip(t) => t
            .checkpoints
            .iter()
            .all(|c| c.compressed < f.compressed_offset),
        SeekTable::Zstd(t) => t
            .checkpoints
            .iter()
            .all(|c| c.compressed < f.compressed_offset),
        // Never embedded (read_embedded does not look for them).
        SeekTable::Xz(_) | SeekTable::Bzip2(_) => false,
    };
    if !table_ok {
        return Err("seek points lie past the index".into());
    }
    index.id = archive.id;
    Ok(Some(index))
}
