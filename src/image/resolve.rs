//! From an image input's files to one image's layers: read `index.json` (or
//! `manifest.json`), choose the image ([`super::select`]), follow nested indexes to a
//! manifest, read the config, and open each layer blob as a source. Small JSON blobs
//! are checked against their digests and sizes here (that costs nothing); layers only
//! against their sizes, and their first bytes are never trusted for more than
//! compression detection. Foreign / non-distributable layers are refused.

use std::path::Path;

use crate::archive::Compression;
use crate::error::{Error, Result};

use super::digest::{Digest, Hasher};
use super::model::{self, Config, Descriptor, DockerEntry, LayerType, Manifest, Platform, Probe};
use super::select::{self, Select, CONTAINERD_NAME, REF_NAME};
use super::store::{Kind, Store};
use super::{Image, JsonBlob, Layer, MAX_CONFIG, MAX_JSON, MAX_LAYERS};

/// Nested indexes followed at most.
const MAX_DEPTH: usize = 4;

/// Resolves the image `select` asks for.
pub fn resolve(path: &Path, store: Store, kind: Kind, select: &Select) -> Result<Image> {
    match kind {
        Kind::Oci => oci(path, store, select),
        Kind::DockerSave => docker(path, store, select),
    }
}

fn err(path: &Path, m: impl Into<String>) -> Error {
    Error::image(path, m)
}

fn json<T: serde::de::DeserializeOwned>(path: &Path, what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| err(path, format!("{what}: bad JSON: {e}")))
}

/// Reads the blob `d` describes, checking its size and digest.
fn read_blob(path: &Path, store: &Store, d: &Descriptor, what: &str, cap: u64) -> Result<Vec<u8>> {
    let rel = d.digest.blob_path();
    let label = format!("{what} {}", d.digest);
    if d.size > cap {
        return Err(err(
            path,
            format!("{label}: size {} is over the {cap}-byte limit", d.size),
        ));
    }
    let Some(size) = store.size(path, &rel)? else {
        return Err(err(path, format!("{label}: blob {rel} is missing")));
    };
    if size != d.size {
        return Err(err(
            path,
            format!(
                "{label}: blob is {size} bytes, its descriptor says {}",
                d.size
            ),
        ));
    }
    let bytes = store.read(path, &rel, cap)?;
    check_digest(path, &label, &d.digest, &bytes)?;
    Ok(bytes)
}

fn check_digest(path: &Path, label: &str, want: &Digest, bytes: &[u8]) -> Result<()> {
    let mut h = Hasher::new(want.algorithm());
    h.update(bytes);
    let got = h.finish();
    if &got != want {
        return Err(err(path, format!("{label}: content hashes to {got}")));
    }
    Ok(())
}

/// The names an index entry is known by.
fn names(d: &Descriptor) -> Vec<String> {
    [CONTAINERD_NAME, REF_NAME]
        .iter()
        .filter_map(|k| d.annotations.get(*k).cloned())
        .collect()
}

fn is_index(d: &Descriptor, store: &Store, path: &Path) -> Result<bool> {
    match d.media_type.as_str() {
        model::MT_OCI_INDEX | model::MT_DOCKER_LIST => Ok(true),
        model::MT_OCI_MANIFEST | model::MT_DOCKER_MANIFEST => Ok(false),
        _ => {
            let bytes = read_blob(path, store, d, "manifest", MAX_JSON)?;
            let p: Probe = json(path, &format!("manifest {}", d.digest), &bytes)?;
            Ok(p.manifests.is_some() && p.config.is_none())
        }
    }
}

/// Entries that are attestations or other artifacts, not images.
fn is_artifact(d: &Descriptor) -> bool {
    d.annotations.contains_key("vnd.docker.reference.type")
        || d.platform.as_ref().is_some_and(|p| p.os == "unknown")
}

fn list_platforms(entries: &[Descriptor]) -> String {
    let v: Vec<String> = entries
        .iter()
        .filter(|d| !is_artifact(d))
        .map(|d| {
            d.platform
                .as_ref()
                .map_or("(no platform)".to_string(), Platform::to_string)
        })
        .collect();
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}

/// Chooses by platform among `entries` (all of one image).
fn by_platform<'a>(
    path: &Path,
    entries: &'a [Descriptor],
    select: &Select,
    what: &str,
) -> Result<&'a Descriptor> {
    let candidates: Vec<(usize, Platform)> = entries
        .iter()
        .enumerate()
        .filter(|(_, d)| !is_artifact(d))
        .filter_map(|(i, d)| d.platform.clone().map(|p| (i, p)))
        .collect();
    match select::pick_platform(&candidates, select.platform.as_ref()) {
        Some(i) => Ok(&entries[i]),
        None => {
            let want = select
                .platform
                .clone()
                .unwrap_or_else(select::host_platform);
            let hint = if select.platform.is_none() {
                " (the host's; choose one with --platform)"
            } else {
                ""
            };
            Err(err(
                path,
                format!(
                    "{what} has no image for {want}{hint}; it has: {}",
                    list_platforms(entries)
                ),
            ))
        }
    }
}

fn oci(path: &Path, store: Store, select: &Select) -> Result<Image> {
    let top: model::Index = json(
        path,
        "index.json",
        &store.read(path, "index.json", MAX_JSON)?,
    )?;
    if top.manifests.is_empty() {
        return Err(err(path, "index.json lists no images"));
    }
    let listed = |entries: &[Descriptor]| -> String {
        let mut v: Vec<String> = entries
            .iter()
            .filter(|d| !is_artifact(d))
            .map(|d| {
                names(d)
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| d.digest.to_string())
            })
            .collect();
        v.dedup();
        v.join(", ")
    };
    // Entries named as asked (or all of them).
    let matching: Vec<Descriptor> = match &select.reference {
        Some(r) => {
            let m: Vec<Descriptor> = top
                .manifests
                .iter()
                .filter(|d| select::ref_matches(r, &names(d)) || d.digest.to_string() == *r)
                .cloned()
                .collect();
            if m.is_empty() {
                return Err(err(
                    path,
                    format!("no image named {r:?}; it has: {}", listed(&top.manifests)),
                ));
            }
            m
        }
        None => top
            .manifests
            .iter()
            .filter(|d| !is_artifact(d))
            .cloned()
            .collect(),
    };
    let chosen = match matching.as_slice() {
        [] => return Err(err(path, "index.json lists no images")),
        [one] => one.clone(),
        many => {
            // Several entries: the platforms of one image, or several images.
            let mut distinct: Vec<String> = many
                .iter()
                .map(|d| names(d).into_iter().next().unwrap_or_default())
                .collect();
            distinct.sort();
            distinct.dedup();
            let platforms = many.iter().all(|d| d.platform.is_some());
            if distinct.len() > 1 && select.reference.is_none() && !platforms {
                return Err(err(
                    path,
                    format!(
                        "holds {} images; choose one with --image: {}",
                        many.len(),
                        listed(many)
                    ),
                ));
            }
            if distinct.len() > 1 && select.reference.is_none() {
                return Err(err(
                    path,
                    format!(
                        "holds several images; choose one with --image: {}",
                        listed(many)
                    ),
                ));
            }
            by_platform(path, many, select, "index.json")?.clone()
        }
    };
    let reference = names(&chosen)
        .into_iter()
        .next()
        .or_else(|| select.reference.clone())
        .unwrap_or_else(|| chosen.digest.to_string());
    // Nested indexes down to a manifest.
    let mut desc = chosen;
    let mut depth = 0;
    while is_index(&desc, &store, path)? {
        depth += 1;
        if depth > MAX_DEPTH {
            return Err(err(
                path,
                format!("image indexes nest deeper than {MAX_DEPTH}"),
            ));
        }
        let bytes = read_blob(path, &store, &desc, "index", MAX_JSON)?;
        let inner: model::Index = json(path, &format!("index {}", desc.digest), &bytes)?;
        let what = format!("{reference} (index {})", desc.digest);
        desc = by_platform(path, &inner.manifests, select, &what)?.clone();
    }
    let bytes = read_blob(path, &store, &desc, "manifest", MAX_JSON)?;
    let manifest: Manifest = json(path, &format!("manifest {}", desc.digest), &bytes)?;
    let manifest_blob = JsonBlob {
        digest: Some(desc.digest.clone()),
        media_type: if desc.media_type.is_empty() {
            manifest.media_type.clone()
        } else {
            desc.media_type.clone()
        },
        bytes,
    };
    let config_bytes = read_blob(path, &store, &manifest.config, "config", MAX_CONFIG)?;
    let config: Config = json(
        path,
        &format!("config {}", manifest.config.digest),
        &config_bytes,
    )?;
    check_platform(path, &config, select)?;
    if manifest.layers.len() > MAX_LAYERS {
        return Err(err(
            path,
            format!(
                "{} layers; at most {MAX_LAYERS} are supported",
                manifest.layers.len()
            ),
        ));
    }
    if manifest.layers.is_empty() {
        return Err(err(
            path,
            format!("manifest {} lists no layers", desc.digest),
        ));
    }
    check_diff_ids(path, &config, manifest.layers.len())?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, d) in manifest.layers.iter().enumerate() {
        let label = d.digest.to_string();
        match model::layer_type(&d.media_type) {
            LayerType::Tar if d.urls.is_empty() => {}
            LayerType::Tar | LayerType::Foreign => {
                let from = d
                    .urls
                    .first()
                    .map_or(String::new(), |u| format!(", to be fetched from {u}"));
                return Err(err(
                    path,
                    format!(
                        "layer {label} is a foreign / non-distributable layer{from}; snapfs mounts only layers stored in the image"
                    ),
                ));
            }
            LayerType::Unknown => {
                return Err(err(
                    path,
                    format!(
                        "layer {label} has media type {:?}, not a tar layer",
                        d.media_type
                    ),
                ));
            }
        }
        let rel = d.digest.blob_path();
        let Some((source, size)) = store.open(path, &rel, Some(&d.digest))? else {
            return Err(err(path, format!("layer {label}: blob {rel} is missing")));
        };
        if size != d.size {
            return Err(err(
                path,
                format!(
                    "layer {label}: blob is {size} bytes, the manifest says {}",
                    d.size
                ),
            ));
        }
        layers.push(Layer {
            media_type: d.media_type.clone(),
            digest: Some(d.digest.clone()),
            size,
            diff_id: config.rootfs.diff_ids.get(i).cloned(),
            source,
            label,
        });
    }
    Ok(Image {
        path: path.to_path_buf(),
        kind: Kind::Oci,
        reference,
        manifest: Some(manifest_blob),
        config_blob: JsonBlob {
            digest: Some(manifest.config.digest.clone()),
            media_type: manifest.config.media_type.clone(),
            bytes: config_bytes,
        },
        config,
        layers,
    })
}

/// With an explicit `--platform`, the image chosen must be for it.
fn check_platform(path: &Path, config: &Config, select: &Select) -> Result<()> {
    if let Some(want) = &select.platform {
        let have = config.platform();
        if !have.os.is_empty() && !select::platform_matches(want, &have) {
            return Err(err(path, format!("the image is for {have}, not {want}")));
        }
    }
    Ok(())
}

fn check_diff_ids(path: &Path, config: &Config, layers: usize) -> Result<()> {
    let n = config.rootfs.diff_ids.len();
    if n != layers {
        return Err(err(
            path,
            format!("the config lists {n} diff_ids for {layers} layers"),
        ));
    }
    Ok(())
}

/// `sha256:<stem>` of a `<64 hex>.json` or `blobs/sha256/<hex>` name, if it is one.
fn digest_of_name(rel: &str) -> Option<Digest> {
    let rel = rel.strip_prefix("./").unwrap_or(rel);
    if let Some(rest) = rel.strip_prefix("blobs/") {
        let (alg, hex) = rest.split_once('/')?;
        return Digest::parse(&format!("{alg}:{hex}")).ok();
    }
    let stem = rel.strip_suffix(".json")?;
    Digest::parse(&format!("sha256:{stem}")).ok()
}

fn docker(path: &Path, store: Store, select: &Select) -> Result<Image> {
    let entries: Vec<DockerEntry> = json(
        path,
        "manifest.json",
        &store.read(path, "manifest.json", MAX_JSON)?,
    )?;
    let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let listed = || {
        let v: Vec<String> = entries
            .iter()
            .map(|e| tags(e).join(" ").chars().take(200).collect::<String>())
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("(untagged image {})", i + 1)
                } else {
                    t
                }
            })
            .collect();
        v.join(", ")
    };
    let (entry, reference) = match &select.reference {
        Some(r) => {
            let found = entries.iter().find(|e| select::ref_matches(r, &tags(e)));
            match found {
                Some(e) => {
                    let shown = tags(e)
                        .into_iter()
                        .find(|t| select::ref_matches(r, std::slice::from_ref(t)))
                        .unwrap_or_else(|| r.clone());
                    (e, shown)
                }
                None => {
                    return Err(err(
                        path,
                        format!("no image named {r:?}; it has: {}", listed()),
                    ))
                }
            }
        }
        None => match entries.as_slice() {
            [] => return Err(err(path, "manifest.json lists no images")),
            [one] => (one, tags(one).into_iter().next().unwrap_or_default()),
            many => {
                return Err(err(
                    path,
                    format!(
                        "holds {} images; choose one with --image: {}",
                        many.len(),
                        listed()
                    ),
                ))
            }
        },
    };
    let config_digest = digest_of_name(&entry.config);
    let config_bytes = store.read(path, &entry.config, MAX_CONFIG)?;
    if let Some(d) = &config_digest {
        check_digest(path, &format!("config {}", entry.config), d, &config_bytes)?;
    }
    let config: Config = json(path, &format!("config {}", entry.config), &config_bytes)?;
    check_platform(path, &config, select)?;
    if entry.layers.len() > MAX_LAYERS {
        return Err(err(
            path,
            format!(
                "{} layers; at most {MAX_LAYERS} are supported",
                entry.layers.len()
            ),
        ));
    }
    if entry.layers.is_empty() {
        return Err(err(path, format!("image {} lists no layers", entry.config)));
    }
    check_diff_ids(path, &config, entry.layers.len())?;
    let reference = if reference.is_empty() {
        config_digest
            .as_ref()
            .map_or_else(|| entry.config.clone(), Digest::to_string)
    } else {
        reference
    };
    let mut layers = Vec::with_capacity(entry.layers.len());
    for (i, rel) in entry.layers.iter().enumerate() {
        let diff_id = config.rootfs.diff_ids.get(i).cloned();
        let named = digest_of_name(rel).filter(|_| rel.starts_with("blobs/"));
        let opened = store.open(path, rel, named.as_ref())?;
        let Some((source, size)) = opened else {
            let foreign = diff_id
                .as_ref()
                .and_then(|d| entry.layer_sources.get(&d.to_string()))
                .map(|d| d.urls.first().cloned().unwrap_or_default());
            return Err(err(
                path,
                match foreign {
                    Some(u) => format!(
                        "layer {rel} is a foreign layer (to be fetched from {u}); snapfs mounts only layers stored in the image"
                    ),
                    None => format!("layer {rel} is missing"),
                },
            ));
        };
        // A plain-tar layer's blob digest is its diff_id: open it again so it is
        // identified (and its index keyed) by that digest.
        let (source, digest) = match named {
            Some(d) => (source, Some(d)),
            None => {
                let mut head = [0u8; crate::archive::DETECT_BYTES];
                let n = source
                    .read_at(&mut head, 0)
                    .map_err(|e| Error::io("reading", source.name(), e))?;
                match (&diff_id, Compression::detect(&head[..n])) {
                    (Some(d), Compression::None) => match store.open(path, rel, Some(d))? {
                        Some((s, _)) => (s, Some(d.clone())),
                        None => (source, None),
                    },
                    _ => (source, None),
                }
            }
        };
        layers.push(Layer {
            media_type: String::new(),
            label: digest
                .as_ref()
                .map_or_else(|| rel.clone(), Digest::to_string),
            digest,
            size,
            diff_id,
            source,
        });
    }
    Ok(Image {
        path: path.to_path_buf(),
        kind: Kind::DockerSave,
        reference,
        manifest: None,
        config_blob: JsonBlob {
            digest: config_digest,
            media_type: String::new(),
            bytes: config_bytes,
        },
        config,
        layers,
    })
}
