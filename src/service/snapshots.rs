//! The snapshot model behind the containerd snapshotter: snapshots by key, each with
//! a parent, a kind (active, view, committed) and labels, with containerd's rules
//! (keys unique, parents committed, commit only of an active snapshot, no removal
//! of a snapshot with children), persisted in `snapshots.json` in its directory
//! (temporary file, fsync, rename, fsync of the directory). Pure bookkeeping: what
//! is mounted where is the snapshotter's business ([`crate::service::containerd`]);
//! this module only records which layer file a committed snapshot stands for and
//! what an active one holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, SnapshotCode};

/// The model's file in its directory.
pub const SNAPSHOTS_FILE: &str = "snapshots.json";
/// Its format version. 1: the first.
pub const SNAPSHOTS_VERSION: u32 = 1;

/// A snapshot's kind, as containerd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a committed parent (`View`).
    View,
    /// Writable (`Prepare`), until committed.
    Active,
    /// Immutable; a parent for others.
    Committed,
}

/// What a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Content {
    /// A committed layer: one archive file (a layer blob of containerd's content
    /// store, or a delta cut at commit).
    Layer {
        /// The archive.
        path: PathBuf,
        /// True if the snapshotter wrote it (removed with the snapshot).
        owned: bool,
    },
    /// An active or view snapshot served as a snapfs view.
    View {
        /// The service view's key.
        view: String,
        /// Its mountpoint.
        mountpoint: PathBuf,
        /// Its upper dir (none for a read-only view).
        upper: Option<PathBuf>,
    },
    /// An active snapshot that containerd's differ unpacks a layer into, whose blob
    /// is known: what is unpacked in `dir` is thrown away at commit, and the
    /// committed snapshot points at `blob` instead.
    Scratch {
        /// The plain directory the differ writes into.
        dir: PathBuf,
        /// The layer blob the commit records.
        blob: PathBuf,
    },
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its key (or, once committed, its name).
    pub name: String,
    /// Its parent's name (committed), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its kind.
    pub kind: Kind,
    /// containerd's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: i64,
    /// Nanoseconds since the epoch.
    pub updated: i64,
    /// A number unique in the model, for directory names.
    pub id: u64,
    /// What it holds.
    pub content: Content,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File1 {
    version: u32,
    next_id: u64,
    snapshots: Vec<Snapshot>,
}

/// Every snapshot, persisted in `dir/snapshots.json`.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    map: BTreeMap<String, Snapshot>,
    next_id: u64,
}

/// An [`Error::Snapshot`].
pub fn refused(code: SnapshotCode, message: impl Into<String>) -> Error {
    Error::Snapshot {
        code,
        message: message.into(),
    }
}

/// Now, in nanoseconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Snapshots {
    /// The model recorded in `dir` (empty if it has no file yet).
    pub fn load(dir: &Path) -> Result<Snapshots> {
        let path = dir.join(SNAPSHOTS_FILE);
        let (map, next_id) = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: File1 = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Service(format!(
                        "snapshot state {} is unreadable: {e}",
                        path.display()
                    ))
                })?;
                if f.version != SNAPSHOTS_VERSION {
                    return Err(Error::Service(format!(
                        "snapshot state {} has version {}; this snapfs knows {SNAPSHOTS_VERSION}",
                        path.display(),
                        f.version
                    )));
                }
                let map = f
                    .snapshots
                    .into_iter()
                    .map(|s| (s.name.clone(), s))
                    .collect();
                (map, f.next_id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (BTreeMap::new(), 1),
            Err(e) => return Err(Error::io("cannot read snapshot state", &path, e)),
        };
        Ok(Snapshots {
            dir: dir.to_path_buf(),
            map,
            next_id,
        })
    }

    /// Writes the model, atomically.
    pub fn save(&self) -> Result<()> {
        let f = File1 {
            version: SNAPSHOTS_VERSION,
            next_id: self.next_id,
            snapshots: self.map.values().cloned().collect(),
        };
        let mut text = serde_json::to_vec_pretty(&f)
            .map_err(|e| Error::Internal(format!("cannot encode snapshot state: {e}")))?;
        text.push(b'\n');
        super::state::write_atomic(
            &self.dir,
            SNAPSHOTS_FILE,
            &text,
            "cannot write snapshot state",
        )
    }

    /// A fresh id (for the directories of a new snapshot).
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The snapshot `key`.
    pub fn get(&self, key: &str) -> Result<&Snapshot> {
        self.map.get(key).ok_or_else(|| {
            refused(
                SnapshotCode::NotFound,
                format!("snapshot {key:?} does not exist"),
            )
        })
    }

    /// Every snapshot, in name order.
    pub fn all(&self) -> impl Iterator<Item = &Snapshot> {
        self.map.values()
    }

    /// The committed snapshot with label `containerd.io/snapshot.ref` = `target` and
    /// this parent, if any.
    pub fn find_target(&self, target: &str, parent: Option<&str>) -> Option<&Snapshot> {
        self.map.values().find(|s| {
            s.kind == Kind::Committed
                && s.parent.as_deref() == parent
                && s.labels
                    .get(super::containerd::LABEL_REF)
                    .map(String::as_str)
                    == Some(target)
        })
    }

    /// Checks that `key` is free and `parent` (if any) a committed snapshot.
    pub fn check_new(&self, key: &str, parent: Option<&str>) -> Result<()> {
        if key.is_empty() {
            return Err(refused(
                SnapshotCode::InvalidArgument,
                "a snapshot needs a key",
            ));
        }
        if self.map.contains_key(key) {
            return Err(refused(
                SnapshotCode::AlreadyExists,
                format!("snapshot {key:?} already exists"),
            ));
        }
        if let Some(p) = parent {
            let ps = self.map.get(p).ok_or_else(|| {
                refused(
                    SnapshotCode::NotFound,
                    format!("parent snapshot {p:?} does not exist"),
                )
            })?;
            if ps.kind != Kind::Committed {
                return Err(refused(
                    SnapshotCode::FailedPrecondition,
                    format!("parent snapshot {p:?} is not committed"),
                ));
            }
        }
        Ok(())
    }

    /// Records a new snapshot (checked as [`Snapshots::check_new`]).
    pub fn insert(&mut self, s: Snapshot) -> Result<()> {
        self.check_new(&s.name, s.parent.as_deref())?;
        self.map.insert(s.name.clone(), s);
        Ok(())
    }

    /// The layer files of `name`'s chain, bottom first: the committed `name` and
    /// its ancestors (none for no name).
    pub fn chain(&self, name: Option<&str>) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut at = name.map(str::to_string);
        while let Some(n) = at {
            let s = self.get(&n)?;
            match &s.content {
                Content::Layer { path, .. } => out.push(path.clone()),
                _ => {
                    return Err(refused(
                        SnapshotCode::FailedPrecondition,
                        format!("snapshot {n:?} is not committed"),
                    ))
                }
            }
            if out.len() > 4096 {
                return Err(Error::Service(format!("snapshot {n:?}: its chain loops")));
            }
            at = s.parent.clone();
        }
        out.reverse();
        Ok(out)
    }

    /// Checks that the active snapshot `key` can be committed as `name`.
    pub fn check_commit(&self, name: &str, key: &str) -> Result<&Snapshot> {
        let s = self.get(key)?;
        if s.kind != Kind::Active {
            return Err(refused(
                SnapshotCode::FailedPrecondition,
                format!("snapshot {key:?} is not active; only an active snapshot can be committed"),
            ));
        }
        if name.is_empty() {
            return Err(refused(
                SnapshotCode::InvalidArgument,
                "a commit needs a name",
            ));
        }
        if self.map.contains_key(name) {
            return Err(refused(
                SnapshotCode::AlreadyExists,
                format!("snapshot {name:?} already exists"),
            ));
        }
        Ok(s)
    }

    /// Replaces the active `key` by the committed `name` holding `layer`; `labels`
    /// (if not empty) replace its labels.
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        layer: Content,
    ) -> Result<Snapshot> {
        self.check_commit(name, key)?;
        let Some(mut s) = self.map.remove(key) else {
            return Err(refused(
                SnapshotCode::NotFound,
                format!("snapshot {key:?} does not exist"),
            ));
        };
        s.name = name.to_string();
        s.kind = Kind::Committed;
        if !labels.is_empty() {
            s.labels = labels;
        }
        s.updated = now();
        s.content = layer;
        self.map.insert(name.to_string(), s.clone());
        Ok(s)
    }

    /// Checks that `key` exists and has no children.
    pub fn check_remove(&self, key: &str) -> Result<&Snapshot> {
        let s = self.get(key)?;
        if let Some(c) = self.map.values().find(|c| c.parent.as_deref() == Some(key)) {
            return Err(refused(
                SnapshotCode::FailedPrecondition,
                format!(
                    "snapshot {key:?} has a child ({:?}); remove it first",
                    c.name
                ),
            ));
        }
        Ok(s)
    }

    /// Forgets `key` (checked as [`Snapshots::check_remove`]).
    pub fn remove(&mut self, key: &str) -> Result<Snapshot> {
        self.check_remove(key)?;
        self.map.remove(key).ok_or_else(|| {
            refused(
                SnapshotCode::NotFound,
                format!("snapshot {key:?} does not exist"),
            )
        })
    }

    /// Updates `name`'s labels as containerd's field mask says: no paths (or
    /// `labels`) replace them all, `labels.KEY` sets (or with no value removes) one.
    pub fn update(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot> {
        let s = self.map.get_mut(name).ok_or_else(|| {
            refused(
                SnapshotCode::NotFound,
                format!("snapshot {name:?} does not exist"),
            )
        })?;
        if paths.is_empty() {
            s.labels = labels;
        } else {
            for p in paths {
                if p == "labels" {
                    s.labels = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => s.labels.insert(k.to_string(), v.clone()),
                        None => s.labels.remove(k),
                    };
                } else {
                    return Err(refused(
                        SnapshotCode::InvalidArgument,
                        format!("cannot update {p:?} of snapshot {name:?}; only labels"),
                    ));
                }
            }
        }
        s.updated = now();
        Ok(s.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, parent: Option<&str>, kind: Kind, content: Content) -> Snapshot {
        Snapshot {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            labels: BTreeMap::new(),
            created: now(),
            updated: now(),
            id: 0,
            content,
        }
    }

    fn layer(p: &str) -> Content {
        Content::Layer {
            path: p.into(),
            owned: false,
        }
    }

    fn view() -> Content {
        Content::View {
            view: "v".into(),
            mountpoint: "/m".into(),
            upper: None,
        }
    }

    fn code(e: Error) -> SnapshotCode {
        match e {
            Error::Snapshot { code, .. } => code,
            other => panic!("not a snapshot error: {other}"),
        }
    }

    #[test]
    fn containerd_rules() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Snapshots::load(dir.path()).unwrap();
        m.insert(snap("base", None, Kind::Committed, layer("/b")))
            .unwrap();
        m.insert(snap("top", Some("base"), Kind::Committed, layer("/t")))
            .unwrap();
        assert_eq!(
            m.chain(Some("top")).unwrap(),
            vec![PathBuf::from("/b"), "/t".into()]
        );
        assert_eq!(
            code(
                m.insert(snap("top", None, Kind::Active, view()))
                    .unwrap_err()
            ),
            SnapshotCode::AlreadyExists
        );
        assert_eq!(
            code(
                m.insert(snap("a", Some("nope"), Kind::Active, view()))
                    .unwrap_err()
            ),
            SnapshotCode::NotFound
        );
        m.insert(snap("a", Some("top"), Kind::Active, view()))
            .unwrap();
        assert_eq!(
            code(
                m.insert(snap("b", Some("a"), Kind::Active, view()))
                    .unwrap_err()
            ),
            SnapshotCode::FailedPrecondition
        );
        m.insert(snap("v", Some("top"), Kind::View, view()))
            .unwrap();
        assert_eq!(
            code(m.check_commit("x", "v").unwrap_err()),
            SnapshotCode::FailedPrecondition
        );
        assert_eq!(
            code(m.check_commit("base", "a").unwrap_err()),
            SnapshotCode::AlreadyExists
        );
        assert_eq!(
            code(m.remove("top").unwrap_err()),
            SnapshotCode::FailedPrecondition
        );
        let c = m.commit("c", "a", BTreeMap::new(), layer("/c")).unwrap();
        assert_eq!(
            (c.kind, c.parent.as_deref()),
            (Kind::Committed, Some("top"))
        );
        assert_eq!(code(m.get("a").unwrap_err()), SnapshotCode::NotFound);
        assert_eq!(m.chain(Some("c")).unwrap().len(), 3);

        let mut labels = BTreeMap::new();
        labels.insert("x".to_string(), "1".to_string());
        labels.insert("y".to_string(), "2".to_string());
        m.update("c", labels.clone(), &[]).unwrap();
        let mut one = BTreeMap::new();
        one.insert("y".to_string(), "3".to_string());
        let s = m
            .update("c", one, &["labels.y".into(), "labels.x".into()])
            .unwrap();
        assert_eq!(s.labels.len(), 1);
        assert_eq!(s.labels["y"], "3");
        assert_eq!(
            code(
                m.update("c", BTreeMap::new(), &["parent".into()])
                    .unwrap_err()
            ),
            SnapshotCode::InvalidArgument
        );

        m.save().unwrap();
        let again = Snapshots::load(dir.path()).unwrap();
        assert_eq!(again.all().count(), m.all().count());
        assert_eq!(again.get("c").unwrap(), m.get("c").unwrap());
        m.remove("v").unwrap();
        m.remove("c").unwrap();
        m.remove("top").unwrap();
        assert!(!dir.path().join(".snapshots.json.tmp").exists());
    }

    #[test]
    fn targets_are_found_by_label_and_parent() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Snapshots::load(dir.path()).unwrap();
        let mut s = snap("sha256:aa", None, Kind::Committed, layer("/b"));
        s.labels.insert(
            super::super::containerd::LABEL_REF.into(),
            "sha256:aa".into(),
        );
        m.insert(s).unwrap();
        assert!(m.find_target("sha256:aa", None).is_some());
        assert!(m.find_target("sha256:aa", Some("p")).is_none());
        assert!(m.find_target("sha256:bb", None).is_none());
    }
}
