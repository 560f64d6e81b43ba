//! Writes a new OCI image that is an input image plus one more layer (what
//! `snapfs commit --image OUT` makes of a writable view's delta): the input's layer
//! blobs copied (each checked against its digest on the way), the new layer blob, a
//! new config (the input's JSON with the new `diff_id` appended to `rootfs.diff_ids`, a
//! `history` entry and a new `created` time; every other field kept), a new OCI
//! manifest and an `index.json` naming it. OUT is an OCI layout directory, or an OCI
//! archive (one tar of that layout) when its name ends in `.tar`. Either is written
//! under a temporary name beside OUT and renamed into place once complete, so a
//! failed write leaves nothing that looks like an image.
//!
//! Deterministic: with `created` given (the CLI takes `SOURCE_DATE_EPOCH`), the same
//! input and layer give byte-identical output.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::archive::Compression;
use crate::error::{Error, Result};
use crate::source::{Source, SourceReader};

use super::digest::{Algorithm, Digest, Hasher};
use super::model::{self, Descriptor};
use super::select::REF_NAME;
use super::Image;

/// How the new image is labelled.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The `org.opencontainers.image.ref.name` of the new image (default: the input's
    /// ref name when it is a plain tag, else `latest`).
    pub tag: Option<String>,
    /// Creation time, seconds since the epoch (default: now).
    pub created: Option<i64>,
    /// `history[].created_by` of the new layer.
    pub created_by: String,
    /// `history[].comment` of the new layer.
    pub comment: Option<String>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// The image written.
    pub path: PathBuf,
    /// Its ref name.
    pub tag: String,
    /// The new manifest's digest.
    pub manifest: Digest,
    /// The new config's digest.
    pub config: Digest,
    /// The new layer's digest.
    pub layer: Digest,
    /// The new layer's diff_id.
    pub diff_id: Digest,
    /// Layers of the new image.
    pub layers: usize,
}

/// The OCI layer media type for a layer of the input (Docker names become OCI
/// names; an unnamed one is named after the compression of its bytes).
fn oci_layer_type(media_type: &str, compression: Compression) -> String {
    let by_bytes = match compression {
        Compression::None => model::MT_OCI_LAYER,
        Compression::Gzip => model::MT_OCI_LAYER_GZIP,
        Compression::Zstd => model::MT_OCI_LAYER_ZSTD,
        // OCI names no xz or bzip2 layer type: the input's name is kept.
        Compression::Xz | Compression::Bzip2 => return media_type.to_string(),
    };
    if media_type.starts_with("application/vnd.oci.image.layer.") {
        media_type.to_string()
    } else {
        by_bytes.to_string()
    }
}

/// A blob to store: where its bytes come from and what they must hash to.
struct BlobIn {
    source: Arc<dyn Source>,
    size: u64,
    /// What the bytes must hash to.
    digest: Digest,
}

/// Where blobs go.
enum Out {
    Dir(PathBuf),
    Tar(tar::Builder<io::BufWriter<File>>),
}

/// Hashes while reading.
struct Hashing<R> {
    inner: R,
    hasher: Hasher,
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

fn tar_header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

impl Out {
    fn io_err(&self, out: &Path, e: io::Error) -> Error {
        Error::io("cannot write image", out, e)
    }

    fn dir(&mut self, out: &Path, rel: &str) -> Result<()> {
        match self {
            Out::Dir(root) => fs::create_dir_all(root.join(rel))
                .map_err(|e| Error::io("cannot create", root.join(rel), e)),
            Out::Tar(b) => {
                let mut h = tar_header(0, 0o755, tar::EntryType::Directory);
                b.append_data(&mut h, format!("{rel}/"), io::empty())
                    .map_err(|e| Error::io("cannot write image", out, e))
            }
        }
    }

    fn bytes(&mut self, out: &Path, rel: &str, data: &[u8]) -> Result<()> {
        match self {
            Out::Dir(root) => {
                let p = root.join(rel);
                let mut f = File::create(&p).map_err(|e| Error::io("cannot create", &p, e))?;
                f.write_all(data)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| Error::io("cannot write", &p, e))
            }
            Out::Tar(b) => {
                let mut h = tar_header(data.len() as u64, 0o644, tar::EntryType::Regular);
                let r = b.append_data(&mut h, rel, data);
                r.map_err(|e| self.io_err(out, e))
            }
        }
    }

    /// Copies `size` bytes from `r`.
    fn stream(&mut self, out: &Path, rel: &str, size: u64, r: &mut dyn Read) -> Result<()> {
        match self {
            Out::Dir(root) => {
                let p = root.join(rel);
                let mut f = File::create(&p).map_err(|e| Error::io("cannot create", &p, e))?;
                let n = io::copy(&mut r.take(size), &mut f)
                    .and_then(|n| f.sync_all().map(|()| n))
                    .map_err(|e| Error::io("cannot write", &p, e))?;
                if n != size {
                    return Err(Error::io(
                        "cannot write",
                        &p,
                        io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Ok(())
            }
            Out::Tar(b) => {
                let mut h = tar_header(size, 0o644, tar::EntryType::Regular);
                let r = b.append_data(&mut h, rel, r.take(size));
                r.map_err(|e| self.io_err(out, e))
            }
        }
    }
}

/// Stores `blob` as `blobs/<alg>/<hex>`, checking its digest on the way.
fn put_blob(out: &mut Out, path: &Path, image: &Path, label: &str, blob: &BlobIn) -> Result<()> {
    let mut r = Hashing {
        inner: BufReader::with_capacity(1 << 20, SourceReader::new(blob.source.clone())),
        hasher: Hasher::new(blob.digest.algorithm()),
        n: 0,
    };
    out.stream(path, &blob.digest.blob_path(), blob.size, &mut r)?;
    if r.n != blob.size {
        return Err(Error::image(
            image,
            format!("{label}: blob ends after {} bytes of {}", r.n, blob.size),
        ));
    }
    let got = r.hasher.finish();
    if got != blob.digest {
        return Err(Error::image(
            image,
            format!("{label}: blob content hashes to {got}; not copying a corrupt layer"),
        ));
    }
    Ok(())
}

/// The digest of a source's bytes (one pass).
fn digest_of(source: &Arc<dyn Source>, what: &Path) -> Result<Digest> {
    let mut h = Hasher::new(Algorithm::Sha256);
    io::copy(
        &mut BufReader::with_capacity(1 << 20, SourceReader::new(source.clone())),
        &mut h,
    )
    .map_err(|e| Error::io("reading", what, e))?;
    Ok(h.finish())
}

/// The sha256 of the uncompressed stream of a gzip, zstd, xz, bzip2 or plain tar file.
pub fn diff_id_of(path: &Path) -> Result<Digest> {
    let f = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let mut head = [0u8; crate::archive::DETECT_BYTES];
    let n = (&f)
        .read(&mut head)
        .map_err(|e| Error::io("reading", path, e))?;
    let f = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let r = BufReader::with_capacity(1 << 20, f);
    let mut h = Hasher::new(Algorithm::Sha256);
    let res = match Compression::detect(&head[..n]) {
        Compression::None => io::copy(&mut { r }, &mut h),
        Compression::Gzip => io::copy(&mut flate2::bufread::MultiGzDecoder::new(r), &mut h),
        Compression::Zstd => {
            zstd::stream::read::Decoder::with_buffer(r).and_then(|mut d| io::copy(&mut d, &mut h))
        }
        Compression::Xz => io::copy(
            &mut liblzma::bufread::XzDecoder::new_multi_decoder(r),
            &mut h,
        ),
        Compression::Bzip2 => io::copy(&mut bzip2::bufread::MultiBzDecoder::new(r), &mut h),
    };
    res.map_err(|e| Error::io("decompressing", path, e))?;
    Ok(h.finish())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of `secs` since the epoch.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The new config: `config` with `diff_id` appended and a history entry.
fn new_config(image: &Image, diff_id: &Digest, created: &str, opts: &Options) -> Result<Vec<u8>> {
    let mut cfg: Value = serde_json::from_slice(&image.config_blob.bytes)
        .map_err(|e| Error::image(&image.path, format!("config: bad JSON: {e}")))?;
    let Some(obj) = cfg.as_object_mut() else {
        return Err(Error::image(&image.path, "config is not a JSON object"));
    };
    let diff_ids: Vec<Value> = image
        .config
        .rootfs
        .diff_ids
        .iter()
        .chain(std::iter::once(diff_id))
        .map(|d| Value::String(d.to_string()))
        .collect();
    obj.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut entry = json!({"created": created, "created_by": opts.created_by});
    if let Some(c) = &opts.comment {
        entry["comment"] = Value::String(c.clone());
    }
    let mut history = match obj.remove("history") {
        Some(Value::Array(h)) => h,
        // Without a history, one entry per parent layer keeps the count right.
        _ => (0..image.layers.len())
            .map(|i| json!({"comment": format!("layer {} of {}", i + 1, image.reference)}))
            .collect(),
    };
    history.push(entry);
    obj.insert("history".into(), Value::Array(history));
    obj.insert("created".into(), Value::String(created.into()));
    serde_json::to_vec(&cfg).map_err(|e| Error::Internal(format!("config JSON: {e}")))
}

fn default_tag(image: &Image) -> String {
    let r = &image.reference;
    let plain = !r.is_empty()
        && !r.contains(['/', '@'])
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if plain {
        r.clone()
    } else {
        "latest".into()
    }
}

/// Writes `image` plus the layer file `layer` (a tar, tar.gz or tar.zst) as a new
/// image at `out` (see the module doc).
pub fn write_image(image: &Image, layer: &Path, out: &Path, opts: &Options) -> Result<Written> {
    if fs::symlink_metadata(out).is_ok() {
        return Err(Error::Usage(format!(
            "{} exists; commit --image writes a new image and never overwrites one",
            out.display()
        )));
    }
    let as_tar = out
        .file_name()
        .is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().ends_with(".tar"));
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tag = opts.tag.clone().unwrap_or_else(|| default_tag(image));
    let created = rfc3339(opts.created.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
    }));

    // The new layer.
    let layer_src: Arc<dyn Source> = Arc::new(crate::source::FileSource::open(layer)?);
    let layer_size = layer_src.identity().size;
    let layer_digest = digest_of(&layer_src, layer)?;
    let diff_id = diff_id_of(layer)?;
    let mut head = [0u8; crate::archive::DETECT_BYTES];
    let n = layer_src
        .read_at(&mut head, 0)
        .map_err(|e| Error::io("reading", layer, e))?;
    let layer_type = oci_layer_type("", Compression::detect(&head[..n]));

    // Blobs of the parent layers: digests known up front (computed for the few
    // `docker save` layers without one, so a tar can name its members).
    let mut parents = Vec::with_capacity(image.layers.len());
    for l in &image.layers {
        let digest = match &l.digest {
            Some(d) => d.clone(),
            None => digest_of(&l.source, &image.path)?,
        };
        let mut head = [0u8; crate::archive::DETECT_BYTES];
        let n = l
            .source
            .read_at(&mut head, 0)
            .map_err(|e| Error::io("reading", l.source.name(), e))?;
        parents.push((
            l,
            digest,
            oci_layer_type(&l.media_type, Compression::detect(&head[..n])),
        ));
    }

    let config = new_config(image, &diff_id, &created, opts)?;
    let config_digest = Digest::sha256_of(&config);
    let mut layer_descs: Vec<Value> = parents
        .iter()
        .map(|(l, d, mt)| json!({"mediaType": mt, "digest": d.to_string(), "size": l.size}))
        .collect();
    layer_descs.push(
        json!({"mediaType": layer_type, "digest": layer_digest.to_string(), "size": layer_size}),
    );
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": model::MT_OCI_MANIFEST,
        "config": {"mediaType": model::MT_OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len()},
        "layers": layer_descs,
    }))
    .map_err(|e| Error::Internal(format!("manifest JSON: {e}")))?;
    let manifest_digest = Digest::sha256_of(&manifest);
    let mut desc = Descriptor {
        media_type: model::MT_OCI_MANIFEST.into(),
        digest: manifest_digest.clone(),
        size: manifest.len() as u64,
        urls: Vec::new(),
        annotations: Default::default(),
        platform: None,
    };
    desc.annotations.insert(REF_NAME.into(), tag.clone());
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": model::MT_OCI_INDEX,
        "manifests": [desc],
    }))
    .map_err(|e| Error::Internal(format!("index JSON: {e}")))?;

    // Write under a temporary name, then rename.
    let name = out
        .file_name()
        .map_or("image".into(), |n| n.to_string_lossy().into_owned());
    let (tmp_dir, tmp_file);
    let mut sink = if as_tar {
        let t = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .tempfile_in(&parent)
            .map_err(|e| Error::io("cannot create a temporary file in", &parent, e))?;
        let f = t
            .reopen()
            .map_err(|e| Error::io("cannot open", t.path(), e))?;
        tmp_file = Some(t);
        tmp_dir = None;
        Out::Tar(tar::Builder::new(io::BufWriter::with_capacity(1 << 20, f)))
    } else {
        let d = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .tempdir_in(&parent)
            .map_err(|e| Error::io("cannot create a temporary directory in", &parent, e))?;
        let root = d.path().to_path_buf();
        tmp_dir = Some(d);
        tmp_file = None;
        Out::Dir(root)
    };
    let algs: Vec<&str> = {
        let mut v: Vec<&str> = parents
            .iter()
            .map(|(_, d, _)| d.algorithm().name())
            .collect();
        v.push("sha256");
        v.sort();
        v.dedup();
        v
    };
    sink.bytes(out, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    sink.dir(out, "blobs")?;
    for a in &algs {
        sink.dir(out, &format!("blobs/{a}"))?;
    }
    let mut seen = std::collections::HashSet::new();
    for (i, (l, d, _)) in parents.iter().enumerate() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let blob = BlobIn {
            source: l.source.clone(),
            size: l.size,
            digest: d.clone(),
        };
        put_blob(
            &mut sink,
            out,
            &image.path,
            &format!("layer {} {}", i + 1, l.label),
            &blob,
        )?;
    }
    if seen.insert(layer_digest.clone()) {
        let blob = BlobIn {
            source: layer_src,
            size: layer_size,
            digest: layer_digest.clone(),
        };
        put_blob(&mut sink, out, layer, "the new layer", &blob)?;
    }
    sink.bytes(out, &config_digest.blob_path(), &config)?;
    sink.bytes(out, &manifest_digest.blob_path(), &manifest)?;
    sink.bytes(out, "index.json", &index)?;
    match sink {
        Out::Tar(b) => {
            let w = b
                .into_inner()
                .map_err(|e| Error::io("cannot write image", out, e))?;
            let f = w
                .into_inner()
                .map_err(|e| Error::io("cannot write image", out, e.into_error()))?;
            f.sync_all()
                .map_err(|e| Error::io("cannot write image", out, e))?;
            if let Some(t) = tmp_file {
                fs::set_permissions(
                    t.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o644),
                )
                .map_err(|e| Error::io("cannot set permissions of", t.path(), e))?;
                t.persist_noclobber(out)
                    .map_err(|e| Error::io("cannot create", out, e.error))?;
            }
        }
        Out::Dir(_) => {
            if let Some(d) = tmp_dir {
                let p = d.keep();
                fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .map_err(|e| Error::io("cannot set permissions of", &p, e))?;
                if let Err(e) = fs::rename(&p, out) {
                    let _ = fs::remove_dir_all(&p);
                    return Err(Error::io("cannot create", out, e));
                }
            }
        }
    }
    Ok(Written {
        path: out.to_path_buf(),
        tag,
        manifest: manifest_digest,
        config: config_digest,
        layer: layer_digest,
        diff_id,
        layers: image.layers.len() + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
