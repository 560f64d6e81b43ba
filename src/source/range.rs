//! A byte range of another source as a [`Source`] of its own: a layer blob stored
//! uncompressed inside an outer tar (an OCI archive, a `docker save` file). A blob
//! named by its digest is content-addressed, so its identity (and the index built
//! for it) does not depend on the outer file it happens to sit in.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Identity, IndexHome, Source};

/// Bytes `[start, start + len)` of `outer`.
pub struct RangeSource {
    outer: Arc<dyn Source>,
    start: u64,
    len: u64,
    /// `algorithm:hex` of the bytes, if known.
    digest: Option<String>,
}

impl RangeSource {
    /// The range `[start, start + len)` of `outer`; `digest` (`sha256:...`) names the
    /// content when it is known. `None` if the range does not fit in `outer`.
    pub fn new(
        outer: Arc<dyn Source>,
        start: u64,
        len: u64,
        digest: Option<String>,
    ) -> Option<RangeSource> {
        start
            .checked_add(len)
            .filter(|&end| end <= outer.identity().size)?;
        Some(RangeSource {
            outer,
            start,
            len,
            digest,
        })
    }

    /// The digest the range was named with.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }
}

/// A stable 63-bit version stamp from a digest (its first 16 hex digits).
pub(super) fn digest_version(digest: &str) -> i64 {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    let v = hex
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| u64::from(crc32fast::hash(digest.as_bytes())));
    (v >> 1) as i64
}

impl Source for RangeSource {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let left = self.len.saturating_sub(off);
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        let at = self
            .start
            .checked_add(off)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        self.outer.read_at(&mut buf[..n], at)
    }

    fn local(&self) -> bool {
        self.outer.local()
    }

    fn identity(&self) -> Identity {
        match &self.digest {
            Some(d) => Identity {
                size: self.len,
                version: digest_version(d),
            },
            None => {
                let outer = self.outer.identity();
                Identity {
                    size: self.len,
                    version: outer.version ^ (self.start as i64),
                }
            }
        }
    }

    fn check_unchanged(&self) -> Result<(), String> {
        self.outer.check_unchanged()
    }

    fn name(&self) -> PathBuf {
        let mut n = self.outer.name().into_os_string();
        match &self.digest {
            Some(d) => n.push(format!("@{d}")),
            None => n.push(format!("@{}+{}", self.start, self.len)),
        }
        PathBuf::from(n)
    }

    fn index_home(&self) -> IndexHome {
        match &self.digest {
            Some(d) => IndexHome::Keyed(d.replace(':', "-")),
            None => {
                let name = self.name();
                let key = crc32fast::hash(name.as_os_str().as_encoded_bytes());
                IndexHome::Keyed(format!("range-{key:08x}-{}-{}", self.start, self.len))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileSource;

    #[test]
    fn a_range_reads_only_its_bytes_and_is_keyed_by_digest() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"0123456789abcdef").unwrap();
        let outer: Arc<dyn Source> = Arc::new(FileSource::open(f.path()).unwrap());
        assert!(RangeSource::new(outer.clone(), 10, 7, None).is_none());
        let r = RangeSource::new(outer.clone(), 4, 6, Some("sha256:00ff".into())).unwrap();
        let mut buf = [0u8; 10];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 6);
        assert_eq!(&buf[..6], b"456789");
        assert_eq!(r.read_at(&mut buf, 6).unwrap(), 0);
        assert_eq!(r.identity().size, 6);
        assert_eq!(r.index_home(), IndexHome::Keyed("sha256-00ff".into()));
        let a = RangeSource::new(outer.clone(), 0, 4, Some("sha256:abcd".into())).unwrap();
        let b = RangeSource::new(outer, 4, 4, Some("sha256:abcd".into())).unwrap();
        assert_eq!(a.identity(), b.identity(), "same blob, same identity");
    }
}
