//! The control protocol's messages: one JSON object per line each way, a request
//! from the client, then its response (see README, "The snapfs service"). Parsing
//! never fails the service: a bad line gets an error response.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cache::PoolStats;
use crate::error::{Error, Result};

use super::state::ViewConfig;
use super::volumes::{CutInfo, VolumeInfo};

/// A request, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Mount a new view.
    Add {
        /// What to mount.
        view: ViewConfig,
    },
    /// The views, in key order.
    List {},
    /// Unmount a view and forget it.
    Remove {
        /// The view's key, or
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// its mountpoint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mountpoint: Option<PathBuf>,
        /// Detach even if busy (open files are served until closed).
        #[serde(default)]
        lazy: bool,
    },
    /// The service: its cache, its sources and their bytes read, its views.
    Status {},
    /// Create a Docker volume (as `docker volume create -d snapfs -o ...` does).
    VolumeCreate {
        /// Its name.
        name: String,
        /// Its options (`snapshot`, `writable`, `uid_map`, `gid_map`).
        #[serde(default)]
        opts: BTreeMap<String, String>,
    },
    /// Remove a volume that no container uses.
    VolumeRemove {
        /// Its name.
        name: String,
    },
    /// The volumes, by name.
    VolumeList {},
    /// One volume.
    VolumeInspect {
        /// Its name.
        name: String,
    },
    /// Cut a volume's changes (or, `full`, the whole volume) to `output`.
    VolumeSnapshot {
        /// Its name.
        name: String,
        /// The snapshot to write (absolute; .tar, .tar.gz, .tar.zst).
        output: PathBuf,
        /// A standalone snapshot of the whole volume instead of a delta.
        #[serde(default)]
        full: bool,
        /// The containers that use the volume are paused (cut it though in use).
        #[serde(default)]
        paused: bool,
    },
    /// Point a volume at another snapshot; its old state is kept.
    VolumeRestore {
        /// Its name.
        name: String,
        /// The snapshot (absolute paths, `a:b:c` for a stack).
        snapshot: String,
    },
}

/// How a view stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewState {
    /// Being opened and mounted.
    Starting,
    /// Mounted and served.
    Live,
    /// Being unmounted.
    Stopping,
    /// Recorded but not mounted: re-establishing it after a restart failed (see
    /// `error`); remove it, or fix the cause and restart the service.
    Failed,
}

/// One source (archive) of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Its canonical path.
    pub path: PathBuf,
    /// Bytes read from it since it was opened (index, span decodes, plain reads).
    pub bytes_read: u64,
    /// Layers of views that use it now.
    pub users: u64,
}

/// One view, as `list` and `add` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewInfo {
    /// How it stands.
    pub state: ViewState,
    /// Why it failed (state `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it is.
    pub config: ViewConfig,
    /// Its layers' sources (bottom first; counters are per source, shared by
    /// every view that reads it).
    pub sources: Vec<SourceInfo>,
}

/// The service as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The service's pid.
    pub pid: u32,
    /// Its root directory.
    pub root: PathBuf,
    /// The one span cache of all views.
    pub cache: CacheInfo,
    /// The sources open now.
    pub sources: Vec<SourceInfo>,
    /// The views.
    pub views: Vec<ViewInfo>,
}

/// The span cache, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInfo {
    /// The service's `--cache-size`.
    pub size: u64,
    /// The part of it decoded spans may use.
    pub cap: u64,
    /// Bytes of spans cached now.
    pub cached_bytes: u64,
    /// Spans cached now.
    pub spans: u64,
    /// Reads answered from the cache.
    pub hits: u64,
    /// Spans decoded.
    pub misses: u64,
}

impl CacheInfo {
    /// From the pool's numbers and the configured size.
    pub fn new(size: u64, p: PoolStats) -> Self {
        CacheInfo {
            size,
            cap: p.cap,
            cached_bytes: p.cached_bytes,
            spans: p.spans,
            hits: p.hits,
            misses: p.misses,
        }
    }
}

/// A response: `ok`, and either the answer's field or `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether the request was served.
    pub ok: bool,
    /// Why not (one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The view added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<ViewInfo>,
    /// The views listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<Vec<ViewInfo>>,
    /// The status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The volume created or inspected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeInfo>,
    /// The volumes listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_list: Option<Vec<VolumeInfo>>,
    /// What a volume snapshot or restore cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutInfo>,
}

impl Response {
    /// A success with nothing to say.
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    /// A failure saying `e`.
    pub fn error(e: &Error) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }

    /// The response as a client sees it: an error response is an error.
    pub fn into_result(self) -> Result<Response> {
        if self.ok {
            Ok(self)
        } else {
            Err(Error::Daemon(self.error.unwrap_or_else(|| {
                "the snapfs service refused the request".into()
            })))
        }
    }
}

/// Parses one request line.
pub fn parse(line: &[u8]) -> Result<Request> {
    serde_json::from_slice(line).map_err(|e| Error::Service(format!("bad request: {e}")))
}

/// One message as a line of JSON (with its newline).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let mut v = serde_json::to_vec(msg)
        .map_err(|e| Error::Internal(format!("cannot encode a message: {e}")))?;
    v.push(b'\n');
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        let r = parse(br#"{"op":"add","view":{"mountpoint":"/m","layers":["/a.tar"]}}"#).unwrap();
        let Request::Add { view } = &r else {
            panic!("{r:?}")
        };
        assert_eq!(view.mountpoint, PathBuf::from("/m"));
        assert_eq!(view.upper, None);
        assert_eq!(parse(&encode(&r).unwrap()).unwrap(), r);
        assert_eq!(parse(br#"{"op":"list"}"#).unwrap(), Request::List {});
        assert_eq!(
            encode(&Request::Status {}).unwrap(),
            b"{\"op\":\"status\"}\n"
        );
        assert_eq!(
            parse(br#"{"op":"remove","key":"k"}"#).unwrap(),
            Request::Remove {
                key: Some("k".into()),
                mountpoint: None,
                lazy: false
            }
        );
        for (bad, why) in [
            (&b"{"[..], "EOF"),
            (b"[1]", "invalid type"),
            (br#"{"op":"mount"}"#, "unknown variant"),
            (br#"{"op":"list","x":1}"#, "unknown field"),
            (
                br#"{"op":"add","view":{"mountpoint":"/m","layers":[],"uppr":"/u"}}"#,
                "unknown field `uppr`",
            ),
            (br#"{"op":"add","view":{"layers":[]}}"#, "missing field"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad request: ") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn error_responses_are_errors_for_clients() {
        let r = Response::error(&Error::Service("no view x".into()));
        let line = encode(&r).unwrap();
        assert_eq!(line, b"{\"ok\":false,\"error\":\"no view x\"}\n");
        let back: Response = serde_json::from_slice(&line).unwrap();
        assert_eq!(back.into_result().unwrap_err().to_string(), "no view x");
        assert!(Response::ok().into_result().is_ok());
    }
}
