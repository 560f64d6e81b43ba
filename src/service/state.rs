//! The service's state in its root directory: `state.json`, the views it serves
//! (written atomically: a temporary file, fsync, rename, fsync of the directory, so a
//! crash leaves the old or the new file, never a mix), and `lock`, flocked by the
//! running service so that two services never share a root.
//!
//! ```json
//! {"version": 1, "views": [{"key": "/mnt/a", "mountpoint": "/mnt/a",
//!   "layers": ["/srv/base.tar.gz"], "upper": "/srv/upper-a", ...}]}
//! ```

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The state file's name in the root.
pub const STATE_FILE: &str = "state.json";
/// The lock file's name in the root.
pub const LOCK_FILE: &str = "lock";
/// The state file's format version. 1: the first.
pub const STATE_VERSION: u32 = 1;

/// One view as the service records it: everything needed to mount it again.
/// Also the body of an `add` request (see README, "The snapfs service").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// Names the view for `remove` (containerd's snapshot key, say); the
    /// mountpoint if empty in a request.
    #[serde(default)]
    pub key: String,
    /// Where the view is mounted (absolute).
    pub mountpoint: PathBuf,
    /// The archives, bottom layer first (absolute).
    pub layers: Vec<PathBuf>,
    /// The upper directory of a writable view (absolute); none: read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<PathBuf>,
    /// `--uid-map` ranges, `container:host:count`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uid_map: Vec<String>,
    /// `--gid-map` ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gid_map: Vec<String>,
    /// `--owner UID:GID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Mount options as `-o` takes them (`allow_other`, `ro`, `suid`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// FUSE worker threads (the service's default if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Uncompressed bytes between seek points if an index must be built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<u64>,
    /// Free-form labels kept with the view (front-ends keep their metadata here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    views: Vec<ViewConfig>,
}

/// Creates `root` (mode 0700) if needed and takes its lock; fails with
/// [`Error::InUse`] while another service runs on it.
pub fn lock_root(root: &Path) -> Result<File> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| Error::io("cannot create service root", root, e))?;
    let path = root.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("cannot open", &path, e))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::InUse {
            path: root.to_path_buf(),
            holder: "another snapfs service".into(),
        });
    }
    Ok(f)
}

/// The views recorded in `root` (none if there is no state file yet).
pub fn load(root: &Path) -> Result<Vec<ViewConfig>> {
    let path = root.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot read service state", &path, e)),
    };
    let state: StateFile = serde_json::from_str(&text).map_err(|e| {
        Error::Service(format!(
            "service state {} is unreadable ({e}); move it away to start empty",
            path.display()
        ))
    })?;
    if state.version != STATE_VERSION {
        return Err(Error::Service(format!(
            "service state {} has version {}, this snapfs reads {STATE_VERSION}",
            path.display(),
            state.version
        )));
    }
    Ok(state.views)
}

/// Records `views` in `root`, atomically.
pub fn save(root: &Path, views: &[ViewConfig]) -> Result<()> {
    let state = StateFile {
        version: STATE_VERSION,
        views: views.to_vec(),
    };
    let mut text = serde_json::to_vec_pretty(&state)
        .map_err(|e| Error::Internal(format!("cannot encode service state: {e}")))?;
    text.push(b'\n');
    write_atomic(root, STATE_FILE, &text, "cannot write service state")
}

/// Writes `name` in `dir` atomically: a temporary file, fsync, rename, fsync of the
/// directory. `what` starts the error line ("cannot write service state").
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8], what: &'static str) -> Result<()> {
    let path = dir.join(name);
    let err = |e| Error::io(what, &path, e);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(err)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot sync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let mut v = ViewConfig {
            key: "k".into(),
            mountpoint: "/mnt/a".into(),
            layers: vec!["/srv/a.tar.gz".into()],
            upper: Some("/srv/u".into()),
            ..Default::default()
        };
        v.labels
            .insert("containerd.io/snapshot.ref".into(), "x".into());
        save(dir.path(), &[v.clone()]).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![v.clone()]);
        save(dir.path(), &[]).unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        assert!(!dir.path().join(".state.json.tmp").exists());
        std::fs::write(dir.path().join(STATE_FILE), "{\"version\": 1, \"views\": [").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("unreadable"), "{e}");
    }

    #[test]
    fn one_service_per_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let held = lock_root(&root).unwrap();
        assert!(matches!(lock_root(&root), Err(Error::InUse { .. })));
        drop(held);
        lock_root(&root).unwrap();
    }
}
