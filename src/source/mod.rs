//! Where archive bytes live: a [`Source`] answers positional reads and says what it is
//! (its [`Identity`], checked on every read, and where an index of it may be kept).
//! Backends: a local file ([`FileSource`]), a byte range of another source
//! ([`RangeSource`], a layer blob inside an image archive) and a whole source known by
//! its content digest ([`BlobSource`], a layer blob file in an image layout), and an
//! object in S3 or behind an HTTP server ([`RemoteSource`], with its on-disk block
//! cache [`DiskCache`]). Everything above this module asks a `Source` for bytes and
//! never knows where they come from; [`open`] picks the backend from the name.

mod blob;
mod disk;
mod file;
mod range;
mod remote;
mod upload;

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

pub use blob::BlobSource;
pub use disk::{CacheSummary, DiskCache};
pub use file::FileSource;
pub use range::RangeSource;
pub use remote::{identity_key, is_remote, RemoteSource, RemoteStats, BLOCK};
pub use upload::Upload;

/// The disk cache remote sources of this process use (set once, by the CLI).
static DISK_CACHE: std::sync::OnceLock<Arc<DiskCache>> = std::sync::OnceLock::new();

/// Makes `cache` the disk cache of every remote source opened from now on.
pub fn set_disk_cache(cache: DiskCache) {
    let _ = DISK_CACHE.set(Arc::new(cache));
}

/// The process's disk cache, if one is set.
pub fn disk_cache() -> Option<Arc<DiskCache>> {
    DISK_CACHE.get().cloned()
}

/// The network half of this module: remote objects and uploads. [`enable_network`]
/// installs it; the lean `snapfs` executable never does, so none of the HTTP, TLS and S3
/// code is linked into it (it hands commands that name a remote object to `snapfs-net`).
struct Network {
    open: fn(&str) -> crate::error::Result<Arc<dyn Source>>,
    upload: fn(&str) -> crate::error::Result<Box<dyn ObjectWriter>>,
}

static NETWORK: std::sync::OnceLock<Network> = std::sync::OnceLock::new();

/// Lets [`open`] open `s3://` and `http(s)://` objects and [`start_upload`] write them.
pub fn enable_network() {
    let _ = NETWORK.set(Network {
        open: |url| Ok(Arc::new(RemoteSource::open(url, disk_cache())?)),
        upload: |url| Ok(Box::new(Upload::start(url)?)),
    });
}

/// The network half, or the error naming `url` that says it is not in this executable.
fn network(url: &str) -> crate::error::Result<&'static Network> {
    NETWORK.get().ok_or_else(|| crate::error::Error::Remote {
        url: url.to_string(),
        message: format!("remote objects are served by {NET_EXECUTABLE}, not this executable"),
    })
}

/// The executable that holds the network half (installed beside `snapfs`).
pub const NET_EXECUTABLE: &str = "snapfs-net";

/// An object being written while it is produced ([`Upload`]): nothing is visible until
/// [`finish`](Self::finish); dropped unfinished, it stores nothing.
pub trait ObjectWriter: Send {
    /// Appends `bytes`.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the object appear whole.
    fn finish(self: Box<Self>) -> crate::error::Result<()>;
}

/// Starts writing the object `url` (`s3://BUCKET/KEY`).
pub fn start_upload(url: &str) -> crate::error::Result<Box<dyn ObjectWriter>> {
    (network(url)?.upload)(url)
}

/// The source `path` names: a remote object for `s3://` and `http(s)://` URLs, else a
/// local file.
pub fn open(path: &std::path::Path) -> crate::error::Result<Arc<dyn Source>> {
    if is_remote(path) {
        let url = path.to_string_lossy();
        return (network(&url)?.open)(&url);
    }
    Ok(Arc::new(FileSource::open(path)?))
}

/// What an index of a source is tied to besides its bytes' hashes: the size and a
/// version stamp that changes whenever the content may have (a local file's mtime in
/// nanoseconds; a content-addressed blob's digest; an object's ETag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Size in bytes.
    pub size: u64,
    /// Version stamp (mtime in ns, or a hash of a digest or ETag).
    pub version: i64,
}

/// Where the index of a source may be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexHome {
    /// A local file: `<path>.snapfs-idx` beside it, or the user's cache dir.
    Beside(PathBuf),
    /// No place of its own: the user's cache dir under this key (a layer digest, a
    /// hash of a URL). Keys are file-name safe.
    Keyed(String),
}

/// Random-access bytes of one archive. Shared between threads.
pub trait Source: Send + Sync {
    /// Reads up to `buf.len()` bytes at `off`; fewer only at the end.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;

    /// The size and version this source had when it was opened.
    fn identity(&self) -> Identity;

    /// `Err(why)` if the source no longer is what it was when opened (written in
    /// place, truncated, replaced): its bytes may not be the ones an index describes.
    fn check_unchanged(&self) -> Result<(), String>;

    /// Its name in messages (a path, a URL, `outer.tar@sha256:...`).
    fn name(&self) -> PathBuf;

    /// Where its index may be kept.
    fn index_home(&self) -> IndexHome;

    /// The index published beside this source by `snapfs index --publish` (a remote
    /// object's sidecar `KEY.snapfs-idx`), raw and untrusted: the caller decodes,
    /// validates and checks it against the source's identity. `None` if there is none.
    fn published_index(&self) -> Option<Vec<u8>> {
        None
    }

    /// Publishes `index` (an encoded index of this source) beside it.
    fn publish_index(&self, index: &[u8]) -> Result<(), String> {
        let _ = index;
        Err(format!(
            "{} is not a remote object; its index is kept beside it or in the cache dir",
            self.name().display()
        ))
    }

    /// Whether its bytes are on a local disk: reading ahead of a reader costs disk
    /// time, not a transfer (see `archive`'s filler).
    fn local(&self) -> bool {
        false
    }

    /// Fills `buf` from `off`; an early end is an `UnexpectedEof` error.
    fn read_exact_at(&self, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, off) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("read past the end at offset {off}"),
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    off = off.checked_add(n as u64).ok_or_else(overflow)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn overflow() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "offset overflow")
}

/// Sequential reads of `[pos, end)` of a source, for indexing passes and whole-stream
/// decompression. Skipping forward is free (the next read starts further on).
pub struct SourceReader {
    source: Arc<dyn Source>,
    pos: u64,
    end: u64,
}

impl SourceReader {
    /// Reads all of `source` from the start.
    pub fn new(source: Arc<dyn Source>) -> Self {
        let end = source.identity().size;
        SourceReader {
            source,
            pos: 0,
            end,
        }
    }

    /// Reads `[start, end)` of `source`.
    pub fn range(source: Arc<dyn Source>, start: u64, end: u64) -> Self {
        SourceReader {
            source,
            pos: start,
            end,
        }
    }

    /// Offset of the next read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Skips `n` bytes; fails if that passes the end.
    pub fn skip(&mut self, n: u64) -> io::Result<()> {
        match self.pos.checked_add(n).filter(|&p| p <= self.end) {
            Some(p) => {
                self.pos = p;
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside member data",
            )),
        }
    }
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        let got = self.source.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_ranges_and_skips_within_them() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        let src: Arc<dyn Source> = Arc::new(FileSource::open(f.path()).unwrap());
        let mut r = SourceReader::range(src.clone(), 100, 5000);
        let mut out = Vec::new();
        r.skip(100).unwrap();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data[200..5000]);
        assert!(r.skip(1).is_err());
        let mut whole = Vec::new();
        SourceReader::new(src).read_to_end(&mut whole).unwrap();
        assert_eq!(whole, data);
    }
}
