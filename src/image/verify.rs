//! Whole-blob checks of an image (`snapfs verify`, `mount --verify`): every layer
//! blob is read once, its size and digest checked against the manifest, and its
//! uncompressed stream (gzip or zstd, told from the bytes; all members or frames, and
//! any bytes after them count towards the blob digest) hashed against the config's
//! `diff_ids`. The manifest and config were already checked against their digests
//! when the image was opened. Layers are checked in parallel; the first failure in
//! layer order is reported, naming the layer by its digest.

use std::io::{self, BufReader, Read};
use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::archive::{Compression, Progress};
use crate::error::{Error, Result};
use crate::source::SourceReader;

use super::digest::{Algorithm, Digest, Hasher};
use super::Image;

/// What was checked of one layer.
#[derive(Debug, Clone)]
pub struct LayerCheck {
    /// The layer's label (its digest, or its path in the image).
    pub label: String,
    /// The compression found in its bytes.
    pub compression: Compression,
    /// Blob size.
    pub size: u64,
    /// Uncompressed size.
    pub uncompressed: u64,
    /// The blob's digest as computed.
    pub digest: Digest,
    /// The uncompressed stream's digest as computed (the layer's diff_id).
    pub diff_id: Digest,
}

/// Hashes what is read through it and counts it into a progress counter.
struct Tee<R> {
    inner: R,
    hasher: Hasher,
    read: u64,
    progress: Progress,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        self.progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Counts bytes written into it and hashes them.
struct Sink {
    hasher: Hasher,
    written: u64,
}

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks layer `i` of `image`.
fn check_layer(image: &Image, i: usize, progress: &Progress) -> Result<LayerCheck> {
    let layer = &image.layers[i];
    let name = format!("layer {} {}", i + 1, layer.label);
    let fail = |m: String| Error::image(&image.path, format!("{name}: {m}"));
    let read_err = |e: io::Error| fail(format!("read failed: {e}"));
    let mut head = [0u8; crate::archive::DETECT_BYTES];
    let n = layer.source.read_at(&mut head, 0).map_err(read_err)?;
    let compression = Compression::detect(&head[..n]);
    let algorithm = layer
        .digest
        .as_ref()
        .map_or(Algorithm::Sha256, Digest::algorithm);
    let diff_algorithm = layer
        .diff_id
        .as_ref()
        .map_or(Algorithm::Sha256, Digest::algorithm);
    let tee = Tee {
        inner: SourceReader::new(layer.source.clone()),
        hasher: Hasher::new(algorithm),
        read: 0,
        progress: progress.clone(),
    };
    let mut sink = Sink {
        hasher: Hasher::new(diff_algorithm),
        written: 0,
    };
    let buffered = BufReader::with_capacity(1 << 20, tee);
    let decode_err = |e: io::Error| fail(format!("{} stream is corrupt: {e}", compression.name()));
    let mut rest = match compression {
        Compression::None => {
            let mut r = buffered;
            io::copy(&mut r, &mut sink).map_err(read_err)?;
            r
        }
        Compression::Gzip => {
            let mut d = flate2::bufread::MultiGzDecoder::new(buffered);
            io::copy(&mut d, &mut sink).map_err(decode_err)?;
            d.into_inner()
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(buffered).map_err(decode_err)?;
            io::copy(&mut d, &mut sink).map_err(decode_err)?;
            d.finish()
        }
        // Not OCI layer types, but snapfs mounts them, so it verifies them too.
        Compression::Xz => {
            let mut d = liblzma::bufread::XzDecoder::new_multi_decoder(buffered);
            io::copy(&mut d, &mut sink).map_err(decode_err)?;
            d.into_inner()
        }
        Compression::Bzip2 => {
            let mut d = bzip2::bufread::MultiBzDecoder::new(buffered);
            io::copy(&mut d, &mut sink).map_err(decode_err)?;
            d.into_inner()
        }
    };
    // Bytes after the compressed stream still belong to the blob.
    io::copy(&mut rest, &mut io::sink()).map_err(read_err)?;
    let tee = rest.into_inner();
    if tee.read != layer.size {
        return Err(fail(format!(
            "blob is {} bytes, the manifest says {}",
            tee.read, layer.size
        )));
    }
    let digest = tee.hasher.finish();
    if let Some(want) = &layer.digest {
        if &digest != want {
            return Err(fail(format!(
                "blob content hashes to {digest} (corrupt or altered)"
            )));
        }
    }
    let diff_id = sink.hasher.finish();
    if let Some(want) = &layer.diff_id {
        if &diff_id != want {
            return Err(fail(format!(
                "uncompressed content hashes to {diff_id}, the config's diff_id is {want}"
            )));
        }
    }
    Ok(LayerCheck {
        label: layer.label.clone(),
        compression,
        size: tee.read,
        uncompressed: sink.written,
        digest,
        diff_id,
    })
}

/// Checks every layer of `image` (whole reads); `progress` counts blob bytes read.
pub fn verify(image: &Image, progress: &Progress) -> Result<Vec<LayerCheck>> {
    let results: Vec<Result<LayerCheck>> = (0..image.layers.len())
        .into_par_iter()
        .map(|i| check_layer(image, i, progress))
        .collect();
    results.into_iter().collect()
}

/// Bytes [`verify`] reads: every layer blob.
pub fn total_bytes(image: &Image) -> u64 {
    image
        .layers
        .iter()
        .map(|l| l.size)
        .fold(0, u64::saturating_add)
}
