//! A whole source known by its content digest: a layer blob file in an OCI image
//! layout (`blobs/sha256/<hex>`). Its identity and index home come from the digest,
//! not from the file's path or mtime, so the index built for a layer is kept in the
//! cache dir under the digest and shared by every image that holds the same blob
//! (and nothing is written into the layout's `blobs/` directory). Change checks and
//! reads go to the wrapped source.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::range::digest_version;
use super::{Identity, IndexHome, Source};

/// `inner`, identified by `digest`.
pub struct BlobSource {
    inner: Arc<dyn Source>,
    digest: String,
    name: PathBuf,
}

impl BlobSource {
    /// Wraps `inner`, whose content is named by `digest` (`sha256:<hex>`, already
    /// checked to be file-name safe apart from the `:`); `name` is what messages call it
    /// (e.g. `layout@sha256:...`).
    pub fn new(inner: Arc<dyn Source>, digest: String, name: PathBuf) -> BlobSource {
        BlobSource {
            inner,
            digest,
            name,
        }
    }
}

impl Source for BlobSource {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at(buf, off)
    }

    fn local(&self) -> bool {
        self.inner.local()
    }

    fn identity(&self) -> Identity {
        Identity {
            size: self.inner.identity().size,
            version: digest_version(&self.digest),
        }
    }

    fn check_unchanged(&self) -> Result<(), String> {
        self.inner.check_unchanged()
    }

    fn name(&self) -> PathBuf {
        self.name.clone()
    }

    fn index_home(&self) -> IndexHome {
        IndexHome::Keyed(self.digest.replace(':', "-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FileSource, RangeSource};

    #[test]
    fn a_blob_file_and_the_same_blob_inside_a_tar_share_identity_and_index_home() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"layer bytes").unwrap();
        let outer = dir.path().join("outer");
        std::fs::write(&outer, b"....layer bytes....").unwrap();
        let d = format!("sha256:{}", "12".repeat(32));
        let file: Arc<dyn Source> = Arc::new(FileSource::open(&blob).unwrap());
        let a = BlobSource::new(file, d.clone(), "layout@x".into());
        let outer: Arc<dyn Source> = Arc::new(FileSource::open(&outer).unwrap());
        let b = RangeSource::new(outer, 4, 11, Some(d)).unwrap();
        assert_eq!(a.identity(), b.identity());
        assert_eq!(a.index_home(), b.index_home());
        let mut buf = [0u8; 11];
        a.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"layer bytes");
        assert!(a.check_unchanged().is_ok());
    }
}
