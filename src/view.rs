//! Assembles a view, outside FUSE: inputs → archives (an image input becomes its
//! layers, through [`crate::image`]) → their indexes (embedded, persisted or built) →
//! one tree each → stacked as layers → under an upper directory → through an id map. `mount`, `commit` and the service all open views here; FUSE only serves
//! the result.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::{Archive, Progress, StreamReader};
use crate::cache::SpanPool;
use crate::error::{Error, Result};
use crate::idmap::{IdMap, MappedTree};
use crate::image::{Image, Select};
use crate::index::build::BuildOptions;
use crate::index::store::{self, Origin};
use crate::index::tree::{IndexTree, Tree};
use crate::index::Index;
use crate::layers::LayeredTree;
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
    let tree = open_inputs(inputs, &spec.build, spec.cache_bytes)?;
    finish(tree, spec.upper.as_deref(), &spec.idmap)
}

/// Puts the stacked read-only tree of a view under its upper directory (if any) and
/// its id map (unless the identity).
pub fn finish(
    mut tree: Box<dyn Tree>,
    upper: Option<&Path>,
    idmap: &IdMap,
) -> Result<Box<dyn Tree>> {
    if let Some(dir) = upper {
        tree = Box::new(UpperTree::new(tree, dir)?);
    }
    if !idmap.is_identity() {
        tree = Box::new(MappedTree::new(tree, idmap.clone()));
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
    /// An archive at a URL, its object already opened (by the image probe).
    Remote(PathBuf, Arc<dyn crate::source::Source>),
    /// An image: its layers, bottom first.
    Image(Box<Image>),
}

impl Input {
    /// The archives this input stands for, bottom first (sources not yet read).
    pub fn archives(&self) -> Result<Vec<Archive>> {
        match self {
            Input::Archive(p) => Ok(vec![Archive::open(p)?]),
            Input::Remote(_, s) => Ok(vec![Archive::from_source(s.clone())?]),
            Input::Image(img) => img
                .layers
                .iter()
                .map(|l| Archive::from_source(l.source.clone()))
                .collect(),
        }
    }

    /// Whether every archive of the input is a local file.
    pub fn local(&self) -> bool {
        match self {
            Input::Archive(_) => true,
            Input::Remote(..) => false,
            Input::Image(img) => img.layers.iter().all(|l| l.source.local()),
        }
    }

    /// The input's path and, for an image, the reference chosen in it.
    pub fn name(&self) -> (&Path, Option<&str>) {
        match self {
            Input::Archive(p) | Input::Remote(p, _) => (p, None),
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
            if crate::source::is_remote(p) {
                // Opened once: for the image probe, and as the archive if it is one.
                let source = crate::source::open(p)?;
                return Ok(match Image::open_source(p, source.clone(), select)? {
                    Some(img) => Input::Image(Box::new(img)),
                    None => Input::Remote(p.clone(), source),
                });
            }
            Ok(match Image::open(p, select)? {
                Some(img) => Input::Image(Box::new(img)),
                None => Input::Archive(p.clone()),
            })
        })
        .collect()
}

/// Where an archive's decoded spans are kept.
pub enum Spans<'a> {
    /// A cache of its own, of this many bytes.
    Own(u64),
    /// A pool shared with other archives (the service's).
    Pool(&'a Arc<SpanPool>),
}

/// The read-only tree of one archive, its index loaded (or built).
pub fn open_archive(path: &Path, opts: &BuildOptions, cache_bytes: u64) -> Result<IndexTree> {
    open_archive_in(Archive::open(path)?, opts, Spans::Own(cache_bytes))
}

/// The read-only tree of an opened archive, its index loaded (or built), its spans
/// cached as `spans` says.
pub fn open_archive_in(archive: Archive, opts: &BuildOptions, spans: Spans) -> Result<IndexTree> {
    let (index, origin) = load_index(&archive, opts, None, false, &Default::default())?;
    let cache_file = store::cache_file_for(&archive, &index)?;
    let table = index.table.clone();
    let stream = match (cache_file, spans) {
        (Some(c), _) => StreamReader::with_cache_file(archive.source, table, c),
        (None, Spans::Own(bytes)) => StreamReader::new(archive.source, table, bytes),
        (None, Spans::Pool(pool)) => StreamReader::in_pool(archive.source, table, pool),
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

/// The part of a `--cache-size` budget that decoded spans may use: the rest is the
/// process's own overhead.
pub fn span_budget(cache_bytes: u64) -> u64 {
    cache_bytes
        .saturating_sub(DAEMON_OVERHEAD)
        .max(cache_bytes / 2)
}

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
    let each = span_budget(cache_bytes) / archives.len().max(1) as u64;
    let mut trees: Vec<Box<dyn Tree>> = Vec::with_capacity(archives.len());
    for archive in archives {
        trees.push(Box::new(open_archive_in(archive, opts, Spans::Own(each))?));
    }
    if inputs.iter().any(|i| matches!(i, Input::Image(_))) {
        return Ok(Box::new(LayeredTree::new(trees)?));
    }
    stack(trees)
}

/// Trees stacked as layers (last on top); one tree is served directly.
pub fn stack(mut trees: Vec<Box<dyn Tree>>) -> Result<Box<dyn Tree>> {
    if trees.len() == 1 {
        trees
            .pop()
            .ok_or_else(|| Error::Internal("a view needs an archive".into()))
    } else {
        Ok(Box::new(LayeredTree::new(trees)?))
    }
}
