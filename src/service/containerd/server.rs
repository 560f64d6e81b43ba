//! Glue: containerd's `containerd.services.snapshots.v1.Snapshots` gRPC service on
//! a Unix socket, each call translated into one [`Snapshotter`] call (run off the
//! async runtime, since they mount, unmount and cut), errors into gRPC codes that
//! containerd's errdefs understand.

// tonic's Status is what gRPC errors are; boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::content::{ChainLayer, ContentStore, FoundLayer};
use super::proto::snapshots as pb;
use super::proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use super::proto::types;
use super::snapshotter::{MountSpec, Snapshotter};
use super::{LABEL_LAYER_DIGEST, LABEL_REF};
use crate::error::{Error, Result, SnapshotCode};
use crate::service::snapshots::{Kind, Snapshot};

struct Api {
    sn: Snapshotter,
    content: Arc<ContentStore>,
    /// Layer blobs containerd's pull unpacker is fetching (by digest), since when.
    fetching: Mutex<HashMap<String, Instant>>,
}

/// How long a Prepare waits for a layer blob containerd is fetching.
const FETCH_WAIT: Duration = Duration::from_secs(600);

fn status(e: Error) -> Status {
    let msg = e.to_string();
    match &e {
        Error::Snapshot { code, .. } => match code {
            SnapshotCode::NotFound => Status::not_found(msg),
            SnapshotCode::AlreadyExists => Status::already_exists(msg),
            SnapshotCode::FailedPrecondition => Status::failed_precondition(msg),
            SnapshotCode::InvalidArgument => Status::invalid_argument(msg),
        },
        Error::Usage(_) | Error::NotA { .. } => Status::invalid_argument(msg),
        Error::InUse { .. } | Error::Busy { .. } | Error::AlreadyMounted { .. } => {
            Status::failed_precondition(msg)
        }
        _ => Status::internal(msg),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(status),
        Err(e) => Err(Status::internal(format!("snapshotter task failed: {e}"))),
    }
}

fn mounts(m: Vec<MountSpec>) -> Vec<types::Mount> {
    m.into_iter()
        .map(|(t, src, options)| types::Mount {
            r#type: t,
            source: src.display().to_string(),
            target: String::new(),
            options,
        })
        .collect()
}

fn ts(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

fn info(s: &Snapshot) -> pb::Info {
    pb::Info {
        name: s.name.clone(),
        parent: s.parent.clone().unwrap_or_default(),
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(ts(s.created)),
        updated_at: Some(ts(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

fn parent(p: &str) -> Option<String> {
    (!p.is_empty()).then(|| p.to_string())
}

/// The namespace of a backend key as containerd's metadata store writes it
/// (`NAMESPACE/SEQ/KEY`).
fn namespace(key: &str) -> &str {
    key.split('/').next().unwrap_or("default")
}

/// The chain ID in the key of containerd's unpacker (`extract-UNIQUE CHAINID`).
fn unpack_chain(key: &str) -> Option<&str> {
    let last = key.rsplit('/').next()?;
    let rest = last.strip_prefix("extract-")?;
    let (_, chain) = rest.split_once(' ')?;
    chain.starts_with("sha256:").then_some(chain)
}

impl Api {
    /// The layer blob a Prepare names: by the CRI layer-digest label, or by the
    /// chain ID (`containerd.io/snapshot.ref`, or the unpacker's key).
    async fn find(&self, key: &str, labels: &HashMap<String, String>) -> Option<FoundLayer> {
        let ns = namespace(key);
        let r = if let Some(d) = labels.get(LABEL_LAYER_DIGEST) {
            self.content.blob(ns, d).await
        } else if let Some(chain) = labels
            .get(LABEL_REF)
            .map(String::as_str)
            .or_else(|| unpack_chain(key))
        {
            self.content.layer_by_chain(ns, chain).await
        } else {
            return None;
        };
        match r {
            Ok(f) => f,
            Err(e) => {
                log::warn!("snapshot {key:?}: no layer blob found ({e}); containerd unpacks it");
                None
            }
        }
    }
}

/// Where the layer of a pull's Prepare is.
enum Pulled {
    /// Its blob is in the content store (it was, or containerd fetched it meanwhile).
    Here(FoundLayer),
    /// Not fetched yet, and containerd fetches it only after a Prepare it can unpack
    /// into (1.6's unpacker starts fetching at the first layer it must unpack).
    NotYet(FoundLayer),
    /// Not a layer of a manifest in the content store.
    Unknown,
}

impl Api {
    /// The layer the unpacker's Prepare for chain `target` wants. A blob that an
    /// earlier Prepare of the same pull set containerd fetching is waited for, so
    /// that only the first layer missing from the content store goes through the
    /// differ, and every later one is answered AlreadyExists.
    async fn pulled(&self, key: &str, target: &str) -> Pulled {
        let ns = namespace(key);
        let c: ChainLayer = match self.content.locate_by_chain(ns, target).await {
            Ok(Some(c)) => c,
            Ok(None) => return Pulled::Unknown,
            Err(e) => {
                log::warn!("snapshot {key:?}: no layer blob found ({e}); containerd unpacks it");
                return Pulled::Unknown;
            }
        };
        if c.present {
            return Pulled::Here(c.layer);
        }
        let since = {
            let mut f = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            f.retain(|_, t| t.elapsed() < FETCH_WAIT);
            f.get(&c.layer.digest).copied()
        };
        let Some(since) = since else {
            // This Prepare starts containerd's fetch of this layer and the later ones.
            let mut f = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            for d in &c.later {
                f.insert(d.clone(), Instant::now());
            }
            log::info!(
                "snapshot {key:?}: layer {} not fetched yet; containerd unpacks it, and fetches {} more",
                c.layer.digest,
                c.later.len()
            );
            return Pulled::NotYet(c.layer);
        };
        let t = Instant::now();
        while since.elapsed() < FETCH_WAIT {
            match self.content.blob(ns, &c.layer.digest).await {
                Ok(Some(f)) => {
                    self.fetching
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&c.layer.digest);
                    log::info!(
                        "snapshot {key:?}: layer {} fetched after {:.2} s",
                        f.digest,
                        t.elapsed().as_secs_f64()
                    );
                    return Pulled::Here(f);
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    log::warn!("snapshot {key:?}: {e}");
                    break;
                }
            }
        }
        Pulled::NotYet(c.layer)
    }
}

type ListStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Api {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        log::debug!(
            "prepare {:?} on {:?} labels {:?}",
            r.key,
            r.parent,
            r.labels
        );
        let parent = parent(&r.parent);
        let labels: BTreeMap<String, String> = r.labels.clone().into_iter().collect();
        let mut pending: Option<FoundLayer> = None;
        if let Some(target) = r.labels.get(LABEL_REF) {
            if self.sn.has_target(target, parent.as_deref()) {
                return Err(Status::already_exists(format!(
                    "target snapshot {target:?} exists"
                )));
            }
            let mut found = if r.labels.contains_key(LABEL_LAYER_DIGEST) {
                self.find(&r.key, &r.labels).await
            } else {
                None
            };
            if found.is_none() {
                found = match self.pulled(&r.key, target).await {
                    Pulled::Here(f) => Some(f),
                    Pulled::NotYet(f) => {
                        pending = Some(f);
                        None
                    }
                    Pulled::Unknown => None,
                };
            }
            if let Some(found) = found {
                let (sn, t) = (self.sn.clone(), target.clone());
                let p = parent.clone();
                blocking(move || sn.add_layer(&t, p.as_deref(), labels, &found)).await?;
                return Err(Status::already_exists(format!(
                    "target snapshot {target:?} exists (served from its blob)"
                )));
            }
        }
        let scratch = if pending.is_some() {
            pending
        } else if unpack_chain(&r.key).is_some() {
            self.find(&r.key, &r.labels).await
        } else {
            None
        };
        let sn = self.sn.clone();
        let m =
            blocking(move || sn.create(&r.key, parent.as_deref(), Kind::Active, labels, scratch))
                .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> std::result::Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let sn = self.sn.clone();
        let labels = r.labels.into_iter().collect();
        let m = blocking(move || {
            sn.create(
                &r.key,
                parent(&r.parent).as_deref(),
                Kind::View,
                labels,
                None,
            )
        })
        .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> std::result::Result<Response<pb::MountsResponse>, Status> {
        let m = self.sn.mounts(&req.into_inner().key).map_err(status)?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = req.into_inner();
        let sn = self.sn.clone();
        blocking(move || sn.commit(&r.name, &r.key, r.labels.into_iter().collect())).await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let sn = self.sn.clone();
        let key = req.into_inner().key;
        blocking(move || sn.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> std::result::Result<Response<pb::StatSnapshotResponse>, Status> {
        let s = self.sn.stat(&req.into_inner().key).map_err(status)?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update needs the snapshot's info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = self
            .sn
            .update(&i.name, i.labels.into_iter().collect(), &paths)
            .map_err(status)?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        _req: Request<pb::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        // containerd's metadata store filters what it gets itself.
        let all: Vec<pb::Info> = self.sn.list().iter().map(info).collect();
        let chunks: Vec<std::result::Result<pb::ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> std::result::Result<Response<pb::UsageResponse>, Status> {
        let sn = self.sn.clone();
        let key = req.into_inner().key;
        let (size, inodes) = blocking(move || sn.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(
        &self,
        _req: Request<pb::CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let sn = self.sn.clone();
        blocking(move || sn.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// The snapshots API served on a Unix socket, on its own threads.
pub struct Server {
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    socket: PathBuf,
}

impl Server {
    /// Binds `socket` (replacing a stale one) and serves `sn` there; containerd's
    /// own API is reached at `containerd` for its content store.
    pub fn start(sn: Snapshotter, socket: &Path, containerd: &Path) -> Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("containerd-api")
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the gRPC runtime for", socket, e))?;
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        }
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(_) => {
                return Err(Error::InUse {
                    path: socket.to_path_buf(),
                    holder: "another process answering on it".into(),
                })
            }
            Err(_) => {
                let _ = std::fs::remove_file(socket);
            }
        }
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(socket)
                .map_err(|e| Error::io("cannot listen on", socket, e))?
        };
        let content = {
            let _guard = runtime.enter();
            Arc::new(ContentStore::new(containerd.to_path_buf())?)
        };
        let api = Api {
            sn,
            content,
            fetching: Mutex::new(HashMap::new()),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let r = tonic::transport::Server::builder()
                .add_service(SnapshotsServer::new(api))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                log::error!("containerd snapshots API stopped: {e}");
            }
        });
        Ok(Server {
            runtime,
            stop: Some(tx),
            socket: socket.to_path_buf(),
        })
    }

    /// Stops answering and removes the socket.
    pub fn close(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_containerd() {
        assert_eq!(namespace("default/12/extract-1 sha256:ab"), "default");
        assert_eq!(
            unpack_chain("default/12/extract-123-abc sha256:abcd"),
            Some("sha256:abcd")
        );
        assert_eq!(unpack_chain("default/3/mycontainer"), None);
    }
}
