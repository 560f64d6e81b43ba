//! The image JSON that snapfs reads, as a small serde model: OCI descriptors, image
//! indexes (and Docker manifest lists, which have the same shape), image manifests
//! (OCI and Docker schema 2), the parts of an image config a view needs (`rootfs`,
//! platform, history), and `docker save`'s `manifest.json`. Fields snapfs does not use
//! are ignored when read; a config is kept as raw JSON where it is rewritten
//! (`commit --image`), so nothing of it is lost.
//!
//! Everything here comes from the input and is hostile: digests are checked when
//! parsed ([`Digest`]), sizes are plain numbers compared with real blob sizes (never
//! used to allocate), the JSON itself is read under a size cap by the caller, and
//! serde_json's recursion limit bounds nesting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;

/// OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI layer, plain tar.
pub const MT_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip.
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer, zstd.
pub const MT_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker manifest list.
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What a layer media type says about the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// A tar layer (plain, gzip or zstd: the bytes decide).
    Tar,
    /// A non-distributable or foreign layer: its blob is to be fetched from elsewhere.
    Foreign,
    /// Not a layer media type snapfs knows.
    Unknown,
}

/// Classifies a layer media type (`+gzip`/`+zstd` suffixes, Docker's `tar.gzip`
/// names; an empty one, as some writers leave it, counts as a tar layer).
pub fn layer_type(media_type: &str) -> LayerType {
    let m = media_type;
    if m.contains("nondistributable") || m.contains("foreign") {
        return LayerType::Foreign;
    }
    let known = m.is_empty()
        || m.starts_with("application/vnd.oci.image.layer.v1.tar")
        || m.starts_with("application/vnd.docker.image.rootfs.diff.tar")
        || m == "application/x-tar"
        || m == "application/tar";
    if known {
        LayerType::Tar
    } else {
        LayerType::Unknown
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A content descriptor: what a blob is, its digest and its size.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the blob.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Where a foreign layer may be fetched from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Annotations (the ref name of an image in an index).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform of an image in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image platform.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, ...).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`, ...).
    #[serde(default)]
    pub os: String,
    /// CPU variant (`v7`, `v8`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version (Windows images).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) if !v.is_empty() => write!(f, "/{v}"),
            _ => Ok(()),
        }
    }
}

/// An image index (or Docker manifest list; or an OCI layout's `index.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Media type, when the index says it.
    #[serde(default)]
    pub media_type: String,
    /// The manifests (or nested indexes) it lists.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Media type, when the manifest says it.
    #[serde(default)]
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// What an index entry or a blob of unknown type is, told from its JSON: an index
/// lists `manifests`, a manifest has `config` and `layers`.
#[derive(Debug, Clone, Deserialize)]
pub struct Probe {
    /// Present in indexes.
    #[serde(default)]
    pub manifests: Option<serde_json::Value>,
    /// Present in manifests.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// The `rootfs` of a config: the uncompressed digests of the layers.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// One digest per layer, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// What snapfs reads of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Config {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// CPU variant.
    #[serde(default)]
    pub variant: Option<String>,
    /// The layers' uncompressed digests.
    #[serde(default)]
    pub rootfs: RootFs,
}

impl Config {
    /// The platform the config describes.
    pub fn platform(&self) -> Platform {
        Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
            os_version: None,
        }
    }
}

/// One image of `docker save`'s `manifest.json` (a JSON array of these).
#[derive(Debug, Clone, Deserialize)]
pub struct DockerEntry {
    /// Path of the config in the archive.
    #[serde(rename = "Config")]
    pub config: String,
    /// The image's names (`repo:tag`).
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, bottom first.
    #[serde(rename = "Layers", default)]
    pub layers: Vec<String>,
    /// Descriptors of foreign layers, by diff_id.
    #[serde(rename = "LayerSources", default)]
    pub layer_sources: BTreeMap<String, Descriptor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_json_is_refused_not_panicked_on() {
        let d = format!("sha256:{}", "0".repeat(64));
        let ok = format!(r#"{{"mediaType":"x","digest":"{d}","size":5}}"#);
        assert_eq!(serde_json::from_str::<Descriptor>(&ok).unwrap().size, 5);
        for bad in [
            format!(r#"{{"digest":"{d}","size":-1}}"#),
            format!(r#"{{"digest":"{d}","size":1e30}}"#),
            format!(r#"{{"digest":"{d}","size":18446744073709551616}}"#),
            r#"{"digest":"sha256:../../x","size":1}"#.to_string(),
            format!(r#"{{"digest":"{d}"}}"#),
        ] {
            assert!(serde_json::from_str::<Descriptor>(&bad).is_err(), "{bad}");
        }
        let deep = "[".repeat(100_000);
        assert!(serde_json::from_str::<Index>(&deep).is_err());
        assert_eq!(
            layer_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            LayerType::Tar
        );
        assert_eq!(
            layer_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            LayerType::Tar
        );
        assert_eq!(
            layer_type("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
            LayerType::Foreign
        );
        assert_eq!(
            layer_type("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            LayerType::Foreign
        );
        assert_eq!(
            layer_type("application/vnd.in-toto+json"),
            LayerType::Unknown
        );
    }
}
