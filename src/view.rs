//! Assembles a view, outside FUSE: inputs → archives (an image input becomes its
//! layers, through [`crate::image`]) → their indexes (embedded, persisted or built) →
//! one tree each → stacked as layers → under an upper directory → through an id map.
//! `mount`, `commit` and the service all open views here; FUSE only serves the result.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::{Archive, Progress, StreamReader};
use crate::error::{Error, Result};
use crate::idmap::{IdMap, MappedTree};
use crate::image::{Image, Select};
use crate::index::build::BuildOptions;
use crate::index::store::{self, Origin};
use crate::index::tree::{IndexTree, Tree};
use crate::index::Index;
use crate::layers::LayeredTree;
use crate::source::{FileSource, Source};
use crate::upper::UpperTree;

/// What a view is made of.
pub struct ViewSpec {
    /// The inputs (archives, or images: OCI layouts, OCI archives, `docker save`
    /// archives), bottom layer first.
    pub layers: Vec<PathBuf>,
    /// Which image of an image input (`--image`, `--platform`).
    pub select: Select,
    /// The upper directory of a writable view.
    pub upper: Option<PathBuf>,
    /// How ids are shown.
    pub idmap: IdMap,
    /// How indexes that must be built are built.
    pub build: BuildOptions,
    /// Memory for decompressed data (span caches and the daemon's own buffers).
    pub cache_bytes: u64,
}

/// Opens the view `spec` describes: its one tree, ready to serve.
pub fn open(spec: &ViewSpec) -> Result<Box<dyn Tree>> {
    open_with(spec, &resolve(&spec.layers, &spec.select)?)
}

/// Opens the view `spec` describes from its inputs, already resolved ([`resolve`]).
pub fn open_with(spec: &ViewSpec, inputs: &[Input]) -> Result<Box<dyn Tree>> {
    let mut tree = open_inputs(inputs, &spec.build, spec.cache_bytes)?;
    if let Some(dir) = &spec.upper {
        tree = Box::new(UpperTree::new(tree, dir)?);
    }
    if !spec.idmap.is_identity() {
        tree = Box::new(MappedTree::new(tree, spec.idmap.clone()));
    }
    Ok(tree)
}

/// The index of `archive`: the one embedded in a snapshot cut by snapfs (unless
/// `force`), else a persisted one, else a new one (saved). This is the one place
/// that knows both the snapshot format and the index store.
pub fn load_index(
    archive: &Archive,
    opts: &BuildOptions,
    required_span: Option<u64>,
    force: bool,
    progress: &Progress,
) -> Result<(Index, Origin)> {
    if !force {
        if let Some(index) = crate::snapshot::read_embedded(archive)? {
            return Ok((index, Origin::Embedded));
        }
    }
    store::load_or_build(archive, opts, required_span, force, progress)
}

/// One input of a view: an archive, or an image resolved to its layers.
pub enum Input {
    /// A tar, tar.gz or tar.zst file.
    Archive(PathBuf),
    /// An image: its layers, bottom first.
    Image(Box<Image>),
}

impl Input {
    /// The archives this input stands for, bottom first (sources not yet read).
    pub fn archives(&self) -> Result<Vec<Archive>> {
        match self {
            Input::Archive(p) => Ok(vec![Archive::open(p)?]),
            Input::Image(img) => img
                .layers
                .iter()
                .map(|l| Archive::from_source(l.source.clone()))
                .collect(),
        }
    }

    /// The input's path and, for an image, the reference chosen in it.
    pub fn name(&self) -> (&Path, Option<&str>) {
        match self {
            Input::Archive(p) => (p, None),
            Input::Image(img) => (&img.path, Some(&img.reference)),
        }
    }
}

/// The image step: each input that is an image (told from its content) becomes its
/// chosen image's layers; anything else stays an archive.
pub fn resolve(paths: &[PathBuf], select: &Select) -> Result<Vec<Input>> {
    paths
        .iter()
        .map(|p| {
            Ok(match Image::open(p, select)? {
                Some(img) => Input::Image(Box::new(img)),
                None => Input::Archive(p.clone()),
            })
        })
        .collect()
}

/// The read-only tree of one archive, its index loaded (or built).
pub fn open_archive(path: &Path, opts: &BuildOptions, cache_bytes: u64) -> Result<IndexTree> {
    let source: Arc<dyn Source> = Arc::new(FileSource::open(path)?);
    open_source(Archive::from_source(source)?, opts, cache_bytes)
}

/// The read-only tree of an opened archive (a file, or a layer of an image).
pub fn open_source(archive: Archive, opts: &BuildOptions, cache_bytes: u64) -> Result<IndexTree> {
    let (index, origin) = load_index(&archive, opts, None, false, &Default::default())?;
    let cache_file = store::cache_file_for(&archive, &index)?;
    let table = index.table.clone();
    let stream = match cache_file {
        Some(c) => StreamReader::with_cache_file(archive.source, table, c),
        None => StreamReader::new(archive.source, table, cache_bytes),
    };
    // The index was checked against the archive as opened; refuse if it changed since.
    stream.verify_unchanged()?;
    let tree = IndexTree::new(Arc::new(index), stream);
    Ok(match origin {
        Origin::Embedded => tree.with_header_check(),
        _ => tree,
    })
}

/// Memory the daemon needs besides its index and span cache: code, FUSE request and
/// reply buffers, per-thread compressed-input buffers. Taken out of `--cache-size`, so
/// the daemon's resident size stays under index + `--cache-size` (with 24 MiB, fio
/// random reads on a 1 GiB tar.gz peaked 7-10 MiB over that).
const DAEMON_OVERHEAD: u64 = 48 << 20;

/// The archives (or images) stacked as layers (last on top); see [`open_inputs`].
pub fn open_stack(
    archives: &[PathBuf],
    opts: &BuildOptions,
    cache_bytes: u64,
) -> Result<Box<dyn Tree>> {
    open_inputs(&resolve(archives, &Select::default())?, opts, cache_bytes)
}

/// The inputs' archives stacked as layers (last on top); one plain archive is served
/// directly, an image always through the layer stack (so whiteouts of its bottom layer
/// stay hidden, as image extraction leaves them). `cache_bytes` (less the daemon's own
/// overhead) is shared out between the layers.
pub fn open_inputs(
    inputs: &[Input],
    opts: &BuildOptions,
    cache_bytes: u64,
) -> Result<Box<dyn Tree>> {
    let mut archives = Vec::new();
    for input in inputs {
        archives.extend(input.archives()?);
    }
    let spans = cache_bytes
        .saturating_sub(DAEMON_OVERHEAD)
        .max(cache_bytes / 2);
    let each = spans / archives.len().max(1) as u64;
    let mut trees: Vec<Box<dyn Tree>> = Vec::with_capacity(archives.len());
    for archive in archives {
        trees.push(Box::new(open_source(archive, opts, each)?));
    }
    let any_image = inputs.iter().any(|i| matches!(i, Input::Image(_)));
    if trees.len() == 1 && !any_image {
        trees
            .pop()
            .ok_or_else(|| Error::Internal("a view needs an archive".into()))
    } else {
        Ok(Box::new(LayeredTree::new(trees)?))
    }
}
