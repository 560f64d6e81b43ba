//! A [`Source`] that counts the bytes read from it: the service wraps every archive it
//! opens in one, so `snapfs list -l` and the socket API can say how much each source
//! was read (index loading, span decodes and plain reads alike).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::source::{Identity, IndexHome, Source};

/// Forwards every call to the wrapped source and counts the bytes its reads returned.
pub struct CountedSource {
    inner: Arc<dyn Source>,
    read: AtomicU64,
}

impl CountedSource {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Source>) -> Self {
        CountedSource {
            inner,
            read: AtomicU64::new(0),
        }
    }

    /// Bytes read from the source so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl Source for CountedSource {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let n = self.inner.read_at(buf, off)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn local(&self) -> bool {
        self.inner.local()
    }

    fn identity(&self) -> Identity {
        self.inner.identity()
    }

    fn check_unchanged(&self) -> Result<(), String> {
        self.inner.check_unchanged()
    }

    fn published_index(&self) -> Option<Vec<u8>> {
        self.inner.published_index()
    }

    fn publish_index(&self, index: &[u8]) -> Result<(), String> {
        self.inner.publish_index(index)
    }

    fn name(&self) -> PathBuf {
        self.inner.name()
    }

    fn index_home(&self) -> IndexHome {
        self.inner.index_home()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileSource;

    #[test]
    fn counts_what_reads_return() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![7u8; 1000]).unwrap();
        let src = CountedSource::new(Arc::new(FileSource::open(f.path()).unwrap()));
        let mut buf = [0u8; 300];
        src.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(src.read_at(&mut buf, 900).unwrap(), 100);
        assert_eq!(src.bytes_read(), 400);
        assert_eq!(src.identity().size, 1000);
        assert!(src.check_unchanged().is_ok());
    }
}
