//! The snapfs service: many views in one process. [`Service`] owns them: archives
//! opened once and shared ([`archives`]), one span cache for all of them, each view a
//! FUSE session on its own threads, the state in its root directory ([`state`]), and
//! the recovery after a restart or a crash (stale mounts detached, every recorded
//! view mounted again with its upper dir) before any request is answered.
//! Front-ends are thin adapters over it: the control socket ([`control`], speaking
//! [`protocol`]; [`client`] is its other end), Docker's volume plugin protocol
//! ([`docker`], over the volumes of [`volumes`]) and, later, containerd's snapshots API.
//! Each view's changes pass a freeze gate ([`gate`]), so a view in use can be cut.

mod archives;
pub mod client;
pub mod containerd;
pub mod control;
mod counted;
pub mod docker;
mod gate;
mod mounts;
pub mod protocol;
pub mod snapshots;
pub mod state;
pub mod volumes;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::cache::SpanPool;
use crate::error::{Error, Result};
use crate::fs::{default_threads, MountOptions, Served, Session};
use crate::idmap::IdMap;
use crate::image::{Image, Select};
use crate::index::build::BuildOptions;
use crate::index::tree::Tree;
use crate::view;

use archives::{Archives, OpenArchive, SharedTree};
use gate::{Gate, GatedTree};
pub use protocol::{CacheInfo, Request, Response, SourceInfo, Status, ViewInfo, ViewState};
pub use state::ViewConfig;

/// How long shutdown waits for the views' sessions to end after detaching them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// How a service runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Its directory: state file, lock, default socket.
    pub root: PathBuf,
    /// Memory for decoded data of all views together (`--cache-size`): the span
    /// cache and the process's own buffers.
    pub cache_bytes: u64,
    /// FUSE worker threads of a view that does not say (`None`: see
    /// [`crate::fs::default_threads`]).
    pub threads: Option<usize>,
}

/// Which view a request means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// The view with this key.
    Key(String),
    /// The view mounted here.
    Mountpoint(PathBuf),
}

/// Many views served by one process. Cloning gives another handle on the same
/// service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    cache_bytes: u64,
    threads: Option<usize>,
    archives: Archives,
    views: Mutex<BTreeMap<String, Slot>>,
    closing: AtomicBool,
    next_id: AtomicU64,
    exits: mpsc::Sender<Exit>,
    /// The freeze gate of each live view, by key.
    gates: Mutex<BTreeMap<String, Weak<Gate>>>,
    /// The Docker volumes (see [`volumes`]).
    volumes: volumes::Volumes,
    _lock: File,
}

/// One recorded view.
struct Slot {
    config: ViewConfig,
    run: Run,
}

/// Where a recorded view stands.
enum Run {
    Starting,
    Live { served: Served, id: u64 },
    Stopping,
    Failed(String),
}

/// A view's session ended (sent from its thread).
struct Exit {
    key: String,
    id: u64,
    error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service {
    /// Starts the service on `config.root`: takes the root's lock (one service per
    /// root), then re-establishes every view its state file records, detaching stale
    /// mounts on their mountpoints first. A view that cannot be mounted again stays
    /// recorded as [`ViewState::Failed`]. Returns once all are done, so a front-end
    /// started afterwards answers only a service that is whole.
    pub fn start(config: ServiceConfig) -> Result<Service> {
        let lock_file = state::lock_root(&config.root)?;
        let root = config
            .root
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve", &config.root, e))?;
        let saved = state::load(&root)?;
        let volumes = volumes::Volumes::load(&root)?;
        let (exits, ended) = mpsc::channel();
        let inner = Arc::new(Inner {
            root,
            cache_bytes: config.cache_bytes,
            threads: config.threads,
            archives: Archives::new(SpanPool::new(view::span_budget(config.cache_bytes))),
            views: Mutex::new(BTreeMap::new()),
            closing: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            exits,
            gates: Mutex::new(BTreeMap::new()),
            volumes,
            _lock: lock_file,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap(weak, ended))
            .map_err(|e| Error::io("cannot start a thread in", &config.root, e))?;
        let service = Service { inner };
        service.restore(saved);
        Ok(service)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Mounts a new view and records it. Paths must be absolute; an empty key
    /// becomes the mountpoint. Fails (and records nothing) if the key, the
    /// mountpoint or the upper dir is taken, something is mounted there already, or
    /// the view cannot be opened or mounted.
    pub fn add(&self, view: ViewConfig) -> Result<ViewInfo> {
        let inner = &*self.inner;
        inner.refuse_if_closing()?;
        let v = check(view)?;
        {
            let mut views = lock(&inner.views);
            conflicts(&views, &v)?;
            if let Some(fstype) = mounts::mounted_at(&v.mountpoint)? {
                return Err(Error::AlreadyMounted {
                    path: v.mountpoint.clone(),
                    fstype,
                });
            }
            views.insert(
                v.key.clone(),
                Slot {
                    config: v.clone(),
                    run: Run::Starting,
                },
            );
            // Recorded first: a crash from here on finds the view at restart.
            if let Err(e) = inner.save(&views) {
                views.remove(&v.key);
                return Err(e);
            }
        }
        let started = inner.mount(&v);
        let mut views = lock(&inner.views);
        match started {
            Ok((served, id)) => {
                if let Some(slot) = views.get_mut(&v.key) {
                    slot.run = Run::Live { served, id };
                }
                log::info!("view {:?} serves on {}", v.key, v.mountpoint.display());
                Ok(inner.info(&views, &v.key))
            }
            Err(e) => {
                views.remove(&v.key);
                if let Err(se) = inner.save(&views) {
                    log::error!("{se}");
                }
                Err(e)
            }
        }
    }

    /// Unmounts a view and forgets it. Unless `lazy`, a view with open files stays
    /// ([`Error::Busy`]); a lazy removal detaches it at once and serves its open files
    /// until they are closed.
    pub fn remove(&self, which: &Which, lazy: bool) -> Result<()> {
        let inner = &*self.inner;
        let (key, mut served, id) = {
            let mut views = lock(&inner.views);
            let key = find(&views, which)?;
            let Some(slot) = views.get_mut(&key) else {
                return Err(not_found(which));
            };
            match std::mem::replace(&mut slot.run, Run::Stopping) {
                Run::Live { served, id } => (key, served, id),
                Run::Failed(_) => {
                    views.remove(&key);
                    return inner.save(&views);
                }
                other => {
                    slot.run = other;
                    return Err(Error::Service(format!(
                        "view {key:?} is being set up or removed; try again"
                    )));
                }
            }
        };
        if let Err(e) = served.unmount(lazy) {
            if let Some(slot) = lock(&inner.views).get_mut(&key) {
                slot.run = Run::Live { served, id };
            }
            return Err(e);
        }
        if !lazy {
            // Its tree (and upper dir lock) is gone once the session has ended.
            if let Err(e) = served.join() {
                log::warn!("view {key:?}: {e}");
            }
        }
        let mut views = lock(&inner.views);
        let slot = views.remove(&key);
        if let Some(s) = &slot {
            log::info!("view {key:?} on {} removed", s.config.mountpoint.display());
        }
        inner.save(&views)
    }

    /// The view `which`.
    pub fn view(&self, which: &Which) -> Result<ViewInfo> {
        let views = lock(&self.inner.views);
        let key = find(&views, which)?;
        Ok(self.inner.info(&views, &key))
    }

    /// Every view, in key order.
    pub fn list(&self) -> Vec<ViewInfo> {
        let views = lock(&self.inner.views);
        views.keys().map(|k| self.inner.info(&views, k)).collect()
    }

    /// The service's numbers: cache, sources, views.
    pub fn status(&self) -> Status {
        let inner = &*self.inner;
        let sources = inner.archives.open_now().iter().map(source_info).collect();
        Status {
            pid: std::process::id(),
            root: inner.root.clone(),
            cache: CacheInfo::new(inner.cache_bytes, inner.archives.pool().stats()),
            sources,
            views: self.list(),
        }
    }

    /// Serves one protocol request.
    pub fn handle(&self, req: Request) -> Result<Response> {
        Ok(match req {
            Request::Add { view } => Response {
                view: Some(self.add(view)?),
                ..Response::ok()
            },
            Request::List {} => Response {
                views: Some(self.list()),
                ..Response::ok()
            },
            Request::Remove {
                key,
                mountpoint,
                lazy,
            } => {
                let which = match (key, mountpoint) {
                    (Some(k), None) => Which::Key(k),
                    (None, Some(m)) => Which::Mountpoint(m),
                    _ => {
                        return Err(Error::Service(
                            "remove needs a key or a mountpoint (one of them)".into(),
                        ))
                    }
                };
                self.remove(&which, lazy)?;
                Response::ok()
            }
            Request::Status {} => Response {
                status: Some(self.status()),
                ..Response::ok()
            },
            r @ (Request::VolumeCreate { .. }
            | Request::VolumeRemove { .. }
            | Request::VolumeList {}
            | Request::VolumeInspect { .. }
            | Request::VolumeSnapshot { .. }
            | Request::VolumeRestore { .. }
            | Request::VolumeDrop { .. }) => self.volume_request(r)?,
        })
    }

    /// Unmounts every view (detached, so open files do not hold the exit up) and
    /// refuses new ones; the state file still records them all, so the next start
    /// mounts them again.
    pub fn shutdown(&self) {
        let inner = &*self.inner;
        inner.closing.store(true, Ordering::SeqCst);
        let mut live = Vec::new();
        for (key, slot) in lock(&inner.views).iter_mut() {
            if let Run::Live { .. } = slot.run {
                if let Run::Live { served, .. } = std::mem::replace(&mut slot.run, Run::Stopping) {
                    live.push((key.clone(), slot.config.mountpoint.clone(), served));
                }
            }
        }
        for (key, mountpoint, served) in &mut live {
            if let Err(e) = served.unmount(true) {
                log::error!("view {key:?} on {}: {e}", mountpoint.display());
            }
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        for (key, mountpoint, served) in live {
            while !served.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if served.is_finished() {
                let _ = served.join();
            } else {
                log::warn!(
                    "view {key:?} on {} still has open files; leaving it",
                    mountpoint.display()
                );
            }
        }
    }

    /// Mounts every view of the saved state again (see [`Service::start`]).
    fn restore(&self, saved: Vec<ViewConfig>) {
        let inner = &*self.inner;
        let mut todo = Vec::new();
        {
            let mut views = lock(&inner.views);
            for v in saved {
                if views.contains_key(&v.key) {
                    log::warn!("state records view {:?} twice; keeping the first", v.key);
                    continue;
                }
                views.insert(
                    v.key.clone(),
                    Slot {
                        config: v.clone(),
                        run: Run::Starting,
                    },
                );
                todo.push(v);
            }
        }
        for v in todo {
            let run = match inner.restore(&v) {
                Ok((served, id)) => {
                    log::info!("view {:?} on {} restored", v.key, v.mountpoint.display());
                    Run::Live { served, id }
                }
                Err(e) => {
                    log::error!(
                        "view {:?} on {} not restored: {e}",
                        v.key,
                        v.mountpoint.display()
                    );
                    Run::Failed(e.to_string())
                }
            };
            if let Some(slot) = lock(&inner.views).get_mut(&v.key) {
                slot.run = run;
            }
        }
    }
}

impl Inner {
    fn refuse_if_closing(&self) -> Result<()> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::Service("the snapfs service is shutting down".into()));
        }
        Ok(())
    }

    /// Records the views in the state file.
    fn save(&self, views: &BTreeMap<String, Slot>) -> Result<()> {
        let configs: Vec<ViewConfig> = views.values().map(|s| s.config.clone()).collect();
        state::save(&self.root, &configs)
    }

    /// A recorded view mounted again: stale mounts on its mountpoint detached, its
    /// paths checked as for a new one.
    fn restore(&self, v: &ViewConfig) -> Result<(Served, u64)> {
        mounts::clean_stale(&v.mountpoint)?;
        // A new upper dir would silently be an empty view: a missing one is an error.
        if let Some(u) = &v.upper {
            std::fs::metadata(u).map_err(|e| Error::io("cannot open upper dir", u, e))?;
        }
        let checked = check(v.clone())?;
        if let Some(fstype) = mounts::mounted_at(&checked.mountpoint)? {
            return Err(Error::AlreadyMounted {
                path: checked.mountpoint,
                fstype,
            });
        }
        self.mount(v)
    }

    /// Opens the view's tree from the shared archives and serves it on its own
    /// threads.
    fn mount(&self, v: &ViewConfig) -> Result<(Served, u64)> {
        let opts = BuildOptions {
            span_bytes: v
                .span
                .unwrap_or(crate::index::build::DEFAULT_SPAN)
                .max(64 << 10),
        };
        let idmap = IdMap::from_args(&v.uid_map, &v.gid_map, v.owner.as_deref())?;
        let gate = Gate::new(self.open_tree(v, &opts)?);
        let tree = view::finish(Box::new(GatedTree(gate.clone())), None, &idmap)?;
        let names: Vec<String> = v.layers.iter().map(|a| a.display().to_string()).collect();
        let options = MountOptions::parse(
            format!("snapfs:{}", names.join(":")),
            &v.options,
            v.upper.is_some(),
            v.threads.or(self.threads).unwrap_or_else(|| {
                let local = !v.layers.iter().any(|p| crate::source::is_remote(p));
                default_threads(v.upper.is_some(), local)
            }),
        );
        let session = Session::mount(tree, &v.mountpoint, &options)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.gates).insert(v.key.clone(), Arc::downgrade(&gate));
        let exits = self.exits.clone();
        let key = v.key.clone();
        let served = session.spawn(format!("view-{id}"), move |r| {
            let error = r.as_ref().err().map(ToString::to_string);
            let _ = exits.send(Exit { key, id, error });
        })?;
        if self.closing.load(Ordering::SeqCst) {
            // Shut down meanwhile: the view stays recorded, for the next start.
            let mut served = served;
            let _ = served.unmount(true);
            return Err(Error::Service("the snapfs service is shutting down".into()));
        }
        Ok((served, id))
    }

    /// The view's layers (an image input stands for its layers, each a shared
    /// archive of its own) under its upper dir: the tree a view's gate holds, without
    /// its id map.
    fn open_tree(&self, v: &ViewConfig, opts: &BuildOptions) -> Result<Box<dyn Tree>> {
        let mut layers: Vec<Box<dyn Tree>> = Vec::with_capacity(v.layers.len());
        let mut image = false;
        for path in &v.layers {
            // A URL is an archive (images are told from local files' content).
            let found = if crate::source::is_remote(path) {
                None
            } else {
                Image::open(path, &Select::default())?
            };
            match found {
                Some(img) => {
                    image = true;
                    for l in &img.layers {
                        let key = path.join(format!("@{}", l.label));
                        let a = self.archives.open_source(&key, l.source.clone(), opts)?;
                        layers.push(Box::new(SharedTree(a)));
                    }
                }
                None => layers.push(Box::new(SharedTree(self.archives.open(path, opts)?))),
            }
        }
        // An image always goes through the layer stack (its whiteouts stay hidden).
        let lower = if image {
            Box::new(crate::layers::LayeredTree::new(layers)?)
        } else {
            view::stack(layers)?
        };
        view::finish(lower, v.upper.as_deref(), &IdMap::default())
    }

    /// A view's session ended. If nobody asked for it (an unmount outside the
    /// service, or a failure), the view is forgotten.
    fn ended(&self, exit: Exit) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut views = lock(&self.views);
        let mine = matches!(
            views.get(&exit.key),
            Some(Slot { run: Run::Live { id, .. }, .. }) if *id == exit.id
        );
        if !mine {
            return;
        }
        let Some(slot) = views.remove(&exit.key) else {
            return;
        };
        if let Err(e) = self.save(&views) {
            log::error!("{e}");
        }
        drop(views);
        match &exit.error {
            Some(e) => log::error!("view {:?} failed and is forgotten: {e}", exit.key),
            None => log::info!(
                "view {:?} on {} was unmounted outside the service; forgotten",
                exit.key,
                slot.config.mountpoint.display()
            ),
        }
        if let Run::Live { served, .. } = slot.run {
            let _ = served.join();
        }
    }

    fn info(&self, views: &BTreeMap<String, Slot>, key: &str) -> ViewInfo {
        let Some(slot) = views.get(key) else {
            // Callers hold the lock and just found the key.
            return ViewInfo {
                state: ViewState::Failed,
                error: Some("gone".into()),
                config: ViewConfig::default(),
                sources: Vec::new(),
            };
        };
        let (state, error) = match &slot.run {
            Run::Starting => (ViewState::Starting, None),
            Run::Live { .. } => (ViewState::Live, None),
            Run::Stopping => (ViewState::Stopping, None),
            Run::Failed(e) => (ViewState::Failed, Some(e.clone())),
        };
        let sources = slot
            .config
            .layers
            .iter()
            .map(|p| match self.archives.get(p) {
                Some(a) => source_info(&a),
                None => SourceInfo {
                    path: p.clone(),
                    bytes_read: 0,
                    users: 0,
                },
            })
            .collect();
        ViewInfo {
            state,
            error,
            config: slot.config.clone(),
            sources,
        }
    }
}

fn source_info(a: &Arc<OpenArchive>) -> SourceInfo {
    SourceInfo {
        path: a.path().to_path_buf(),
        bytes_read: a.bytes_read(),
        // Views hold the archive; the registry only a weak reference; `a` is ours.
        users: (Arc::strong_count(a) as u64).saturating_sub(1),
    }
}

/// Forgets views whose sessions ended by themselves, for as long as the service
/// lives.
fn reap(service: Weak<Inner>, ended: mpsc::Receiver<Exit>) {
    while let Ok(exit) = ended.recv() {
        let Some(inner) = service.upgrade() else {
            break;
        };
        inner.ended(exit);
    }
}

fn not_found(which: &Which) -> Error {
    match which {
        Which::Key(k) => Error::Service(format!("the service has no view with key {k:?}")),
        Which::Mountpoint(m) => {
            Error::Service(format!("the service has no view on {}", m.display()))
        }
    }
}

/// The key of the view `which`.
fn find(views: &BTreeMap<String, Slot>, which: &Which) -> Result<String> {
    match which {
        Which::Key(k) if views.contains_key(k) => Ok(k.clone()),
        Which::Mountpoint(m) => {
            // As given, or with its parent resolved (the mountpoint itself is not: a
            // stale mount would fail).
            let resolved = match (m.parent(), m.file_name()) {
                (Some(p), Some(n)) => p.canonicalize().ok().map(|p| p.join(n)),
                _ => None,
            };
            views
                .iter()
                .find(|(_, s)| {
                    s.config.mountpoint == *m || Some(&s.config.mountpoint) == resolved.as_ref()
                })
                .map(|(k, _)| k.clone())
                .ok_or_else(|| not_found(which))
        }
        _ => Err(not_found(which)),
    }
}

/// A path of a request, checked: absolute and UTF-8 (the state file is JSON).
fn absolute(what: &str, p: &Path) -> Result<()> {
    if !p.is_absolute() {
        return Err(Error::Usage(format!(
            "{what} {} must be an absolute path",
            p.display()
        )));
    }
    if p.to_str().is_none() {
        return Err(Error::Usage(format!(
            "{what} {} is not valid UTF-8",
            p.display()
        )));
    }
    Ok(())
}

fn canonical(what: &'static str, p: &Path) -> Result<PathBuf> {
    p.canonicalize().map_err(|e| Error::io(what, p, e))
}

/// A view request checked on its own (not against the other views): its paths
/// absolute, existing and of the right kind, then resolved; its id maps valid; its
/// key set.
fn check(mut v: ViewConfig) -> Result<ViewConfig> {
    absolute("mountpoint", &v.mountpoint)?;
    match std::fs::metadata(&v.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::NotA {
                path: v.mountpoint,
                expected: "directory",
                detail: Some("a mountpoint must be one".into()),
            })
        }
        Err(e) => return Err(Error::io("cannot use mountpoint", &v.mountpoint, e)),
    }
    v.mountpoint = canonical("cannot use mountpoint", &v.mountpoint)?;
    if v.layers.is_empty() {
        return Err(Error::Usage(format!(
            "the view on {} needs at least one archive",
            v.mountpoint.display()
        )));
    }
    for layer in &mut v.layers {
        if crate::source::is_remote(layer) {
            continue; // a URL, opened (one HEAD) with the view
        }
        absolute("archive", layer)?;
        match std::fs::metadata(&*layer) {
            Ok(m) if m.is_file() => {}
            // An OCI image layout.
            Ok(m) if m.is_dir() && layer.join("oci-layout").is_file() => {}
            Ok(_) => {
                return Err(Error::NotA {
                    path: layer.clone(),
                    expected: "regular file",
                    detail: Some("archives are files".into()),
                })
            }
            Err(e) => return Err(Error::io("cannot open archive", &*layer, e)),
        }
        *layer = canonical("cannot open archive", layer)?;
    }
    if let Some(u) = &v.upper {
        absolute("upper dir", u)?;
        std::fs::create_dir_all(u).map_err(|e| Error::io("cannot create upper dir", u, e))?;
        v.upper = Some(canonical("cannot use upper dir", u)?);
    }
    IdMap::from_args(&v.uid_map, &v.gid_map, v.owner.as_deref())?;
    if v.key.is_empty() {
        v.key = v.mountpoint.display().to_string();
    }
    if v.key.len() > 4096 || v.key.chars().any(char::is_control) {
        return Err(Error::Usage(format!(
            "bad view key {:?}: at most 4096 bytes, no control characters",
            v.key
        )));
    }
    Ok(v)
}

/// Fails if `v`'s key, mountpoint or upper dir is another view's.
fn conflicts(views: &BTreeMap<String, Slot>, v: &ViewConfig) -> Result<()> {
    if let Some(s) = views.get(&v.key) {
        return Err(Error::Service(format!(
            "the service has a view with key {:?} already (on {})",
            v.key,
            s.config.mountpoint.display()
        )));
    }
    for (key, s) in views {
        if s.config.mountpoint == v.mountpoint {
            return Err(Error::InUse {
                path: v.mountpoint.clone(),
                holder: format!("snapfs service view {key:?}"),
            });
        }
        if let (Some(a), Some(b)) = (&s.config.upper, &v.upper) {
            if a == b {
                return Err(Error::InUse {
                    path: b.clone(),
                    holder: format!("snapfs service view {key:?}"),
                });
            }
        }
    }
    Ok(())
}
