//! An object in S3-compatible storage (`s3://BUCKET/KEY`) or behind an HTTP server
//! that answers Range requests (`http(s)://HOST/PATH`) as a [`Source`], through the
//! `object_store` crate, whose futures run on one small runtime shared by every remote
//! source of the process.
//!
//! Opening is one round trip: the first block and the last two are fetched at once,
//! and their answers give the size and ETag (a HEAD instead when a disk cache may
//! already hold the blocks, or as the fallback). A missing object or a denied request
//! is one error line then, and a server that ignores Range is refused, never
//! downloaded. Bytes are fetched in aligned blocks of [`BLOCK`] bytes: a read fetches
//! the blocks it lacks, adjacent ones as one request, and keeps them in a small LRU in
//! memory (and in the on-disk [`DiskCache`] if one is set). Reads that continue where
//! the last one ended are sequential: the blocks ahead are fetched in the background,
//! several requests in flight, the window doubling up to [`AHEAD_MAX`] blocks.
//!
//! Every range request carries `If-Match: <ETag>`: once the object is replaced, the
//! server refuses (412) and this read and every later one fail (EIO), so bytes of two
//! versions are never mixed. Requests time out, are retried with backoff on 5xx and
//! throttling (by `object_store`), and at most [`IN_FLIGHT`] run at once per source; a
//! failed request fails only the reads that needed it.
//!
//! Credentials and endpoint come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` or
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true`). `SNAPFS_REMOTE_TIMEOUT` (seconds, default 30)
//! bounds one request, `SNAPFS_REMOTE_RETRIES` (default 5) its retries.

use std::collections::HashSet;
use std::io;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::{
    aws::AmazonS3Builder, http::HttpBuilder, path::Path as ObjPath, BackoffConfig, ClientOptions,
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig,
};

use super::disk::DiskCache;
use super::{Identity, IndexHome, Source};
use crate::error::{Error, Result};

/// Bytes per fetched block (the unit of the memory and disk caches).
pub const BLOCK: u64 = 256 << 10;
/// Blocks kept in memory per source (32 MiB).
const MEM_BLOCKS: usize = 128;
/// Blocks per background request of a sequential reader.
const AHEAD_CHUNK: u64 = 4;
/// First read-ahead window of a sequential reader, in blocks.
const AHEAD_MIN: u64 = 8;
/// Largest read-ahead window, in blocks (16 MiB).
const AHEAD_MAX: u64 = 64;
/// Requests in flight per source at most.
const IN_FLIGHT: usize = 16;

/// True if `p` names a remote object (`s3://`, `http://`, `https://`).
pub fn is_remote(p: &Path) -> bool {
    let s = p.as_os_str().as_encoded_bytes();
    [&b"s3://"[..], b"http://", b"https://"]
        .iter()
        .any(|pre| s.starts_with(pre))
}

/// The runtime every remote request runs on (two worker threads, started on first use).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapfs-remote")
            .enable_all()
            .build()
            .expect("cannot start the remote I/O runtime")
    })
}

/// Runs `fut` to completion on the remote runtime, from any thread outside it.
pub(crate) fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    runtime().block_on(fut)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn client_options(allow_http: bool) -> ClientOptions {
    let timeout = Duration::from_secs(env_u64("SNAPFS_REMOTE_TIMEOUT", 30).max(1));
    ClientOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(timeout.min(Duration::from_secs(5)))
        .with_allow_http(allow_http)
}

fn retry_config() -> RetryConfig {
    let timeout = env_u64("SNAPFS_REMOTE_TIMEOUT", 30).max(1);
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: env_u64("SNAPFS_REMOTE_RETRIES", 5) as usize,
        retry_timeout: Duration::from_secs(timeout),
    }
}

/// A remote object's store and its path in it.
pub(crate) struct Location {
    /// The URL as given.
    pub url: String,
    /// The store (a bucket, or an HTTP server).
    pub store: Arc<dyn ObjectStore>,
    /// The object's path in the store.
    pub path: ObjPath,
}

/// Parses `url` into a store and a path (no request is sent).
pub(crate) fn locate(url: &str) -> Result<Location> {
    let bad = |why: &str| Error::Remote {
        url: url.to_string(),
        message: why.to_string(),
    };
    let store_err = |e: object_store::Error| Error::Remote {
        url: url.to_string(),
        message: format!("cannot configure the object store: {e}"),
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .ok_or_else(|| bad("an S3 URL is s3://BUCKET/KEY"))?;
        let mut builder = AmazonS3Builder::from_env();
        // AWS_ENDPOINT_URL is the name the AWS CLI and SDKs use; object_store reads
        // AWS_ENDPOINT.
        if std::env::var_os("AWS_ENDPOINT").is_none() {
            if let Ok(e) = std::env::var("AWS_ENDPOINT_URL") {
                builder = builder.with_endpoint(e);
            }
        }
        let allow_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
        let store = builder
            .with_bucket_name(bucket)
            .with_retry(retry_config())
            .with_client_options(client_options(allow_http))
            .build()
            .map_err(store_err)?;
        let path = ObjPath::parse(key).map_err(|e| bad(&format!("bad key: {e}")))?;
        return Ok(Location {
            url: url.to_string(),
            store: Arc::new(store),
            path,
        });
    }
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(s, _)| *s == "http" || *s == "https")
        .ok_or_else(|| bad("not an s3://, http:// or https:// URL"))?;
    let (host, path) = rest
        .split_once('/')
        .filter(|(h, p)| !h.is_empty() && !p.is_empty())
        .ok_or_else(|| bad("an HTTP URL names a file: http://HOST/PATH"))?;
    let store = HttpBuilder::new()
        .with_url(format!("{scheme}://{host}"))
        .with_retry(retry_config())
        .with_client_options(client_options(scheme == "http"))
        .build()
        .map_err(store_err)?;
    let path = ObjPath::parse(path).map_err(|e| bad(&format!("bad path: {e}")))?;
    Ok(Location {
        url: url.to_string(),
        store: Arc::new(store),
        path,
    })
}

/// One line for an object store error about `url`.
pub(crate) fn describe(e: &object_store::Error) -> String {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => "no such object (404)".into(),
        E::Precondition { .. } => "the object changed (its ETag no longer matches)".into(),
        E::PermissionDenied { source, .. } => format!("access denied: {source}"),
        E::Unauthenticated { source, .. } => {
            format!(
                "not authenticated (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): {source}"
            )
        }
        E::NotSupported { source } => format!("{source} (the server ignores Range requests)"),
        other => {
            let s = other.to_string();
            if s.contains("non-partial") {
                format!("{s} (the server ignores Range requests)")
            } else if s.contains("403") || s.contains("Forbidden") {
                format!("access denied: {s}")
            } else {
                s
            }
        }
    }
}

/// Counters of one remote source (for `snapfs list` and tests).
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Range requests sent.
    pub requests: AtomicU64,
    /// Bytes received.
    pub fetched: AtomicU64,
    /// Blocks served from memory or the disk cache.
    pub hits: AtomicU64,
    /// Blocks that had to be fetched.
    pub misses: AtomicU64,
}

struct Blocks {
    mem: lru::LruCache<u64, Bytes>,
    pending: HashSet<u64>,
    /// End of the last read, and the read-ahead window.
    last_end: u64,
    ahead: u64,
    /// Blocks up to here are fetched or pending for the sequential reader.
    ahead_until: u64,
}

struct Shared {
    loc: Location,
    size: u64,
    etag: Option<String>,
    blocks: Mutex<Blocks>,
    arrived: Condvar,
    limit: tokio::sync::Semaphore,
    changed: OnceLock<String>,
    disk: Option<Arc<DiskCache>>,
    key: String,
    stats: RemoteStats,
}

/// A remote object, read by ranges.
pub struct RemoteSource {
    shared: Arc<Shared>,
}

impl RemoteSource {
    /// Opens the object at `url` (`s3://BUCKET/KEY`, `http(s)://HOST/PATH`): one HEAD,
    /// then one range read to check that the server honours Range. Blocks are also
    /// kept in `disk` if given.
    pub fn open(url: &str, disk: Option<Arc<DiskCache>>) -> Result<RemoteSource> {
        Self::open_at(locate(url)?, disk)
    }

    fn open_at(loc: Location, disk: Option<Arc<DiskCache>>) -> Result<RemoteSource> {
        let url = loc.url.clone();
        let url = url.as_str();
        let remote_err = |e: &object_store::Error| Error::Remote {
            url: url.to_string(),
            message: describe(e),
        };
        // One round trip: the first block and the last two, at once. Their answers
        // give the size and ETag; a HEAD is the fallback (an empty object, a server
        // that answers one of them oddly), and names the problem if there is one.
        // With a disk cache, a HEAD first: the blocks may be on disk already (their
        // key needs the size and ETag).
        let quick = disk.is_none();
        let (first, last) = block_on(async {
            if !quick {
                let skipped = || {
                    Err(object_store::Error::Generic {
                        store: "snapfs",
                        source: "skipped".into(),
                    })
                };
                return (skipped(), skipped());
            }
            let get = |range| {
                let opts = GetOptions {
                    range: Some(range),
                    ..Default::default()
                };
                let (store, path) = (loc.store.clone(), loc.path.clone());
                async move {
                    let res = store.get_opts(&path, opts).await?;
                    let (meta, range) = (res.meta.clone(), res.range.clone());
                    Ok::<_, object_store::Error>((meta, range, res.bytes().await?))
                }
            };
            tokio::join!(
                get(GetRange::Bounded(0..BLOCK)),
                get(GetRange::Suffix(2 * BLOCK))
            )
        });
        let mut early: Vec<(Range<u64>, Bytes)> = Vec::new();
        let meta = match (first, last) {
            (Ok((a, ra, ba)), Ok((b, rb, bb)))
                if a.size == b.size && a.e_tag == b.e_tag && a.size > 0 =>
            {
                early.push((ra, ba));
                early.push((rb, bb));
                a
            }
            (Err(e), _) | (_, Err(e))
                if matches!(
                    e,
                    object_store::Error::NotFound { .. }
                        | object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                ) =>
            {
                return Err(remote_err(&e))
            }
            _ => block_on(loc.store.head(&loc.path)).map_err(|e| remote_err(&e))?,
        };
        let etag = meta.e_tag.clone();
        let key = identity_key(url, meta.size, etag.as_deref());
        let shared = Arc::new(Shared {
            loc,
            size: meta.size,
            etag,
            blocks: Mutex::new(Blocks {
                mem: lru::LruCache::new(NonZeroUsize::new(MEM_BLOCKS).unwrap_or(NonZeroUsize::MIN)),
                pending: HashSet::new(),
                last_end: u64::MAX,
                ahead: AHEAD_MIN,
                ahead_until: 0,
            }),
            arrived: Condvar::new(),
            limit: tokio::sync::Semaphore::new(IN_FLIGHT),
            changed: OnceLock::new(),
            disk,
            key,
            stats: RemoteStats::default(),
        });
        let src = RemoteSource { shared };
        src.shared.adopt(&early);
        if src.shared.size > 0 {
            // The first block: refuses a server that ignores Range, before any mount.
            src.shared.get_blocks(0, 1).map_err(|e| Error::Remote {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        }
        Ok(src)
    }

    /// The object's ETag, if the server gave one.
    pub fn etag(&self) -> Option<&str> {
        self.shared.etag.as_deref()
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.shared.loc.url
    }

    /// Its counters.
    pub fn stats(&self) -> &RemoteStats {
        &self.shared.stats
    }
}

/// A file-name safe key of one version of one object: its URL, size and ETag.
pub fn identity_key(url: &str, size: u64, etag: Option<&str>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(url.as_bytes());
    h.update([0]);
    h.update(size.to_le_bytes());
    h.update(etag.unwrap_or("").as_bytes());
    let d = h.finalize();
    let name: String = url
        .rsplit('/')
        .next()
        .unwrap_or("object")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(40)
        .collect();
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("remote-{name}.{hex}")
}

impl Shared {
    fn io_error(&self, e: object_store::Error) -> io::Error {
        if matches!(e, object_store::Error::Precondition { .. }) {
            let why = self
                .changed
                .get_or_init(|| {
                    format!(
                        "{} changed since it was mounted (its ETag no longer matches)",
                        self.loc.url
                    )
                })
                .clone();
            return io::Error::other(why);
        }
        io::Error::other(format!("{}: {}", self.loc.url, describe(&e)))
    }

    /// Fetches `[start, end)` (block aligned, or the object's end) in one request.
    async fn fetch(&self, range: Range<u64>) -> io::Result<Bytes> {
        let _permit = self
            .limit
            .acquire()
            .await
            .map_err(|_| io::Error::other("remote source closed"))?;
        let opts = GetOptions {
            if_match: self.etag.clone(),
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let res = self
            .loc
            .store
            .get_opts(&self.loc.path, opts)
            .await
            .map_err(|e| self.io_error(e))?;
        if res.meta.size != self.size
            || (self.etag.is_some() && res.meta.e_tag.is_some() && res.meta.e_tag != self.etag)
        {
            let why = self
                .changed
                .get_or_init(|| format!("{} changed since it was mounted", self.loc.url));
            return Err(io::Error::other(why.clone()));
        }
        let bytes = res.bytes().await.map_err(|e| self.io_error(e))?;
        self.stats
            .fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if bytes.len() as u64 != range.end - range.start {
            return Err(io::Error::other(format!(
                "{}: short range response ({} of {} bytes)",
                self.loc.url,
                bytes.len(),
                range.end - range.start
            )));
        }
        Ok(bytes)
    }

    /// Keeps the whole blocks inside `pieces` (ranges fetched at open) in memory.
    fn adopt(&self, pieces: &[(Range<u64>, Bytes)]) {
        let mut g = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        for (range, bytes) in pieces {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats
                .fetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if bytes.len() as u64 != range.end - range.start {
                continue;
            }
            let first = range.start.div_ceil(BLOCK);
            let mut b = first;
            loop {
                let r = self.block_range(b);
                if r.start >= self.size || r.end > range.end || r.start >= r.end {
                    break;
                }
                let s = (r.start - range.start) as usize;
                let blk = bytes.slice(s..s + (r.end - r.start) as usize);
                if let Some(d) = &self.disk {
                    d.put(&self.key, b, &blk);
                }
                g.mem.put(b, blk);
                b += 1;
            }
        }
    }

    /// Block `b` (claimed as pending) from the disk cache, if there: into memory,
    /// waiters woken.
    fn load_from_disk(&self, b: u64) -> Option<Bytes> {
        let blk = Bytes::from(self.disk.as_ref()?.get(&self.key, b, self.block_len(b))?);
        {
            let mut g = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
            g.pending.remove(&b);
            g.mem.put(b, blk.clone());
        }
        self.arrived.notify_all();
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(blk)
    }

    fn block_len(&self, b: u64) -> u64 {
        let r = self.block_range(b);
        r.end - r.start
    }

    fn block_range(&self, b: u64) -> Range<u64> {
        let start = b * BLOCK;
        start..(start + BLOCK).min(self.size)
    }

    /// Fetches the run of blocks `[first, last]` (claimed as pending by the caller),
    /// stores them and wakes waiters; returns them.
    async fn fetch_run(&self, first: u64, last: u64) -> io::Result<Vec<Bytes>> {
        let range = self.block_range(first).start..self.block_range(last).end;
        let r = self.fetch(range).await;
        let mut g = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        for b in first..=last {
            g.pending.remove(&b);
        }
        let out = match r {
            Ok(bytes) => {
                let mut out = Vec::with_capacity((last - first + 1) as usize);
                for b in first..=last {
                    let s = ((b - first) * BLOCK) as usize;
                    let e = (s + BLOCK as usize).min(bytes.len());
                    let blk = bytes.slice(s..e);
                    g.mem.put(b, blk.clone());
                    out.push(blk);
                }
                Ok(out)
            }
            Err(e) => Err(e),
        };
        drop(g);
        self.arrived.notify_all();
        if let (Ok(blocks), Some(disk)) = (&out, &self.disk) {
            for (i, blk) in blocks.iter().enumerate() {
                disk.put(&self.key, first + i as u64, blk);
            }
        }
        out
    }

    /// Blocks `[first, first + n)`, from memory, the disk cache or the server (the
    /// missing ones that are adjacent in one request each, all runs at once).
    fn get_blocks(self: &Arc<Self>, first: u64, n: u64) -> io::Result<Vec<Bytes>> {
        let mut have: Vec<Option<Bytes>> = vec![None; n as usize];
        loop {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut waiting = false;
            {
                let mut g = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
                for i in 0..n {
                    if have[i as usize].is_some() {
                        continue;
                    }
                    let b = first + i;
                    if let Some(blk) = g.mem.get(&b) {
                        have[i as usize] = Some(blk.clone());
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    } else if g.pending.contains(&b) {
                        waiting = true;
                    } else {
                        g.pending.insert(b);
                        match runs.last_mut() {
                            Some((_, last)) if *last + 1 == b => *last = b,
                            _ => runs.push((b, b)),
                        }
                    }
                }
                if runs.is_empty() && waiting {
                    // Another reader (or the read-ahead) is fetching them.
                    let _g = self.arrived.wait(g).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
            }
            if runs.is_empty() {
                break;
            }
            // The disk cache first, block by block.
            let mut fetch_runs = Vec::new();
            for (a, z) in runs {
                let mut start = a;
                for b in a..=z {
                    if let Some(blk) = self.load_from_disk(b) {
                        have[(b - first) as usize] = Some(blk);
                        if b > start {
                            fetch_runs.push((start, b - 1));
                        }
                        start = b + 1;
                    }
                }
                if start <= z {
                    fetch_runs.push((start, z));
                }
            }
            if fetch_runs.is_empty() {
                continue;
            }
            for (a, z) in &fetch_runs {
                self.stats.misses.fetch_add(z - a + 1, Ordering::Relaxed);
            }
            let this = self.clone();
            let results = block_on(async move {
                let futs = fetch_runs.iter().map(|&(a, z)| {
                    let this = this.clone();
                    async move { (a, this.fetch_run(a, z).await) }
                });
                futures_join(futs).await
            });
            let mut err = None;
            for (a, r) in results {
                match r {
                    Ok(blocks) => {
                        for (i, blk) in blocks.into_iter().enumerate() {
                            have[(a - first) as usize + i] = Some(blk);
                        }
                    }
                    Err(e) => err = Some(e),
                }
            }
            if let Some(e) = err {
                return Err(e);
            }
        }
        Ok(have.into_iter().flatten().collect())
    }

    /// After a read of `[off, end)`: if it continued the last one, fetch the window
    /// ahead in the background.
    fn read_ahead(self: &Arc<Self>, off: u64, end: u64) {
        let last_block = (self.size.saturating_sub(1)) / BLOCK;
        let mut runs = Vec::new();
        {
            let mut g = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
            let sequential = g.last_end == off;
            g.last_end = end;
            if !sequential {
                g.ahead = AHEAD_MIN;
                g.ahead_until = 0;
                return;
            }
            let next = end.div_ceil(BLOCK);
            let until = (next + g.ahead).min(last_block + 1);
            if g.ahead_until >= next + g.ahead / 2 {
                return; // enough is on its way
            }
            g.ahead = (g.ahead * 2).min(AHEAD_MAX);
            let mut b = next.max(g.ahead_until);
            while b < until {
                let z = (b + AHEAD_CHUNK).min(until);
                let mut run: Option<(u64, u64)> = None;
                for x in b..z {
                    if g.mem.contains(&x) || g.pending.contains(&x) {
                        if let Some(r) = run.take() {
                            runs.push(r);
                        }
                        continue;
                    }
                    g.pending.insert(x);
                    run = Some(match run {
                        Some((a, _)) => (a, x),
                        None => (x, x),
                    });
                }
                if let Some(r) = run {
                    runs.push(r);
                }
                b = z;
            }
            g.ahead_until = until;
        }
        for (a, z) in runs {
            let this = self.clone();
            runtime().spawn(async move {
                // Blocks on disk need no request.
                let mut start = a;
                for b in a..=z {
                    if this.load_from_disk(b).is_some() {
                        if b > start {
                            let _ = this.fetch_run(start, b - 1).await;
                        }
                        start = b + 1;
                    }
                }
                if start <= z {
                    if let Err(e) = this.fetch_run(start, z).await {
                        log::debug!("read-ahead of {}: {e}", this.loc.url);
                    }
                }
            });
        }
    }
}

/// Awaits all of `futs`, concurrently.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(|f| tokio::spawn(f)).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

impl Source for RemoteSource {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let s = &self.shared;
        if let Some(why) = s.changed.get() {
            return Err(io::Error::other(why.clone()));
        }
        if off >= s.size || buf.is_empty() {
            return Ok(0);
        }
        let end = off.saturating_add(buf.len() as u64).min(s.size);
        let first = off / BLOCK;
        let last = (end - 1) / BLOCK;
        let blocks = s.get_blocks(first, last - first + 1)?;
        let mut done = 0usize;
        for (i, blk) in blocks.iter().enumerate() {
            let bstart = (first + i as u64) * BLOCK;
            let from = off.max(bstart) - bstart;
            let to = (end - bstart).min(blk.len() as u64);
            if from >= to {
                continue;
            }
            let piece = &blk[from as usize..to as usize];
            buf[done..done + piece.len()].copy_from_slice(piece);
            done += piece.len();
        }
        s.read_ahead(off, end);
        Ok(done)
    }

    fn identity(&self) -> Identity {
        let v = crc32fast::hash(self.shared.etag.as_deref().unwrap_or("").as_bytes());
        Identity {
            size: self.shared.size,
            version: i64::from(v),
        }
    }

    fn check_unchanged(&self) -> std::result::Result<(), String> {
        match self.shared.changed.get() {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    fn name(&self) -> PathBuf {
        PathBuf::from(&self.shared.loc.url)
    }

    fn index_home(&self) -> IndexHome {
        IndexHome::Keyed(self.shared.key.clone())
    }

    fn published_index(&self) -> Option<Vec<u8>> {
        let loc = &self.shared.loc;
        let side = sidecar(&loc.path);
        let got = block_on(async {
            let res = loc.store.get(&side).await?;
            if res.meta.size > MAX_SIDECAR {
                return Ok(None);
            }
            res.bytes().await.map(Some)
        });
        match got {
            Ok(Some(b)) => {
                self.shared
                    .stats
                    .fetched
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                Some(b.to_vec())
            }
            Ok(None) => None,
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => {
                log::info!("{}.snapfs-idx: {}", loc.url, describe(&e));
                None
            }
        }
    }

    fn publish_index(&self, index: &[u8]) -> std::result::Result<(), String> {
        let loc = &self.shared.loc;
        let side = sidecar(&loc.path);
        let payload = object_store::PutPayload::from(Bytes::copy_from_slice(index));
        block_on(loc.store.put(&side, payload))
            .map(drop)
            .map_err(|e| format!("cannot publish {}.snapfs-idx: {}", loc.url, describe(&e)))
    }
}

/// A published index larger than this is ignored.
const MAX_SIDECAR: u64 = 1 << 30;

/// The sidecar of an object: `KEY.snapfs-idx`.
fn sidecar(path: &ObjPath) -> ObjPath {
    ObjPath::from(format!("{path}{}", crate::index::store::SUFFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_and_parsed() {
        assert!(is_remote(Path::new("s3://b/k")));
        assert!(is_remote(Path::new("https://h/p")));
        assert!(!is_remote(Path::new("/tmp/s3://x")));
        assert!(locate("s3://bucket").is_err());
        assert!(locate("s3:///key").is_err());
        assert!(locate("http://host").is_err());
        let l = locate("http://127.0.0.1:9/a/b.tar").unwrap();
        assert_eq!(l.path.as_ref(), "a/b.tar");
    }

    fn memory_object(data: &[u8]) -> (Arc<dyn ObjectStore>, Location) {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let path = ObjPath::from("o.tar");
        block_on(store.put(&path, Bytes::copy_from_slice(data).into())).unwrap();
        let loc = Location {
            url: "s3://mem/o.tar".into(),
            store: store.clone(),
            path,
        };
        (store, loc)
    }

    #[test]
    fn reads_are_exact_coalesced_and_refused_once_the_object_changes() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (store, loc) = memory_object(&data);
        let src = RemoteSource::open_at(loc, None).unwrap();
        assert_eq!(src.identity().size, data.len() as u64);
        let before = src.stats().requests.load(Ordering::Relaxed);
        // One read over four missing blocks: one request.
        let mut buf = vec![0u8; 4 * BLOCK as usize];
        let off = 2 * BLOCK + 100;
        src.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf, data[off as usize..off as usize + buf.len()]);
        assert_eq!(src.stats().requests.load(Ordering::Relaxed) - before, 1);
        // Random reads, also across the end.
        for (o, n) in [
            (0u64, 10usize),
            (BLOCK - 3, 9),
            (2_999_990, 10),
            (1_234_567, 70_000),
        ] {
            let mut b = vec![0u8; n];
            src.read_exact_at(&mut b, o).unwrap();
            assert_eq!(b, data[o as usize..o as usize + n]);
        }
        let mut b = [0u8; 10];
        assert_eq!(src.read_at(&mut b, 2_999_995).unwrap(), 5);
        assert_eq!(src.read_at(&mut b, 3_000_000).unwrap(), 0);
        // Replaced: a block not yet fetched fails, and so does every later read.
        let far = 9 * BLOCK;
        block_on(store.put(
            &ObjPath::from("o.tar"),
            Bytes::from(vec![1u8; 3_000_000]).into(),
        ))
        .unwrap();
        let mut b = [0u8; 16];
        let e = src.read_exact_at(&mut b, far).unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
        assert!(src.check_unchanged().is_err());
        assert!(src.read_exact_at(&mut b, 0).is_err());
    }

    #[test]
    fn sequential_reads_fetch_ahead_and_the_disk_cache_serves_a_second_source() {
        let data: Vec<u8> = (0..6_000_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let (_store, loc) = memory_object(&data);
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 64 << 20).unwrap());
        let src = RemoteSource::open_at(loc, Some(disk.clone())).unwrap();
        let mut out = Vec::new();
        let mut off = 0u64;
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = src.read_at(&mut buf, off).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            off += n as u64;
        }
        assert!(out == data);
        let s = src.stats();
        let requests = s.requests.load(Ordering::Relaxed);
        assert!(
            requests < 12,
            "{requests} requests for 23 blocks read in sequence"
        );
        // A reader gets a block once it is in memory; the fetching task stores it
        // on disk just after (under load, after the loop above has ended).
        let blocks = (data.len() as u64).div_ceil(BLOCK);
        let t0 = std::time::Instant::now();
        while disk.summary().blocks < blocks {
            assert!(
                t0.elapsed().as_secs() < 20,
                "blocks never reached the disk cache"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // A second source of the same object: every block from disk.
        let (_store2, loc2) = memory_object(&data);
        let src2 = RemoteSource::open_at(loc2, Some(disk)).unwrap();
        let mut b = vec![0u8; 1 << 20];
        src2.read_exact_at(&mut b, 4 << 20).unwrap();
        assert!(b[..] == data[4 << 20..5 << 20]);
        assert_eq!(src2.stats().requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn identity_keys_differ_by_etag_and_size() {
        let a = identity_key("s3://b/x.tar", 10, Some("\"1\""));
        assert_ne!(a, identity_key("s3://b/x.tar", 10, Some("\"2\"")));
        assert_ne!(a, identity_key("s3://b/x.tar", 11, Some("\"1\"")));
        assert!(a.starts_with("remote-x.tar."));
        assert!(!a.contains('/'));
    }
}
