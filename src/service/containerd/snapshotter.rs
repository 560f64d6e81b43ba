//! The snapshotter: containerd's snapshot operations over the [`Snapshots`] model and
//! the [`Service`]'s views, in `ROOT/containerd/`:
//!
//! ```text
//! snapshots.json   the model
//! mnt/ID/          the FUSE view of an active or view snapshot
//! upper/ID/        the upper dir of an active snapshot
//! scratch/ID/      what containerd's differ unpacks for a layer whose blob is known
//! layers/          committed layers: blob links (sha256-HEX, a hard link of the
//!                  content store's blob when possible) and cut deltas (ID.tar.zst)
//! empty.tar        the base layer of snapshots without a parent
//! ```
//!
//! Blocking calls (mount, unmount, cut); the gRPC adapter runs them off its runtime.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result, SnapshotCode};
use crate::index::build::BuildOptions;
use crate::index::tree::Tree;
use crate::service::snapshots::{now, refused, Content, Kind, Snapshot, Snapshots};
use crate::service::{Service, ViewConfig, Which};
use crate::snapshot::cut;
use crate::snapshot::write::{OutputCompression, SnapshotWriter, WriterOptions};
use crate::upper::UpperTree;

use super::content::FoundLayer;

/// The snapshotter's part of the service: the model and its directories.
#[derive(Clone)]
pub struct Snapshotter {
    inner: Arc<Inner>,
}

struct Inner {
    service: Service,
    dir: PathBuf,
    model: Mutex<Snapshots>,
    /// Layer blobs being indexed in the background, by path.
    indexing: Mutex<HashMap<PathBuf, JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(what, p, e)
}

/// The mounts containerd gets for a snapshot: (type, source, options).
pub type MountSpec = (String, PathBuf, Vec<String>);

impl Snapshotter {
    /// The snapshotter of `service`, its model loaded from `ROOT/containerd/`; every
    /// active or view snapshot whose view the service lost is mounted again.
    pub fn open(service: Service) -> Result<Snapshotter> {
        let dir = service.root().join("containerd");
        for d in ["mnt", "upper", "scratch", "layers"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(io("cannot create", &p))?;
        }
        let empty = dir.join("empty.tar");
        if !empty.exists() {
            let tmp = dir.join(".empty.tar.tmp");
            std::fs::write(&tmp, vec![0u8; 10240]).map_err(io("cannot write", &tmp))?;
            std::fs::rename(&tmp, &empty).map_err(io("cannot write", &empty))?;
        }
        let model = Snapshots::load(&dir)?;
        let s = Snapshotter {
            inner: Arc::new(Inner {
                service,
                dir,
                model: Mutex::new(model),
                indexing: Mutex::new(HashMap::new()),
            }),
        };
        s.ensure_views();
        Ok(s)
    }

    /// Mounts again the views of snapshots that the service does not serve (a crash
    /// between recording a snapshot and mounting its view).
    fn ensure_views(&self) {
        let model = lock(&self.inner.model);
        for s in model.all() {
            if let Content::View { view, .. } = &s.content {
                if self.inner.service.view(&Which::Key(view.clone())).is_err() {
                    match self.view_config(&model, s) {
                        Ok(cfg) => {
                            if let Err(e) = self.inner.service.add(cfg) {
                                log::error!(
                                    "snapshot {:?}: its view cannot be mounted: {e}",
                                    s.name
                                );
                            }
                        }
                        Err(e) => log::error!("snapshot {:?}: {e}", s.name),
                    }
                }
            }
        }
    }

    fn view_config(&self, model: &Snapshots, s: &Snapshot) -> Result<ViewConfig> {
        let Content::View {
            view,
            mountpoint,
            upper,
        } = &s.content
        else {
            return Err(Error::Internal(format!(
                "snapshot {:?} has no view",
                s.name
            )));
        };
        let mut layers = model.chain(s.parent.as_deref())?;
        if layers.is_empty() {
            layers.push(self.inner.dir.join("empty.tar"));
        }
        let mut options = vec!["allow_other".to_string(), "suid".into(), "dev".into()];
        if upper.is_none() {
            options.push("ro".into());
        }
        let mut labels = BTreeMap::new();
        labels.insert("containerd.snapshot".to_string(), s.name.clone());
        Ok(ViewConfig {
            key: view.clone(),
            mountpoint: mountpoint.clone(),
            layers,
            upper: upper.clone(),
            options,
            labels,
            ..Default::default()
        })
    }

    fn mounts_of(s: &Snapshot) -> Result<Vec<MountSpec>> {
        let ro = s.kind == Kind::View;
        let (src, opts) = match &s.content {
            Content::View { mountpoint, .. } => (mountpoint.clone(), ro),
            Content::Scratch { dir, .. } => (dir.clone(), false),
            Content::Layer { .. } => {
                return Err(refused(
                    SnapshotCode::FailedPrecondition,
                    format!("snapshot {:?} is committed; it has no mounts", s.name),
                ))
            }
        };
        let mode = if opts { "ro" } else { "rw" };
        Ok(vec![(
            "bind".into(),
            src,
            vec!["rbind".into(), mode.into()],
        )])
    }

    /// A committed snapshot `name` on `parent` for a layer blob found in containerd's
    /// content store (the remote path: containerd gets AlreadyExists and never
    /// unpacks it).
    pub fn add_layer(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        blob: &FoundLayer,
    ) -> Result<()> {
        let mut model = lock(&self.inner.model);
        model.check_new(name, parent)?;
        let path = self.link_blob(blob)?;
        let id = model.next_id();
        model.insert(Snapshot {
            name: name.into(),
            parent: parent.map(Into::into),
            kind: Kind::Committed,
            labels,
            created: now(),
            updated: now(),
            id,
            content: Content::Layer {
                path: path.clone(),
                owned: true,
            },
        })?;
        model.save()?;
        drop(model);
        self.index_in_background(&path);
        log::info!(
            "snapshot {name:?}: layer {} served from its blob, not unpacked",
            blob.digest
        );
        Ok(())
    }

    /// Builds (and stores) the index of a layer blob on a thread of its own, so that
    /// the first view of the layer finds it: while containerd's differ decompresses
    /// the layer, or right after a layer is recorded from its blob.
    fn index_in_background(&self, path: &Path) {
        let mut running = lock(&self.inner.indexing);
        running.retain(|_, h| !h.is_finished());
        if running.contains_key(path) {
            return;
        }
        let p = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("index-layer".into())
            .spawn(move || {
                let t = Instant::now();
                match crate::view::open_archive(&p, &BuildOptions::default(), 1 << 20) {
                    Ok(_) => log::info!(
                        "layer {} indexed in {:.2} s",
                        p.display(),
                        t.elapsed().as_secs_f64()
                    ),
                    Err(e) => log::warn!("layer {} not indexed: {e}", p.display()),
                }
            });
        match spawned {
            Ok(h) => {
                running.insert(path.to_path_buf(), h);
            }
            Err(e) => log::warn!("cannot start indexing {}: {e}", path.display()),
        }
    }

    /// Waits for the background indexing of `path`, if any.
    fn wait_index(&self, path: &Path) {
        let h = lock(&self.inner.indexing).remove(path);
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// The committed snapshot for target `target` on `parent`, if recorded.
    pub fn has_target(&self, target: &str, parent: Option<&str>) -> bool {
        lock(&self.inner.model)
            .find_target(target, parent)
            .is_some()
    }

    /// `layers/sha256-HEX`: a hard link of the blob (so that the index lives in our
    /// directory and the blob stays while we use it), or a symlink across file
    /// systems.
    fn link_blob(&self, blob: &FoundLayer) -> Result<PathBuf> {
        let name = blob.digest.replace(':', "-");
        let path = self.inner.dir.join("layers").join(name);
        if path.exists() {
            return Ok(path);
        }
        if std::fs::hard_link(&blob.path, &path).is_err() {
            std::os::unix::fs::symlink(&blob.path, &path).map_err(io("cannot link", &path))?;
        }
        Ok(path)
    }

    /// The blob link of a scratch snapshot's blob: `blob` itself, or, for a blob
    /// that was still being fetched at Prepare (a content store path), a new link
    /// (and its index built in the background).
    fn linked(&self, blob: &Path) -> Result<PathBuf> {
        if blob.starts_with(self.inner.dir.join("layers")) {
            return Ok(blob.to_path_buf());
        }
        let hex = blob
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = self.link_blob(&FoundLayer {
            digest: format!("sha256:{hex}"),
            path: blob.to_path_buf(),
        })?;
        self.index_in_background(&path);
        Ok(path)
    }

    /// Prepare (writable) or View (read-only) `key` on `parent`. With `scratch`, an
    /// active snapshot that containerd's differ unpacks a known layer blob into.
    pub fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
        scratch: Option<FoundLayer>,
    ) -> Result<Vec<MountSpec>> {
        let inner = &*self.inner;
        let (snap, cfg) = {
            let mut model = lock(&inner.model);
            model.check_new(key, parent)?;
            let id = model.next_id();
            let content = match &scratch {
                Some(blob) => {
                    let dir = inner.dir.join("scratch").join(id.to_string());
                    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
                    // A blob containerd is still fetching (a pull) is linked at
                    // Commit, once the differ has read it.
                    let blob = if blob.path.is_file() {
                        let b = self.link_blob(blob)?;
                        self.index_in_background(&b);
                        b
                    } else {
                        blob.path.clone()
                    };
                    Content::Scratch { dir, blob }
                }
                None => {
                    let mountpoint = inner.dir.join("mnt").join(id.to_string());
                    std::fs::create_dir_all(&mountpoint)
                        .map_err(io("cannot create", &mountpoint))?;
                    Content::View {
                        view: format!("containerd/{id}"),
                        mountpoint,
                        upper: (kind == Kind::Active)
                            .then(|| inner.dir.join("upper").join(id.to_string())),
                    }
                }
            };
            let snap = Snapshot {
                name: key.into(),
                parent: parent.map(Into::into),
                kind,
                labels,
                created: now(),
                updated: now(),
                id,
                content,
            };
            let cfg = match snap.content {
                Content::View { .. } => Some(self.view_config(&model, &snap)?),
                _ => None,
            };

            model.insert(snap.clone())?;
            // Recorded first: a crash from here on finds the snapshot (and mounts its
            // view) at restart.
            model.save()?;
            (snap, cfg)
        };
        if let Some(cfg) = cfg {
            // A layer indexed in the background is opened once its index is there,
            // not indexed a second time.
            for l in &cfg.layers {
                self.wait_index(l);
            }
            if let Err(e) = inner.service.add(cfg) {
                let mut model = lock(&inner.model);
                let _ = model.remove(key);
                let _ = model.save();
                self.discard(&snap);
                return Err(e);
            }
        }
        Self::mounts_of(&snap)
    }

    /// The mounts of `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>> {
        let model = lock(&self.inner.model);
        Self::mounts_of(model.get(key)?)
    }

    /// The snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Snapshot> {
        lock(&self.inner.model).get(key).cloned()
    }

    /// Every snapshot.
    pub fn list(&self) -> Vec<Snapshot> {
        lock(&self.inner.model).all().cloned().collect()
    }

    /// Sets labels (see [`Snapshots::update`]).
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot> {
        let mut model = lock(&self.inner.model);
        let s = model.update(name, labels, paths)?;
        model.save()?;
        Ok(s)
    }

    /// Bytes and inodes a snapshot uses on disk: its upper or scratch dir, or its
    /// layer file (a blob shared with the content store counts as its size).
    pub fn usage(&self, key: &str) -> Result<(i64, i64)> {
        let s = self.stat(key)?;
        Ok(match &s.content {
            Content::Layer { path, .. } => (
                std::fs::metadata(path).map(|m| m.len() as i64).unwrap_or(0),
                1,
            ),
            Content::View { upper: Some(u), .. } => du(&u.join("tree")),
            Content::View { upper: None, .. } => (0, 0),
            Content::Scratch { dir, .. } => du(dir),
        })
    }

    /// Commits the active `key` as `name`: its upper changes cut as a self-indexed
    /// delta layer (time proportional to the changes), or, for a scratch snapshot,
    /// the known layer blob.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let inner = &*self.inner;
        let s = lock(&inner.model).check_commit(name, key)?.clone();
        let layer = match &s.content {
            // The differ is done; the index may still be being built (a view of
            // the layer waits for it).
            Content::Scratch { blob, .. } => Content::Layer {
                path: self.linked(blob)?,
                owned: true,
            },
            Content::View {
                view,
                upper: Some(upper),
                ..
            } => {
                inner.service.remove(&Which::Key(view.clone()), false)?;
                let out = inner.dir.join("layers").join(format!("{}.tar.zst", s.id));
                let cut = self.cut(s.parent.as_deref(), upper, &out);
                if let Err(e) = cut {
                    // Serve it again: the snapshot stays active.
                    let model = lock(&inner.model);
                    if let Ok(cfg) = self.view_config(&model, &s) {
                        let _ = inner.service.add(cfg);
                    }
                    return Err(e);
                }
                Content::Layer {
                    path: out,
                    owned: true,
                }
            }
            Content::View { upper: None, .. } | Content::Layer { .. } => {
                return Err(refused(
                    SnapshotCode::FailedPrecondition,
                    format!("snapshot {key:?} is not active"),
                ))
            }
        };
        {
            let mut model = lock(&inner.model);
            model.commit(name, key, labels, layer)?;
            model.save()?;
        }
        self.discard(&s);
        log::info!("snapshot {key:?} committed as {name:?}");
        Ok(())
    }

    fn cut(&self, parent: Option<&str>, upper: &Path, out: &Path) -> Result<()> {
        let mut layers = lock(&self.inner.model).chain(parent)?;
        if layers.is_empty() {
            layers.push(self.inner.dir.join("empty.tar"));
        }
        let lower = crate::view::open_stack(&layers, &BuildOptions::default(), 64 << 20)?;
        let changes = crate::upper::changes(upper)?;
        let view: Arc<dyn Tree> = Arc::new(UpperTree::new(lower, upper)?);
        let opts = WriterOptions {
            compression: OutputCompression::Zstd { level: 3 },
            progress: false,
            ..Default::default()
        };
        let mut writer = SnapshotWriter::create(out, opts)?;
        cut::cut_delta(view, &changes, &mut writer)?;
        let summary = writer.finish()?;
        log::info!(
            "cut {}: {} entries, {} bytes in {:.2} s",
            out.display(),
            summary.entries,
            summary.bytes,
            summary.seconds
        );
        Ok(())
    }

    /// Removes `key` (no children): its view unmounted, its directories or its own
    /// layer file deleted.
    pub fn remove(&self, key: &str) -> Result<()> {
        let inner = &*self.inner;
        let s = lock(&inner.model).check_remove(key)?.clone();
        if let Content::View { view, .. } = &s.content {
            let which = Which::Key(view.clone());
            if inner.service.view(&which).is_ok() {
                if let Err(e) = inner.service.remove(&which, false) {
                    log::warn!("snapshot {key:?}: {e}; detaching its view");
                    inner.service.remove(&which, true)?;
                }
            }
        }
        {
            let mut model = lock(&inner.model);
            model.remove(key)?;
            model.save()?;
        }
        self.discard(&s);
        Ok(())
    }

    /// Deletes the directories (and own layer file) of a snapshot that is gone.
    fn discard(&self, s: &Snapshot) {
        let rm = |p: &Path| {
            if let Err(e) = std::fs::remove_dir_all(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", p.display());
                }
            }
        };
        match &s.content {
            Content::View {
                mountpoint, upper, ..
            } => {
                let _ = std::fs::remove_dir(mountpoint);
                if let Some(u) = upper {
                    rm(u);
                }
            }
            Content::Scratch { dir, .. } => rm(dir),
            Content::Layer { path, owned: true } => {
                let used = lock(&self.inner.model).all().any(
                    |o| matches!(&o.content, Content::Layer { path: p, .. } | Content::Scratch { blob: p, .. } if p == path),
                );
                if !used {
                    let _ = std::fs::remove_file(path);
                    let mut idx = path.clone().into_os_string();
                    idx.push(".snapfs-idx");
                    let _ = std::fs::remove_file(idx);
                }
            }
            Content::Layer { .. } => {}
        }
    }

    /// Removes what no snapshot uses from the snapshotter's directories.
    pub fn cleanup(&self) -> Result<()> {
        let model = lock(&self.inner.model);
        let mut used: Vec<PathBuf> = Vec::new();
        for s in model.all() {
            match &s.content {
                Content::Layer { path, .. } => used.push(path.clone()),
                Content::View {
                    mountpoint, upper, ..
                } => {
                    used.push(mountpoint.clone());
                    used.extend(upper.clone());
                }
                Content::Scratch { dir, blob } => {
                    used.push(dir.clone());
                    used.push(blob.clone());
                }
            }
        }
        drop(model);
        for d in ["upper", "scratch", "layers", "mnt"] {
            let dir = self.inner.dir.join(d);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let base = p
                    .to_string_lossy()
                    .trim_end_matches(".snapfs-idx")
                    .to_string();
                if used.iter().any(|u| u.as_os_str() == base.as_str()) {
                    continue;
                }
                let r = if d == "mnt" {
                    std::fs::remove_dir(&p)
                } else if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                match r {
                    Ok(()) => log::info!("cleanup: removed {}", p.display()),
                    Err(e) => log::warn!("cleanup: cannot remove {}: {e}", p.display()),
                }
            }
        }
        Ok(())
    }
}

/// Bytes (allocated) and inodes under `dir`.
fn du(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0i64;
    let mut inodes = 0i64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            inodes += 1;
            bytes = bytes.saturating_add((m.blocks() as i64).saturating_mul(512));
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceConfig;

    fn code(e: Error) -> SnapshotCode {
        match e {
            Error::Snapshot { code, .. } => code,
            other => panic!("not a snapshot error: {other}"),
        }
    }

    /// The remote path without containerd: a layer recorded from its blob is a
    /// committed snapshot found by its target label, its blob linked (not copied) and
    /// indexed; removal unlinks it; cleanup leaves what is used.
    #[test]
    fn layers_from_blobs_are_committed_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let blob = blobs.join("layer");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/x", &b"abc"[..]).unwrap();
        std::fs::write(&blob, b.into_inner().unwrap()).unwrap();
        let service = Service::start(ServiceConfig {
            root: dir.path().join("root"),
            cache_bytes: 64 << 20,
            threads: Some(1),
        })
        .unwrap();
        let sn = Snapshotter::open(service.clone()).unwrap();
        let found = FoundLayer {
            digest: format!("sha256:{}", "a".repeat(64)),
            path: blob.clone(),
        };
        let mut labels = BTreeMap::new();
        labels.insert(
            super::super::LABEL_REF.to_string(),
            "sha256:chain".to_string(),
        );
        sn.add_layer("sha256:chain", None, labels.clone(), &found)
            .unwrap();
        assert!(sn.has_target("sha256:chain", None));
        assert_eq!(
            code(
                sn.add_layer("sha256:chain", None, labels, &found)
                    .unwrap_err()
            ),
            SnapshotCode::AlreadyExists
        );
        let s = sn.stat("sha256:chain").unwrap();
        assert_eq!(s.kind, Kind::Committed);
        let Content::Layer { path, .. } = &s.content else {
            panic!("{s:?}")
        };
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(path).unwrap().ino(),
            std::fs::metadata(&blob).unwrap().ino(),
            "the blob is linked, not copied"
        );
        assert_eq!(
            code(sn.mounts("sha256:chain").unwrap_err()),
            SnapshotCode::FailedPrecondition
        );
        let size = std::fs::metadata(&blob).unwrap().len() as i64;
        assert_eq!(sn.usage("sha256:chain").unwrap().0, size);
        sn.wait_index(path);
        if let Err(e) = crate::view::open_archive(path, &BuildOptions::default(), 1 << 20) {
            panic!("{e}");
        }
        let mut idx = path.clone().into_os_string();
        idx.push(".snapfs-idx");
        assert!(
            Path::new(&idx).exists(),
            "the layer was not indexed: {:?}",
            std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect::<Vec<_>>()
        );
        sn.cleanup().unwrap();
        assert!(path.exists());
        sn.remove("sha256:chain").unwrap();
        assert!(!path.exists() && !Path::new(&idx).exists());
        assert!(blob.exists(), "the content store's blob stays");
        assert_eq!(
            code(sn.stat("sha256:chain").unwrap_err()),
            SnapshotCode::NotFound
        );
        let again = Snapshotter::open(service).unwrap();
        assert!(again.list().is_empty());
    }
}
