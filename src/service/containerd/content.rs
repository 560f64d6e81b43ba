//! A client of containerd's own API, for finding layer blobs: the content store
//! (info, read), the image store (list) and introspection (the content store's root
//! directory, where each blob is the file `blobs/sha256/<hex>`). A layer is found by
//! its digest, or by its chain ID through the images of the namespace: manifest (or
//! every manifest of an index), config, `rootfs.diff_ids`, chain IDs as containerd
//! computes them. While containerd pulls an image, the image is not recorded yet:
//! its manifests are found in the content store by the label containerd's fetch puts
//! on every manifest (`containerd.io/gc.ref.content.config`), and a layer's blob may
//! not be there yet ([`ChainLayer::present`]).

// tonic's Status is what gRPC errors are; boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tonic::codec::ProstCodec;
use tonic::transport::{Channel, Endpoint, Uri};

use super::proto::client as pb;
use crate::error::{Error, Result};

/// The most bytes a manifest, index or config may have.
const MAX_JSON: i64 = 16 << 20;

/// A connection to containerd (made when first used).
pub struct ContentStore {
    address: PathBuf,
    channel: Channel,
    root: OnceCell<PathBuf>,
}

/// A layer blob found in the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundLayer {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its file.
    pub path: PathBuf,
}

/// A layer found by its chain ID in a manifest: its blob (whose file may not be
/// there yet, while containerd still fetches it) and the manifest's later layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// The blob's digest and where its file is (or will be).
    pub layer: FoundLayer,
    /// Whether the content store has the blob.
    pub present: bool,
    /// The digests of the layers above it in the manifest.
    pub later: Vec<String>,
}

/// The label containerd's fetch puts on a manifest: its config's digest.
const LABEL_CONFIG_REF: &str = "containerd.io/gc.ref.content.config";

fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// containerd's chain IDs of a list of diff IDs: the first is the first diff ID,
/// each next one `sha256(previous + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let h = Sha256::digest(format!("{prev} {d}").as_bytes());
                format!("sha256:{}", hex(&h))
            }
        };
        out.push(next);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ContentStore {
    /// A client of containerd at `address` (its gRPC socket).
    pub fn new(address: PathBuf) -> Result<ContentStore> {
        let path = address.clone();
        let channel = Endpoint::try_from("http://[::]:50051")
            .map_err(|e| Error::Internal(format!("endpoint: {e}")))?
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        Ok(ContentStore {
            address,
            channel,
            root: OnceCell::new(),
        })
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Service(format!(
            "containerd at {}: {what}: {e}",
            self.address.display()
        ))
    }

    async fn unary<Q, R>(
        &self,
        ns: &str,
        path: &'static str,
        q: Q,
    ) -> std::result::Result<R, tonic::Status>
    where
        Q: Message + Send + Sync + 'static,
        R: Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(q);
        if let Ok(v) = ns.parse() {
            req.metadata_mut().insert("containerd-namespace", v);
        }
        let r = grpc
            .unary(
                req,
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                ProstCodec::default(),
            )
            .await?;
        Ok(r.into_inner())
    }

    /// The content store's root directory (asked once, through introspection).
    pub async fn root(&self) -> Result<PathBuf> {
        self.root
            .get_or_try_init(|| async {
                let r: pb::PluginsResponse = self
                    .unary(
                        "",
                        "/containerd.services.introspection.v1.Introspection/Plugins",
                        pb::PluginsRequest {
                            filters: vec!["type==io.containerd.content.v1".into()],
                        },
                    )
                    .await
                    .map_err(|e| self.error("cannot list its plugins", e.message()))?;
                r.plugins
                    .iter()
                    .find_map(|p| p.exports.get("root").map(PathBuf::from))
                    .ok_or_else(|| self.error("no content plugin", "it exports no root"))
            })
            .await
            .cloned()
    }

    /// The blob of `digest`, if the content store has it (and it is a local file).
    pub async fn blob(&self, ns: &str, digest: &str) -> Result<Option<FoundLayer>> {
        if !is_digest(digest) {
            return Ok(None);
        }
        let info: std::result::Result<pb::InfoResponse, _> = self
            .unary(
                ns,
                "/containerd.services.content.v1.Content/Info",
                pb::InfoRequest {
                    digest: digest.into(),
                },
            )
            .await;
        match info {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(self.error(&format!("content {digest}"), s.message())),
        }
        let path = self.blob_path(digest).await?;
        Ok(path.is_file().then(|| FoundLayer {
            digest: digest.into(),
            path,
        }))
    }

    /// Where the content store keeps (or will keep) the blob of `digest`.
    pub async fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root().await?.join("blobs/sha256").join(&digest[7..]))
    }

    /// The digests of the manifests in the content store (containerd labels every
    /// manifest it fetches or imports with its config).
    async fn content_manifests(&self, ns: &str) -> Result<Vec<String>> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| self.error("cannot connect", e))?;
        let mut req = tonic::Request::new(pb::ListContentRequest {
            filters: vec![format!("labels.\"{LABEL_CONFIG_REF}\"")],
        });
        if let Ok(v) = ns.parse() {
            req.metadata_mut().insert("containerd-namespace", v);
        }
        let mut stream = grpc
            .server_streaming::<_, pb::ListContentResponse, _>(
                req,
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/containerd.services.content.v1.Content/List",
                ),
                ProstCodec::default(),
            )
            .await
            .map_err(|e| self.error("cannot list content", e.message()))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream
            .message()
            .await
            .map_err(|e| self.error("cannot list content", e.message()))?
        {
            out.extend(r.info.into_iter().map(|i| i.digest));
        }
        Ok(out)
    }

    async fn read_json(&self, ns: &str, digest: &str) -> Result<serde_json::Value> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| self.error("cannot connect", e))?;
        let mut req = tonic::Request::new(pb::ReadContentRequest {
            digest: digest.into(),
            offset: 0,
            size: 0,
        });
        if let Ok(v) = ns.parse() {
            req.metadata_mut().insert("containerd-namespace", v);
        }
        let mut stream = grpc
            .server_streaming::<_, pb::ReadContentResponse, _>(
                req,
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/containerd.services.content.v1.Content/Read",
                ),
                ProstCodec::default(),
            )
            .await
            .map_err(|e| self.error(&format!("cannot read {digest}"), e.message()))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|e| self.error(&format!("cannot read {digest}"), e.message()))?
        {
            data.extend_from_slice(&chunk.data);
            if data.len() as i64 > MAX_JSON {
                return Err(self.error(&format!("content {digest}"), "too big for a manifest"));
            }
        }
        serde_json::from_slice(&data).map_err(|e| self.error(&format!("content {digest}"), e))
    }

    /// The layer blob whose chain ID is `chain_id`, through the images of `ns`, if
    /// the content store has it.
    pub async fn layer_by_chain(&self, ns: &str, chain_id: &str) -> Result<Option<FoundLayer>> {
        Ok(self
            .locate_by_chain(ns, chain_id)
            .await?
            .filter(|c| c.present)
            .map(|c| c.layer))
    }

    /// The layer whose chain ID is `chain_id`: through the images of `ns`, then the
    /// manifests of its content store (an image being pulled), present or not.
    pub async fn locate_by_chain(&self, ns: &str, chain_id: &str) -> Result<Option<ChainLayer>> {
        if !is_digest(chain_id) {
            return Ok(None);
        }
        let images: pb::ListImagesResponse = self
            .unary(
                ns,
                "/containerd.services.images.v1.Images/List",
                pb::ListImagesRequest { filters: vec![] },
            )
            .await
            .map_err(|e| self.error("cannot list images", e.message()))?;
        let mut seen: Vec<String> = Vec::new();
        for img in images.images {
            let Some(t) = img.target else { continue };
            let mut manifests = vec![t.digest.clone()];
            let top = match self.read_json(ns, &t.digest).await {
                Ok(v) => v,
                Err(e) => {
                    log::debug!("image {}: {e}", img.name);
                    continue;
                }
            };
            if let Some(list) = top.get("manifests").and_then(|m| m.as_array()) {
                manifests = list
                    .iter()
                    .filter_map(|m| m.get("digest").and_then(|d| d.as_str()).map(String::from))
                    .collect();
            }
            for m in manifests {
                let manifest = if m == t.digest {
                    top.clone()
                } else {
                    match self.read_json(ns, &m).await {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                seen.push(m);
                if let Some(found) = self.match_manifest(ns, &manifest, chain_id).await? {
                    return Ok(Some(found));
                }
            }
        }
        for m in self.content_manifests(ns).await? {
            if seen.contains(&m) {
                continue;
            }
            let Ok(manifest) = self.read_json(ns, &m).await else {
                continue;
            };
            if let Some(found) = self.match_manifest(ns, &manifest, chain_id).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    async fn match_manifest(
        &self,
        ns: &str,
        manifest: &serde_json::Value,
        chain_id: &str,
    ) -> Result<Option<ChainLayer>> {
        let Some(config) = manifest
            .get("config")
            .and_then(|c| c.get("digest"))
            .and_then(|d| d.as_str())
        else {
            return Ok(None);
        };
        let layers: Vec<String> = manifest
            .get("layers")
            .and_then(|l| l.as_array())
            .map(|l| {
                l.iter()
                    .filter_map(|x| x.get("digest").and_then(|d| d.as_str()).map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let Ok(config) = self.read_json(ns, config).await else {
            return Ok(None);
        };
        let diff_ids: Vec<String> = config
            .get("rootfs")
            .and_then(|r| r.get("diff_ids"))
            .and_then(|d| d.as_array())
            .map(|d| {
                d.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != layers.len() {
            return Ok(None);
        }
        for (i, c) in chain_ids(&diff_ids).iter().enumerate() {
            if c == chain_id {
                let digest = layers[i].clone();
                if !is_digest(&digest) {
                    return Ok(None);
                }
                let found = self.blob(ns, &digest).await?;
                let present = found.is_some();
                let layer = match found {
                    Some(f) => f,
                    None => FoundLayer {
                        path: self.blob_path(&digest).await?,
                        digest,
                    },
                };
                return Ok(Some(ChainLayer {
                    layer,
                    present,
                    later: layers[i + 1..].to_vec(),
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_as_containerd() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = format!(
            "sha256:{}",
            hex(&Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(c[1], want);
        assert!(is_digest(&a));
        assert!(!is_digest("sha256:zz"));
    }
}
