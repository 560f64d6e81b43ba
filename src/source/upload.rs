//! Writing an object to S3 (or an HTTP store) while it is produced: a multipart
//! upload whose parts (8 MiB) go up in the background, a few at a time, as the bytes
//! arrive. Nothing is visible under the key until [`Upload::finish`] completes it; an
//! upload dropped unfinished (an error, a panic) is aborted, so no partial object and
//! no stored parts are left.

use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

use super::remote::{block_on, describe, locate, runtime};
use crate::error::{Error, Result};

/// Bytes per part.
const PART: usize = 8 << 20;
/// Parts uploading at once at most.
const PARTS_IN_FLIGHT: usize = 4;

/// An object being written.
pub struct Upload {
    url: String,
    writer: Option<WriteMultipart>,
    written: u64,
}

impl Upload {
    /// Starts a multipart upload to `url` (`s3://BUCKET/KEY`).
    pub fn start(url: &str) -> Result<Upload> {
        let loc = locate(url)?;
        let store: std::sync::Arc<dyn ObjectStore> = loc.store.clone();
        let path = loc.path.clone();
        let upload = block_on(async move { store.put_multipart(&path).await }).map_err(|e| {
            Error::Remote {
                url: url.to_string(),
                message: format!("cannot start the upload: {}", describe(&e)),
            }
        })?;
        Ok(Upload {
            url: url.to_string(),
            writer: Some(WriteMultipart::new_with_chunk_size(upload, PART)),
            written: 0,
        })
    }

    fn error(&self, e: object_store::Error) -> std::io::Error {
        std::io::Error::other(format!("uploading {}: {}", self.url, describe(&e)))
    }

    /// True if the object exists with the size written.
    fn landed(&self) -> bool {
        let Ok(loc) = locate(&self.url) else {
            return false;
        };
        let meta = block_on(async { loc.store.head(&loc.path).await });
        match meta {
            Ok(m) if m.size == self.written => {
                log::info!("{}: completed by an earlier attempt", self.url);
                true
            }
            _ => false,
        }
    }
}

impl super::ObjectWriter for Upload {
    /// Appends `bytes`; waits while [`PARTS_IN_FLIGHT`] parts are uploading.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let Some(w) = self.writer.as_mut() else {
            return Err(std::io::Error::other("upload already finished"));
        };
        let _rt = runtime().enter();
        w.write(bytes);
        self.written += bytes.len() as u64;
        let r = block_on(w.wait_for_capacity(PARTS_IN_FLIGHT));
        r.map_err(|e| self.error(e))
    }

    /// Uploads the last part and completes the upload: the object appears whole.
    fn finish(mut self: Box<Self>) -> Result<()> {
        let Some(w) = self.writer.take() else {
            return Err(Error::Internal("upload finished twice".into()));
        };
        let _rt = runtime().enter();
        match block_on(w.finish()) {
            Ok(_) => Ok(()),
            // A completion that timed out on our side but went through on the
            // server's: the retry finds no upload. The object is there, whole.
            Err(object_store::Error::NotFound { .. }) if self.landed() => Ok(()),
            Err(e) => Err(Error::Remote {
                url: self.url.clone(),
                message: format!("cannot complete the upload: {}", describe(&e)),
            }),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            let _rt = runtime().enter();
            match block_on(w.abort()) {
                Ok(()) => log::info!("upload to {} aborted: nothing was stored", self.url),
                Err(e) => log::warn!("cannot abort the upload to {}: {}", self.url, describe(&e)),
            }
        }
    }
}
