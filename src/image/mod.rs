//! Container images as snapshots: an OCI image layout directory, an OCI archive (that
//! layout as one tar) or a `docker save` archive (old layout, and Docker 25+'s with
//! `index.json` beside `manifest.json`) resolved, without extracting anything, to the
//! image's layers as [`Source`]s, bottom first. The view stacks them like any archives
//! (`layers.rs` applies whiteouts and opaque directories).
//!
//! * [`digest`]: checked `algorithm:hex` digests and the hasher.
//! * [`model`]: the serde model of the JSON (descriptors, index, manifest, config,
//!   `manifest.json`).
//! * `store`: detection from content, and files of the image by path (a layout file,
//!   or a byte range of the outer tar).
//! * [`select`]: `--image REF` and `--platform` choice.
//! * `resolve`: index → manifest → config → layer sources, with every check that
//!   costs no whole-blob read.
//! * [`verify`]: whole-blob checks (digests, sizes, `diff_ids`).
//! * [`write`]: a new image = an input image plus one layer (`commit --image`).
//!
//! A layer whose digest is known is identified by it ([`crate::source::RangeSource`],
//! [`crate::source::BlobSource`]), so its index lives in the cache dir under the digest
//! and is shared by every image that has the layer: one indexing pass per layer, ever.
//! No fuser, clap or view types here.

pub mod digest;
pub mod model;
mod resolve;
pub mod select;
mod store;
pub mod verify;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::source::Source;

pub use digest::Digest;
pub use model::{Config, Descriptor, Platform};
pub use select::Select;
pub use store::Kind;

/// Largest index, manifest or `manifest.json` read (containerd's limit is 4 MiB).
pub const MAX_JSON: u64 = 4 << 20;
/// Largest image config read (long histories make configs big, not this big).
pub const MAX_CONFIG: u64 = 16 << 20;
/// Most layers an image may have (Docker's overlay limit is 125).
pub const MAX_LAYERS: usize = 1024;

/// A small JSON blob of the image, as read (manifest, config).
#[derive(Debug, Clone)]
pub struct JsonBlob {
    /// Its digest, when the image names one (always for OCI; docker save's config
    /// file name).
    pub digest: Option<Digest>,
    /// Its media type, when a descriptor gives one.
    pub media_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// One layer of the chosen image.
pub struct Layer {
    /// Media type from the manifest (empty for `docker save`).
    pub media_type: String,
    /// Digest of the blob, when known (from the manifest, the blob's path, or for a
    /// plain-tar layer of `docker save` its diff_id).
    pub digest: Option<Digest>,
    /// Size of the blob in bytes.
    pub size: u64,
    /// The config's `diff_ids` entry for it.
    pub diff_id: Option<Digest>,
    /// Where its bytes are.
    pub source: Arc<dyn Source>,
    /// What messages call it: its digest, or its path in the image.
    pub label: String,
}

/// An image chosen from an input, its layers resolved to sources.
pub struct Image {
    /// The input as given.
    pub path: PathBuf,
    /// The layout the input has.
    pub kind: Kind,
    /// The reference it was chosen by or is known as (`repo:tag`, a ref name, or
    /// the manifest digest).
    pub reference: String,
    /// The image manifest (absent for the old `docker save` layout).
    pub manifest: Option<JsonBlob>,
    /// The config.
    pub config_blob: JsonBlob,
    /// The parsed config.
    pub config: Config,
    /// Bottom first.
    pub layers: Vec<Layer>,
}

impl Image {
    /// Opens `path` as an image if its content says it is one (`Ok(None)`: an
    /// archive), choosing the image `select` asks for. Reads only small JSON blobs and
    /// the first bytes of layers: never a whole layer.
    pub fn open(path: &Path, select: &Select) -> Result<Option<Image>> {
        let Some((store, kind)) = store::Store::probe(path)? else {
            return Ok(None);
        };
        resolve::resolve(path, store, kind, select).map(Some)
    }

    /// [`Image::open`] of one file already opened as `source` (local or remote): an
    /// OCI archive or a `docker save` tar, told from its content.
    pub fn open_source(
        path: &Path,
        source: Arc<dyn Source>,
        select: &Select,
    ) -> Result<Option<Image>> {
        let Some((store, kind)) = store::Store::probe_tar(source, path)? else {
            return Ok(None);
        };
        resolve::resolve(path, store, kind, select).map(Some)
    }

    /// The name a mount shows for it: `input@reference`.
    pub fn display_name(&self) -> String {
        format!("{}@{}", self.path.display(), self.reference)
    }
}
