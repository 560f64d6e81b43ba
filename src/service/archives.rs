//! The service's archive registry: each archive is opened once, keyed by its
//! canonical path, its index mapped once and one [`StreamReader`] (inside one
//! [`IndexTree`]) shared by every view that uses it. All archives cache their decoded
//! spans in the service's one [`SpanPool`], so views of the same layer share spans
//! and one cap bounds them all. An archive is closed (its spans freed) when the last
//! view using it goes; one that changed on disk is opened afresh for new views, while
//! views that still use the old one fail their reads as a mount daemon's would.
//!
//! [`StreamReader`]: crate::archive::StreamReader

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::archive::Archive;
use crate::cache::SpanPool;
use crate::error::Result;
use crate::index::build::BuildOptions;
use crate::index::tree::{Attr, DirSink, FsStats, IndexTree, ReadBytes, Tree};
use crate::source::Source;
use crate::view::{self, Spans};

use super::counted::CountedSource;

/// One open archive, shared by the views that use it.
pub struct OpenArchive {
    path: PathBuf,
    source: Arc<CountedSource>,
    tree: IndexTree,
}

impl OpenArchive {
    /// Its canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes read from it since it was opened.
    pub fn bytes_read(&self) -> u64 {
        self.source.bytes_read()
    }
}

/// What one slot of the registry holds: the archive while a view uses it.
type Slot = Arc<Mutex<Weak<OpenArchive>>>;

/// The archives of a service.
pub struct Archives {
    pool: Arc<SpanPool>,
    slots: Mutex<HashMap<PathBuf, Slot>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Archives {
    /// An empty registry whose archives cache spans in `pool`.
    pub fn new(pool: Arc<SpanPool>) -> Self {
        Archives {
            pool,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The pool every archive caches its spans in.
    pub fn pool(&self) -> &Arc<SpanPool> {
        &self.pool
    }

    /// The archive at canonical `path` (or a remote URL), opened now (its index loaded or built with
    /// `opts`) unless a view already has it open and it is unchanged.
    pub fn open(&self, path: &Path, opts: &BuildOptions) -> Result<Arc<OpenArchive>> {
        self.open_with(path, opts, || crate::source::open(path))
    }

    /// The archive whose bytes are `source` (a layer of an image), registered under
    /// `key` (the image's path joined with `@` and the layer's digest), as [`open`].
    ///
    /// [`open`]: Archives::open
    pub fn open_source(
        &self,
        key: &Path,
        source: Arc<dyn Source>,
        opts: &BuildOptions,
    ) -> Result<Arc<OpenArchive>> {
        self.open_with(key, opts, || Ok(source.clone()))
    }

    fn open_with(
        &self,
        path: &Path,
        opts: &BuildOptions,
        source: impl Fn() -> Result<Arc<dyn Source>>,
    ) -> Result<Arc<OpenArchive>> {
        let slot = {
            let mut slots = lock(&self.slots);
            // Forget slots whose archive is closed (none is being opened: try_lock).
            slots.retain(|_, s| {
                Arc::strong_count(s) > 1 || s.try_lock().map_or(true, |w| w.strong_count() > 0)
            });
            slots.entry(path.to_path_buf()).or_default().clone()
        };
        // One opener per archive; other archives open meanwhile.
        let mut held = lock(&slot);
        if let Some(a) = held.upgrade() {
            if a.source.check_unchanged().is_ok() {
                return Ok(a);
            }
            log::info!(
                "{} changed since it was opened; opening it again for new views",
                path.display()
            );
        }
        let source = Arc::new(CountedSource::new(source()?));
        let archive = Archive::from_source(source.clone())?;
        let tree = view::open_archive_in(archive, opts, Spans::Pool(&self.pool))?;
        let a = Arc::new(OpenArchive {
            path: path.to_path_buf(),
            source,
            tree,
        });
        *held = Arc::downgrade(&a);
        Ok(a)
    }

    /// The archives open now, by path.
    pub fn open_now(&self) -> Vec<Arc<OpenArchive>> {
        let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
        let mut v: Vec<Arc<OpenArchive>> = slots
            .iter()
            .filter_map(|s| s.try_lock().ok().and_then(|w| w.upgrade()))
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    /// The archive at `path` if it is open now.
    pub fn get(&self, path: &Path) -> Option<Arc<OpenArchive>> {
        let slot = lock(&self.slots).get(path).cloned()?;
        let w = slot.try_lock().ok()?;
        w.upgrade()
    }
}

/// The read-only tree of a shared archive, as one layer of one view.
pub struct SharedTree(pub Arc<OpenArchive>);

impl Tree for SharedTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        self.0.tree.attr(ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        self.0.tree.lookup(parent, name)
    }
    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        self.0.tree.read_dir(ino, offset, sink)
    }
    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        self.0.tree.read_link(ino)
    }
    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        self.0.tree.xattr_names(ino)
    }
    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.0.tree.xattr(ino, name)
    }
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes> {
        self.0.tree.read(ino, offset, size)
    }
    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        self.0.tree.seek_data(ino, offset, data)
    }
    fn stats(&self) -> FsStats {
        self.0.tree.stats()
    }
}
