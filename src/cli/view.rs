//! Opening a view outside FUSE: the archives' trees (indexes loaded, built if needed),
//! stacked as layers, optionally under an upper directory. Shared by `mount` and
//! `commit`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::{Archive, StreamReader};
use crate::error::{Error, Result};
use crate::index::build::BuildOptions;
use crate::index::store;
use crate::index::tree::{IndexTree, Tree};
use crate::layers::LayeredTree;

/// The read-only tree of one archive, its index loaded (or built).
pub fn open_archive(path: &Path, opts: &BuildOptions, cache_bytes: u64) -> Result<IndexTree> {
    let archive = Archive::open(path)?;
    let (index, _) = super::index::load(&archive, opts, None, false, &Default::default())?;
    let cache_file = store::cache_file_for(&archive, &index)?;
    let table = index.table.clone();
    let stream = match cache_file {
        Some(c) => StreamReader::with_cache_file(archive.file, archive.path, table, c),
        None => StreamReader::new(archive.file, archive.path, table, cache_bytes),
    };
    // The index was checked against the archive as opened; refuse if it changed since.
    stream.verify_stamp(&archive.stamp)?;
    Ok(IndexTree::new(Arc::new(index), stream))
}

/// Memory the daemon needs besides its index and span cache: code, FUSE request and
/// reply buffers, per-thread compressed-input buffers. Taken out of `--cache-size`, so
/// the daemon's resident size stays under index + `--cache-size` (with 24 MiB, fio
/// random reads on a 1 GiB tar.gz peaked 7-10 MiB over that).
const DAEMON_OVERHEAD: u64 = 48 << 20;

/// The archives stacked as layers (last on top); one archive is served directly.
/// `cache_bytes` (less the daemon's own overhead) is shared out between the layers.
pub fn open_stack(
    archives: &[PathBuf],
    opts: &BuildOptions,
    cache_bytes: u64,
) -> Result<Box<dyn Tree>> {
    let spans = cache_bytes
        .saturating_sub(DAEMON_OVERHEAD)
        .max(cache_bytes / 2);
    let each = spans / archives.len().max(1) as u64;
    let mut trees: Vec<Box<dyn Tree>> = Vec::with_capacity(archives.len());
    for path in archives {
        trees.push(Box::new(open_archive(path, opts, each)?));
    }
    if trees.len() == 1 {
        trees.pop().ok_or_else(|| Error::Usage("no archive".into()))
    } else {
        Ok(Box::new(LayeredTree::new(trees)?))
    }
}
