//! Docker volumes as views of the service: the volume model behind the Docker volume
//! plugin ([`super::docker`]) and the `volume_*` requests of the control socket.
//!
//! A volume is a name, a snapshot (an archive, a stack `a:b:c` of them, or an image),
//! optionally an upper dir of its own (`writable=true`) and id maps. Its view (key
//! `volume:NAME`, mounted on `ROOT/volumes/NAME/data`, upper dir
//! `ROOT/volumes/NAME/upper`) is mounted once, on the first Docker Mount, and stays
//! until the last Unmount, however many containers use it: the Mount IDs are counted.
//! The volumes, with their Mount IDs, are recorded in `ROOT/volumes.json` (written
//! atomically), so a service restart lists them again and mounts them on the next
//! Mount. Snapshots cut a volume's changes (a delta, or a full standalone snapshot);
//! one of a volume in use is refused unless its containers are paused, and is then
//! cut through the view's freeze gate. A restore cuts the old state first, as a
//! pre-restore snapshot in `ROOT/pre-restore/` that snapfs keeps until the user
//! drops it ([`Service::volume_drop`]), then points the volume at the new snapshot with an empty upper dir.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::idmap::IdMap;
use crate::image::{Image, Select};
use crate::index::build::BuildOptions;
use crate::index::tree::Tree;
use crate::snapshot::cut;
use crate::snapshot::write::{OutputCompression, SnapshotWriter, WriterOptions};

use super::protocol::{Request, Response};
use super::{lock, Service, ViewConfig, ViewState, Which};

/// The volumes file's name in the service root.
pub const VOLUMES_FILE: &str = "volumes.json";
/// Its format version. 1: the first.
pub const VOLUMES_VERSION: u32 = 1;
/// The options a volume takes (`docker volume create -o KEY=VALUE`).
pub const OPTIONS: &str =
    "snapshot=PATH[:PATH...], writable=true|false, uid_map=C:H:N[,...], gid_map=C:H:N[,...]";

/// One volume as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Its Docker name.
    pub name: String,
    /// The snapshot it shows: absolute paths, bottom first, joined by `:`.
    pub snapshot: String,
    /// Whether it has an upper dir (changes are kept) or is read-only.
    #[serde(default)]
    pub writable: bool,
    /// uid map ranges, `container:host:count`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uid_map: Vec<String>,
    /// gid map ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gid_map: Vec<String>,
    /// Seconds since the epoch when it was created.
    #[serde(default)]
    pub created: u64,
    /// Docker Mount IDs that use it now (one per container mount).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub mounts: BTreeSet<String>,
    /// The states it was restored away from, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_restore: Vec<PreRestore>,
}

/// A state a restore kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreRestore {
    /// The old state as a snapshot (a stack `a:b:delta`): `restore` or
    /// `snapshot=` take it as it is.
    pub snapshot: String,
    /// Seconds since the epoch of the restore.
    pub at: u64,
}

/// A volume as `volume_inspect` and `volume_list` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// The record.
    #[serde(flatten)]
    pub volume: Volume,
    /// Where its view is mounted while used.
    pub mountpoint: PathBuf,
    /// Its upper dir (writable volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<PathBuf>,
    /// Whether its view is mounted now.
    pub mounted: bool,
}

/// What a snapshot or restore cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CutInfo {
    /// The file written (absent when there was nothing to cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `delta` or `full`.
    pub kind: String,
    /// SHA-256 of the file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// Entries in it.
    pub entries: u64,
    /// Its size.
    pub bytes: u64,
    /// Milliseconds the cut took.
    pub millis: u64,
    /// For a restore: the old state, kept (a snapshot stack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_restore: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumesFile {
    version: u32,
    volumes: Vec<Volume>,
}

/// The service's volumes.
pub struct Volumes {
    root: PathBuf,
    table: Mutex<BTreeMap<String, Volume>>,
    /// Serializes the operations that change volumes or their views.
    ops: Mutex<()>,
}

impl Volumes {
    /// The volumes recorded in `root` (none without a volumes file).
    pub fn load(root: &Path) -> Result<Volumes> {
        let path = root.join(VOLUMES_FILE);
        let table = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let f: VolumesFile = serde_json::from_str(&text).map_err(|e| {
                    Error::Service(format!(
                        "volumes file {} is unreadable ({e}); move it away to start empty",
                        path.display()
                    ))
                })?;
                if f.version != VOLUMES_VERSION {
                    return Err(Error::Service(format!(
                        "volumes file {} has version {}, this snapfs reads {VOLUMES_VERSION}",
                        path.display(),
                        f.version
                    )));
                }
                f.volumes.into_iter().map(|v| (v.name.clone(), v)).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io("cannot read volumes file", &path, e)),
        };
        Ok(Volumes {
            root: root.to_path_buf(),
            table: Mutex::new(table),
            ops: Mutex::new(()),
        })
    }

    fn save(&self, table: &BTreeMap<String, Volume>) -> Result<()> {
        let f = VolumesFile {
            version: VOLUMES_VERSION,
            volumes: table.values().cloned().collect(),
        };
        let mut text = serde_json::to_vec_pretty(&f)
            .map_err(|e| Error::Internal(format!("cannot encode volumes: {e}")))?;
        text.push(b'\n');
        super::state::write_atomic(&self.root, VOLUMES_FILE, &text, "cannot write")
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join("volumes").join(name)
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.dir(name).join("data")
    }

    fn upper(&self, v: &Volume) -> Option<PathBuf> {
        v.writable.then(|| self.dir(&v.name).join("upper"))
    }

    fn get(&self, name: &str) -> Result<Volume> {
        lock(&self.table)
            .get(name)
            .cloned()
            .ok_or_else(|| no_volume(name))
    }

    /// Changes the record of `name` and saves; the change is undone if the save fails.
    fn update(&self, name: &str, f: impl FnOnce(&mut Volume)) -> Result<Volume> {
        let mut table = lock(&self.table);
        let old = table.get(name).cloned().ok_or_else(|| no_volume(name))?;
        let mut new = old.clone();
        f(&mut new);
        table.insert(name.to_string(), new.clone());
        if let Err(e) = self.save(&table) {
            table.insert(name.to_string(), old);
            return Err(e);
        }
        Ok(new)
    }
}

fn no_volume(name: &str) -> Error {
    Error::Service(format!("no snapfs volume named {name:?}"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A volume name as Docker allows them: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 255
/// bytes (it names a directory).
pub fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && name.len() <= 255;
    if !ok {
        return Err(Error::Usage(format!(
            "bad volume name {name:?}: letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )));
    }
    Ok(())
}

/// The layers of a snapshot stack `a:b:c`, each checked: absolute, existing, an
/// archive file or an image (one image, for an input holding several).
pub fn check_snapshot(snapshot: &str) -> Result<Vec<PathBuf>> {
    if snapshot.is_empty() {
        return Err(Error::Usage(format!(
            "a snapfs volume needs -o snapshot=PATH (options: {OPTIONS})"
        )));
    }
    let mut layers = Vec::new();
    for part in snapshot.split(':') {
        let p = PathBuf::from(part);
        if !p.is_absolute() {
            return Err(Error::Usage(format!(
                "snapshot {part:?} must be an absolute path"
            )));
        }
        let m = std::fs::metadata(&p).map_err(|e| Error::io("cannot open snapshot", &p, e))?;
        if !(m.is_file() || (m.is_dir() && p.join("oci-layout").is_file())) {
            return Err(Error::NotA {
                path: p,
                expected: "snapshot",
                detail: Some("an archive file or an OCI image layout".into()),
            });
        }
        let p = p
            .canonicalize()
            .map_err(|e| Error::io("cannot open snapshot", &p, e))?;
        if p.to_str().is_none() {
            return Err(Error::Usage(format!(
                "snapshot {} is not valid UTF-8",
                p.display()
            )));
        }
        // An image is told from its content; it must hold one image (or say which).
        if Image::open(&p, &Select::default())?.is_none() {
            crate::archive::Archive::open(&p)?;
        }
        layers.push(p);
    }
    Ok(layers)
}

/// A volume from `docker volume create` options, every one checked.
pub fn from_options(name: &str, opts: &BTreeMap<String, String>) -> Result<Volume> {
    check_name(name)?;
    let mut snapshot = None;
    let mut writable = false;
    let mut uid_map = Vec::new();
    let mut gid_map = Vec::new();
    for (k, v) in opts {
        match k.as_str() {
            "snapshot" => snapshot = Some(v.clone()),
            "writable" => {
                writable = match v.as_str() {
                    "true" | "yes" | "1" | "" => true,
                    "false" | "no" | "0" => false,
                    _ => return Err(Error::Usage(format!("bad writable={v:?}: true or false"))),
                }
            }
            "uid_map" => uid_map = split_map(v),
            "gid_map" => gid_map = split_map(v),
            _ => {
                return Err(Error::Usage(format!(
                    "unknown volume option {k:?} (options: {OPTIONS})"
                )))
            }
        }
    }
    let layers = check_snapshot(snapshot.as_deref().unwrap_or(""))?;
    IdMap::from_args(&uid_map, &gid_map, None)?;
    Ok(Volume {
        name: name.to_string(),
        snapshot: join(&layers),
        writable,
        uid_map,
        gid_map,
        created: now(),
        mounts: BTreeSet::new(),
        pre_restore: Vec::new(),
    })
}

fn split_map(v: &str) -> Vec<String> {
    v.split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn join(layers: &[PathBuf]) -> String {
    layers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// The output compression a snapshot's name asks for.
fn compression_of(out: &Path) -> Result<OutputCompression> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("");
    Ok(if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        OutputCompression::Gzip { level: 1 }
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        OutputCompression::Zstd { level: 3 }
    } else if name.ends_with(".tar") {
        OutputCompression::None
    } else {
        return Err(Error::Usage(format!(
            "{}: name the snapshot .tar, .tar.gz, .tgz, .tar.zst or .tzst",
            out.display()
        )));
    })
}

fn view_key(name: &str) -> String {
    format!("volume:{name}")
}

impl Service {
    fn volumes(&self) -> &Volumes {
        &self.inner.volumes
    }

    fn volume_info(&self, v: Volume) -> VolumeInfo {
        let vols = self.volumes();
        let mounted = matches!(
            self.view(&Which::Key(view_key(&v.name))),
            Ok(i) if i.state == ViewState::Live
        );
        VolumeInfo {
            mountpoint: vols.mountpoint(&v.name),
            upper: vols.upper(&v),
            mounted,
            volume: v,
        }
    }

    /// Creates volume `name` from Docker's options; refused if the name is taken or
    /// an option is bad.
    pub fn volume_create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<VolumeInfo> {
        self.inner.refuse_if_closing()?;
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let v = from_options(name, opts)?;
        if !lock(&vols.table).contains_key(name) {
            // A view left recorded for a volume whose removal a crash cut short.
            self.volume_unmount_view(name)?;
            super::mounts::clean_stale(&vols.mountpoint(name))?;
        }
        {
            let mut table = lock(&vols.table);
            if let Some(old) = table.get(name) {
                return Err(Error::Service(format!(
                    "a snapfs volume named {name:?} exists already (snapshot {})",
                    old.snapshot
                )));
            }
            let dir = vols.dir(name);
            // Left by a volume removed while the service died: start afresh.
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| Error::io("cannot clear old volume dir", &dir, e))?;
            }
            let mp = vols.mountpoint(name);
            std::fs::create_dir_all(&mp).map_err(|e| Error::io("cannot create", &mp, e))?;
            if let Some(u) = vols.upper(&v) {
                std::fs::create_dir_all(&u).map_err(|e| Error::io("cannot create", &u, e))?;
            }
            table.insert(name.to_string(), v.clone());
            if let Err(e) = vols.save(&table) {
                table.remove(name);
                return Err(e);
            }
        }
        log::info!("volume {name:?} created from {}", v.snapshot);
        Ok(self.volume_info(v))
    }

    /// Removes volume `name`, its view and its upper dir; refused while a container
    /// uses it. Its pre-restore snapshots stay.
    pub fn volume_remove(&self, name: &str) -> Result<()> {
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let v = vols.get(name)?;
        if !v.mounts.is_empty() {
            return Err(in_use(&v, vols));
        }
        self.volume_unmount_view(name)?;
        {
            let mut table = lock(&vols.table);
            table.remove(name);
            vols.save(&table)?;
        }
        let dir = vols.dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::warn!("volume {name:?}: cannot remove {}: {e}", dir.display());
        }
        log::info!("volume {name:?} removed");
        Ok(())
    }

    /// Docker's Mount: the view is mounted on the first one and shared by the rest;
    /// returns the mountpoint.
    pub fn volume_mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        self.inner.refuse_if_closing()?;
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let v = vols.get(name)?;
        let key = view_key(name);
        let live = match self.view(&Which::Key(key.clone())) {
            Ok(i) if i.state == ViewState::Live => true,
            Ok(_) => {
                // Recorded but not mounted (it failed at a restart): try afresh.
                let _ = self.remove(&Which::Key(key.clone()), true);
                false
            }
            Err(_) => false,
        };
        if !live {
            let mp = vols.mountpoint(name);
            std::fs::create_dir_all(&mp).map_err(|e| Error::io("cannot create", &mp, e))?;
            super::mounts::clean_stale(&mp)?;
            let mut labels = BTreeMap::new();
            labels.insert("snapfs.volume".to_string(), name.to_string());
            self.add(ViewConfig {
                key,
                mountpoint: mp,
                layers: v.snapshot.split(':').map(PathBuf::from).collect(),
                upper: vols.upper(&v),
                uid_map: v.uid_map.clone(),
                gid_map: v.gid_map.clone(),
                options: vec!["allow_other".into()],
                labels,
                ..Default::default()
            })?;
        }
        vols.update(name, |v| {
            v.mounts.insert(id.to_string());
        })?;
        Ok(vols.mountpoint(name))
    }

    /// Docker activated the plugin: a dockerd (re)started. Without live-restore the
    /// containers of an earlier dockerd are gone, and Docker never unmounts them, so
    /// the Mount IDs recorded before are forgotten (or no volume could be removed or
    /// restored again). Returns how many were forgotten.
    pub fn volume_docker_started(&self) -> Result<usize> {
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let mut table = lock(&vols.table);
        let stale: usize = table.values().map(|v| v.mounts.len()).sum();
        if stale == 0 {
            return Ok(0);
        }
        let old = table.clone();
        for v in table.values_mut() {
            v.mounts.clear();
        }
        if let Err(e) = vols.save(&table) {
            *table = old;
            return Err(e);
        }
        log::warn!(
            "Docker activated the plugin: forgetting {stale} Mount ID(s) of its previous run"
        );
        Ok(stale)
    }

    /// Docker's Unmount: the view is unmounted with the last user.
    pub fn volume_unmount(&self, name: &str, id: &str) -> Result<()> {
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let v = vols.update(name, |v| {
            v.mounts.remove(id);
        })?;
        if v.mounts.is_empty() {
            self.volume_unmount_view(name)?;
        }
        Ok(())
    }

    /// Unmounts the view of `name` if the service has one (busy: detached lazily).
    fn volume_unmount_view(&self, name: &str) -> Result<()> {
        let which = Which::Key(view_key(name));
        if self.view(&which).is_err() {
            return Ok(());
        }
        match self.remove(&which, false) {
            Err(Error::Busy { .. }) => self.remove(&which, true),
            other => other,
        }
    }

    /// Volume `name`.
    pub fn volume_inspect(&self, name: &str) -> Result<VolumeInfo> {
        Ok(self.volume_info(self.volumes().get(name)?))
    }

    /// Every volume, by name.
    pub fn volume_list(&self) -> Vec<VolumeInfo> {
        let all: Vec<Volume> = lock(&self.volumes().table).values().cloned().collect();
        all.into_iter().map(|v| self.volume_info(v)).collect()
    }

    /// Cuts volume `name` to `output`: its changes as a delta (a writable volume),
    /// or with `full` the whole view as a standalone snapshot. While a container
    /// uses the volume, only with `paused` (the caller paused them): the view's
    /// gate is then closed for the cut.
    pub fn volume_snapshot(
        &self,
        name: &str,
        output: &Path,
        full: bool,
        paused: bool,
    ) -> Result<CutInfo> {
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let v = vols.get(name)?;
        if !output.is_absolute() {
            return Err(Error::Usage(format!(
                "snapshot output {} must be an absolute path",
                output.display()
            )));
        }
        if !full && !v.writable {
            return Err(Error::Usage(format!(
                "volume {name:?} is read-only: it has no changes to cut; use --full"
            )));
        }
        if !v.mounts.is_empty() && !paused {
            return Err(Error::InUse {
                path: vols.mountpoint(name),
                holder: format!(
                    "{} running container(s) of volume {name:?}; stop them, or snapshot with --pause",
                    v.mounts.len()
                ),
            });
        }
        self.cut(&v, output, full)
    }

    /// Cuts `v` (live through its gate, or from a tree opened for the cut).
    fn cut(&self, v: &Volume, output: &Path, full: bool) -> Result<CutInfo> {
        let vols = self.volumes();
        let compression = compression_of(output)?;
        let started = std::time::Instant::now();
        let key = view_key(&v.name);
        let gate = lock(&self.inner.gates)
            .get(&key)
            .and_then(std::sync::Weak::upgrade);
        let upper = vols.upper(v);
        let opts = WriterOptions {
            compression,
            ..Default::default()
        };
        let summary = match gate {
            Some(gate) => {
                // Dirty pages of the paused containers reach the view first.
                sync_fs(&vols.mountpoint(&v.name));
                let _frozen = gate.freeze();
                write_cut(gate.tree(), upper.as_deref(), output, full, opts)?
            }
            None => {
                let config = ViewConfig {
                    key,
                    mountpoint: vols.mountpoint(&v.name),
                    layers: v.snapshot.split(':').map(PathBuf::from).collect(),
                    upper: upper.clone(),
                    ..Default::default()
                };
                let tree: Arc<dyn Tree> =
                    Arc::from(self.inner.open_tree(&config, &BuildOptions::default())?);
                write_cut(tree, upper.as_deref(), output, full, opts)?
            }
        };
        log::info!(
            "volume {:?} cut to {} ({} entries)",
            v.name,
            summary.path.display(),
            summary.entries
        );
        Ok(CutInfo {
            path: Some(summary.path),
            kind: if full { "full" } else { "delta" }.into(),
            sha256: summary.sha256,
            entries: summary.entries,
            bytes: summary.bytes,
            millis: started.elapsed().as_millis() as u64,
            pre_restore: None,
        })
    }

    /// Points volume `name` at `snapshot` (a stack `a:b:c`) for its next use. Its
    /// old state is cut first (its changes as a delta in `ROOT/pre-restore/`) and
    /// kept as a pre-restore snapshot, named in the answer; its upper dir starts
    /// empty. Refused while a container uses it.
    pub fn volume_restore(&self, name: &str, snapshot: &str) -> Result<CutInfo> {
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let v = vols.get(name)?;
        if !v.mounts.is_empty() {
            return Err(in_use(&v, vols));
        }
        let layers = check_snapshot(snapshot)?;
        self.volume_unmount_view(name)?;
        let started = std::time::Instant::now();
        let mut info = CutInfo {
            kind: "delta".into(),
            ..Default::default()
        };
        let mut kept = v.snapshot.clone();
        if let Some(upper) = vols.upper(&v) {
            let changed = upper.exists() && !crate::upper::changes(&upper)?.is_empty();
            if changed {
                let dir = vols.root.join("pre-restore");
                std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let out = dir.join(format!("{name}-{stamp}.tar.gz"));
                info = self.cut(&v, &out, false)?;
                kept = format!("{kept}:{}", out.display());
            }
            // The old upper dir goes only once the old state is safe.
            let old = upper.with_extension(format!("old-{}", now()));
            std::fs::rename(&upper, &old).map_err(|e| Error::io("cannot move", &upper, e))?;
            std::fs::create_dir_all(&upper).map_err(|e| Error::io("cannot create", &upper, e))?;
            if let Err(e) = std::fs::remove_dir_all(&old) {
                log::warn!("volume {name:?}: cannot remove {}: {e}", old.display());
            }
        }
        let new = join(&layers);
        vols.update(name, |v| {
            v.pre_restore.push(PreRestore {
                snapshot: kept.clone(),
                at: now(),
            });
            v.snapshot = new.clone();
        })?;
        log::info!("volume {name:?} restored to {new}; old state kept as {kept}");
        info.millis = started.elapsed().as_millis() as u64;
        info.pre_restore = Some(kept);
        Ok(info)
    }

    /// Drops a kept pre-restore state of volume `name` (`snapshot` as `inspect` lists
    /// it): it leaves the list, and its delta in `ROOT/pre-restore/` is deleted unless
    /// a volume's snapshot or another kept state still names it.
    pub fn volume_drop(&self, name: &str, snapshot: &str) -> Result<()> {
        let vols = self.volumes();
        let _op = lock(&vols.ops);
        let v = vols.get(name)?;
        if !v.pre_restore.iter().any(|p| p.snapshot == snapshot) {
            return Err(Error::Service(format!(
                "volume {name:?} keeps no pre-restore state {snapshot:?} (see snapfs volume inspect)"
            )));
        }
        vols.update(name, |v| v.pre_restore.retain(|p| p.snapshot != snapshot))?;
        let table = lock(&vols.table);
        let named = |f: &str| {
            table.values().any(|v| {
                v.snapshot.split(':').any(|l| l == f)
                    || v.pre_restore
                        .iter()
                        .any(|p| p.snapshot.split(':').any(|l| l == f))
            })
        };
        let kept_dir = vols.root.join("pre-restore");
        for f in snapshot.split(':') {
            if Path::new(f).parent() == Some(kept_dir.as_path()) && !named(f) {
                if let Err(e) = std::fs::remove_file(f) {
                    log::warn!("cannot remove {f}: {e}");
                }
            }
        }
        Ok(())
    }

    /// Serves a `volume_*` request of the control socket.
    pub(super) fn volume_request(&self, req: Request) -> Result<Response> {
        let with_volume = |v| Response {
            volume: Some(v),
            ..Response::ok()
        };
        let with_cut = |c| Response {
            cut: Some(c),
            ..Response::ok()
        };
        Ok(match req {
            Request::VolumeCreate { name, opts } => with_volume(self.volume_create(&name, &opts)?),
            Request::VolumeRemove { name } => {
                self.volume_remove(&name)?;
                Response::ok()
            }
            Request::VolumeList {} => Response {
                volume_list: Some(self.volume_list()),
                ..Response::ok()
            },
            Request::VolumeInspect { name } => with_volume(self.volume_inspect(&name)?),
            Request::VolumeSnapshot {
                name,
                output,
                full,
                paused,
            } => with_cut(self.volume_snapshot(&name, &output, full, paused)?),
            Request::VolumeRestore { name, snapshot } => {
                with_cut(self.volume_restore(&name, &snapshot)?)
            }
            Request::VolumeDrop { name, snapshot } => {
                self.volume_drop(&name, &snapshot)?;
                Response::ok()
            }
            other => return Err(Error::Internal(format!("not a volume request: {other:?}"))),
        })
    }
}

fn in_use(v: &Volume, vols: &Volumes) -> Error {
    Error::InUse {
        path: vols.mountpoint(&v.name),
        holder: format!(
            "{} container(s) using volume {:?}; stop them first",
            v.mounts.len(),
            v.name
        ),
    }
}

fn write_cut(
    tree: Arc<dyn Tree>,
    upper: Option<&Path>,
    output: &Path,
    full: bool,
    opts: WriterOptions,
) -> Result<crate::snapshot::write::SnapshotSummary> {
    let mut writer = SnapshotWriter::create(output, opts)?;
    if full {
        cut::cut_full(tree, &mut writer)?;
    } else {
        let changes = match upper {
            Some(u) => crate::upper::changes(u)?,
            None => Vec::new(),
        };
        cut::cut_delta(tree, &changes, &mut writer)?;
    }
    writer.finish()
}

/// syncfs(2) on the file system mounted at `mp` (errors only logged: the cut goes on).
fn sync_fs(mp: &Path) {
    match File::open(mp) {
        // SAFETY: syncfs on a descriptor we own.
        Ok(f) => {
            if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                log::warn!(
                    "syncfs {}: {}",
                    mp.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Err(e) => log::warn!("cannot open {}: {e}", mp.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn tar_at(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        let mut b = tar::Builder::new(File::create(&p).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "a.txt", &b"abc"[..]).unwrap();
        b.finish().unwrap();
        p
    }

    #[test]
    fn options_are_checked_one_clear_error_each() {
        let dir = tempfile::tempdir().unwrap();
        let t = tar_at(dir.path(), "s.tar");
        let ts = t.to_str().unwrap();
        let v = from_options("v1", &opts(&[("snapshot", ts), ("writable", "true")])).unwrap();
        assert!(v.writable);
        assert_eq!(v.snapshot, t.canonicalize().unwrap().to_str().unwrap());
        let stack = format!("{ts}:{ts}");
        assert_eq!(
            from_options("v2", &opts(&[("snapshot", &stack)]))
                .unwrap()
                .snapshot
                .split(':')
                .count(),
            2
        );
        let missing = dir.path().join("nope.tar");
        for (name, o, why) in [
            ("v", opts(&[]), "needs -o snapshot=PATH"),
            (
                "v",
                opts(&[("snapshot", missing.to_str().unwrap())]),
                "cannot open snapshot",
            ),
            ("v", opts(&[("snapshot", "rel.tar")]), "absolute"),
            ("v", opts(&[("snapshot", ts), ("uid_map", "0:x:1")]), "uid"),
            (
                "v",
                opts(&[("snapshot", ts), ("writable", "maybe")]),
                "writable",
            ),
            (
                "v",
                opts(&[("snapshot", ts), ("size", "1G")]),
                "unknown volume option",
            ),
            ("-v", opts(&[("snapshot", ts)]), "bad volume name"),
            ("a/b", opts(&[("snapshot", ts)]), "bad volume name"),
        ] {
            let e = from_options(name, &o).unwrap_err().to_string();
            assert!(e.contains(why), "{o:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn volume_requests_parse() {
        let r = super::super::protocol::parse(
            br#"{"op":"volume_snapshot","name":"v","output":"/o.tar.gz","paused":true}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::VolumeSnapshot {
                name: "v".into(),
                output: "/o.tar.gz".into(),
                full: false,
                paused: true
            }
        );
        let e = super::super::protocol::parse(br#"{"op":"volume_restore","name":"v"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `snapshot`"), "{e}");
        assert!(compression_of(Path::new("/x.zip")).is_err());
        assert!(matches!(
            compression_of(Path::new("/x.tzst")),
            Ok(OutputCompression::Zstd { .. })
        ));
    }

    #[test]
    fn volumes_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let t = tar_at(dir.path(), "s.tar");
        let vols = Volumes::load(dir.path()).unwrap();
        let mut v = from_options("v", &opts(&[("snapshot", t.to_str().unwrap())])).unwrap();
        v.mounts.insert("m1".into());
        lock(&vols.table).insert("v".into(), v.clone());
        vols.save(&lock(&vols.table)).unwrap();
        let again = Volumes::load(dir.path()).unwrap();
        assert_eq!(again.get("v").unwrap(), v);
        assert!(again
            .get("w")
            .unwrap_err()
            .to_string()
            .contains("no snapfs volume"));
        assert!(!dir.path().join(".volumes.json.tmp").exists());
    }
}
