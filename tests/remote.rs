//! Remote sources (issue 13): archives in S3 (moto's server, started here on
//! 127.0.0.1) and behind an HTTP server with Range support (nginx, own config and
//! prefix), reached through a small fault proxy of our own that counts the body bytes
//! it forwards and can inject 503s, drop connections, deny a key, or strip Range.
//! Every server is started by the test and stopped by pid.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::corpus::{self, Comp};
use crate::tree::{self, CmpOpts};
use crate::util::{self, Mount, TestDir};

// ---------------------------------------------------------------- servers

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

fn wait_port(port: u16, what: &str) {
    let up = util::poll_until(Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "{what} did not start listening on 127.0.0.1:{port}");
}

/// A child process stopped by its pid on drop.
struct Daemon {
    child: Child,
    what: &'static str,
}

impl Daemon {
    fn stop(&mut self) {
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let ok = util::poll_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !ok {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        let _ = self.what;
    }
}

/// moto's S3 server on 127.0.0.1.
struct Moto {
    port: u16,
    _d: Daemon,
}

fn moto(td: &TestDir) -> Moto {
    let port = free_port();
    let log = std::fs::File::create(td.join("moto.log")).unwrap();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("moto[server] is needed for the remote tests (pip install 'moto[server]')");
    let d = Daemon {
        child,
        what: "moto",
    };
    wait_port(port, "moto_server");
    Moto { port, _d: d }
}

/// nginx serving `root` on 127.0.0.1, with its own prefix, config and pid file.
struct Nginx {
    port: u16,
    _d: Daemon,
}

fn nginx(td: &TestDir, root: &Path) -> Nginx {
    let port = free_port();
    let prefix = td.mkdir("nginx");
    let conf = prefix.join("nginx.conf");
    let p = prefix.display();
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; pid {p}/nginx.pid; error_log {p}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;\n\
               fastcgi_temp_path {p}/fcgi; uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;\n\
               server {{ listen 127.0.0.1:{port}; root {}; }} }}\n",
            root.display()
        ),
    )
    .unwrap();
    let exe = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx is needed for the http:// source tests (apt-get install nginx-light)");
    let child = Command::new(exe)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let d = Daemon {
        child,
        what: "nginx",
    };
    wait_port(port, "nginx");
    Nginx { port, _d: d }
}

// ---------------------------------------------------------------- fault proxy

#[derive(Default)]
struct Faults {
    /// Response body bytes forwarded (GET only).
    body_bytes: AtomicU64,
    /// Requests forwarded to the server.
    requests: AtomicU64,
    /// Answer this many next requests with 503 SlowDown.
    fail_next: AtomicU32,
    /// Drop every connection (a network cut).
    down: AtomicBool,
    /// Remove Range headers (a server that ignores Range).
    strip_range: AtomicBool,
    /// Deny requests signed with this access key (403 InvalidAccessKeyId).
    deny_key: std::sync::Mutex<Option<String>>,
    /// Deny uploads of multipart parts (403), as a failure mid-upload.
    deny_parts: AtomicBool,
    stop: AtomicBool,
}

struct Proxy {
    port: u16,
    faults: Arc<Faults>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.faults.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Proxy {
    fn bytes(&self) -> u64 {
        self.faults.body_bytes.load(Ordering::SeqCst)
    }
    fn requests(&self) -> u64 {
        self.faults.requests.load(Ordering::SeqCst)
    }
}

fn proxy(upstream: u16) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let faults = Arc::new(Faults::default());
    let f = faults.clone();
    let thread = std::thread::spawn(move || {
        for c in l.incoming() {
            if f.stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(c) = c else { continue };
            let f = f.clone();
            std::thread::spawn(move || {
                let _ = serve_conn(c, upstream, &f);
            });
        }
    });
    Proxy {
        port,
        faults,
        thread: Some(thread),
    }
}

/// Reads an HTTP head (request or response) up to the blank line.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Ok(None);
        }
        let l = l.trim_end_matches(['\r', '\n']).to_string();
        if l.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(l);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn write_head(w: &mut impl Write, head: &[String]) -> std::io::Result<()> {
    for l in head {
        write!(w, "{l}\r\n")?;
    }
    write!(w, "\r\n")
}

fn serve_conn(client: TcpStream, upstream: u16, f: &Faults) -> std::io::Result<()> {
    let mut cr = BufReader::new(client.try_clone()?);
    let mut cw = client;
    let mut up: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        let Some(mut head) = read_head(&mut cr)? else {
            return Ok(());
        };
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        cr.read_exact(&mut body)?;
        if f.down.load(Ordering::SeqCst) {
            let _ = cw.shutdown(Shutdown::Both);
            return Ok(());
        }
        let deny = f.deny_key.lock().unwrap().clone();
        let denied = deny.is_some_and(|k| {
            header(&head, "authorization").is_some_and(|a| a.contains(&format!("Credential={k}/")))
        });
        let denied = denied
            || (f.deny_parts.load(Ordering::SeqCst)
                && head[0].starts_with("PUT ")
                && head[0].contains("partNumber="));
        if denied {
            let msg = "<?xml version=\"1.0\"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>";
            write!(
                cw,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{msg}",
                msg.len()
            )?;
            continue;
        }
        if f.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            let msg = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            write!(
                cw,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{msg}",
                msg.len()
            )?;
            continue;
        }
        if f.strip_range.load(Ordering::SeqCst) {
            let first = head[0].clone();
            head.retain(|l| !l.to_ascii_lowercase().starts_with("range:"));
            head[0] = first;
        }
        let is_head = head[0].starts_with("HEAD ");
        let is_get = head[0].starts_with("GET ");
        if up.is_none() {
            let s = TcpStream::connect(("127.0.0.1", upstream))?;
            up = Some((BufReader::new(s.try_clone()?), s));
        }
        let (ur, uw) = up.as_mut().unwrap();
        write_head(uw, &head)?;
        uw.write_all(&body)?;
        f.requests.fetch_add(1, Ordering::SeqCst);
        let Some(rhead) = read_head(ur)? else {
            return Ok(());
        };
        write_head(&mut cw, &rhead)?;
        let status: u32 = rhead[0]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let count = |n: usize| {
            if is_get {
                f.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
        };
        if is_head || status == 204 || status == 304 {
            continue;
        }
        if let Some(n) = header(&rhead, "content-length").and_then(|v| v.parse::<u64>().ok()) {
            let mut left = n;
            let mut buf = vec![0u8; 64 << 10];
            while left > 0 {
                if f.down.load(Ordering::SeqCst) {
                    let _ = cw.shutdown(Shutdown::Both);
                    return Ok(());
                }
                let k = ur.read(&mut buf[..left.min(64 << 10) as usize])?;
                if k == 0 {
                    return Ok(());
                }
                cw.write_all(&buf[..k])?;
                count(k);
                left -= k as u64;
            }
        } else if header(&rhead, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size_line = String::new();
                ur.read_line(&mut size_line)?;
                cw.write_all(size_line.as_bytes())?;
                let n = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                    .unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                ur.read_exact(&mut chunk)?;
                cw.write_all(&chunk)?;
                count(n);
                if n == 0 {
                    break;
                }
            }
        } else {
            let mut buf = Vec::new();
            ur.read_to_end(&mut buf)?;
            cw.write_all(&buf)?;
            count(buf.len());
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------- S3 fixture

struct S3 {
    // Field order: the proxy and servers go after the mounts of a test (declared later).
    proxy: Proxy,
    moto: Moto,
    cache: PathBuf,
}

impl S3 {
    fn start(td: &TestDir) -> S3 {
        let moto = moto(td);
        let proxy = proxy(moto.port);
        let s3 = S3 {
            proxy,
            moto,
            cache: td.mkdir("xdg-cache"),
        };
        s3.py("s3.create_bucket(Bucket='snaps')", &[]);
        s3
    }

    /// The environment a snapfs command needs to reach the bucket through the proxy.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.proxy.port),
            ),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("XDG_CACHE_HOME", self.cache.display().to_string()),
            ("SNAPFS_REMOTE_TIMEOUT", "5".to_string()),
            ("SNAPFS_REMOTE_RETRIES", "4".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Runs boto3 `body` with `s3` bound to a client of moto (directly, not proxied).
    fn py(&self, body: &str, args: &[&str]) -> util::Run {
        let script = format!(
            "import sys, boto3\n\
             s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', region_name='us-east-1',\n\
                 aws_access_key_id='testing', aws_secret_access_key='testing')\n{body}\n",
            self.moto.port
        );
        util::python(&script, args)
    }

    fn put(&self, key: &str, file: &Path) -> PathBuf {
        self.py(
            "s3.upload_file(sys.argv[1], 'snaps', sys.argv[2])",
            &[file.to_str().unwrap(), key],
        );
        PathBuf::from(format!("s3://snaps/{key}"))
    }

    fn get(&self, key: &str, out: &Path) {
        self.py(
            "s3.download_file('snaps', sys.argv[1], sys.argv[2])",
            &[key, out.to_str().unwrap()],
        );
    }

    fn keys(&self) -> Vec<String> {
        let r = self.py(
            "for o in s3.list_objects_v2(Bucket='snaps').get('Contents', []): print(o['Key'])",
            &[],
        );
        r.stdout_str().lines().map(String::from).collect()
    }

    fn mount(&self, url: &Path, mnt: &Path, args: &[&str]) -> Mount {
        match Mount::try_with_env(url, mnt, args, &self.env()) {
            Ok(m) => m,
            Err(r) => panic!("mount {} failed: {}", url.display(), r.stderr_str()),
        }
    }

    fn snapfs(&self, args: &[&str]) -> util::Run {
        util::run_timeout(
            Command::new(util::bin()).args(args).envs(self.env()),
            Duration::from_secs(120),
        )
    }
}

/// A small tree, its GNU tar, and that tar as tar.gz and tar.zst.
fn corpus_in(td: &TestDir) -> (PathBuf, PathBuf, Vec<PathBuf>) {
    let src = td.join("src");
    corpus::build_small_tree(&src, 13);
    std::fs::write(src.join("big.bin"), util::semi_compressible(3 << 20, 5)).unwrap();
    let tar = td.join("snap.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let exp = td.mkdir("exp");
    corpus::extract(&tar, &exp);
    let gz = corpus::compress(&tar, Comp::Pigz);
    let zst = corpus::compress(&tar, Comp::ZstdMulti);
    (src, exp, vec![tar, gz, zst])
}

fn snapshot_of(td: &TestDir, src: &Path) -> PathBuf {
    let out = td.join("made.tar.gz");
    util::run_ok(
        Command::new(util::bin())
            .arg("create")
            .arg(src)
            .arg("-o")
            .arg(&out),
    );
    out
}

fn read(p: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(p)
}

// ---------------------------------------------------------------- tests

#[test]
fn s3_mounts_equal_gnu_tar_for_tar_gz_zst_and_snapfs_snapshots() {
    let td = TestDir::new("remote-s3-eq");
    let s3 = S3::start(&td);
    let (src, exp, archives) = corpus_in(&td);
    let snap = snapshot_of(&td, &src);
    let exp_snap = td.mkdir("exp-snap");
    corpus::extract(&snap, &exp_snap);
    let mut cases: Vec<(PathBuf, &Path)> = archives.iter().map(|a| (a.clone(), &*exp)).collect();
    cases.push((snap.clone(), &exp_snap));
    for (i, (a, exp)) in cases.iter().enumerate() {
        let name = a.file_name().unwrap().to_str().unwrap();
        let url = s3.put(&format!("dir/{name}"), a);
        let m = s3.mount(&url, &td.join(format!("m{i}")), &[]);
        let n = tree::assert_same_tree(exp, m.path(), &CmpOpts::default());
        assert!(n > 40, "{name}: only {n} entries");
        m.unmount();
    }
}

#[test]
fn http_mounts_through_nginx_and_a_server_ignoring_range_is_refused() {
    let td = TestDir::new("remote-http");
    let (_src, exp, archives) = corpus_in(&td);
    let www = td.mkdir("www");
    // 40 MiB: more than the socket buffers between the proxy and snapfs could absorb,
    // so the byte count shows whether the body was downloaded.
    let mut big = std::fs::read(&archives[0]).unwrap();
    big.resize(40 << 20, 0);
    std::fs::write(www.join("snap.tar"), &big).unwrap();
    std::fs::copy(&archives[1], www.join("snap.tar.gz")).unwrap();
    let ng = nginx(&td, &www);
    let px = proxy(ng.port);
    let cache = td.mkdir("xdg");
    let env = vec![("XDG_CACHE_HOME".to_string(), cache.display().to_string())];
    let url = PathBuf::from(format!("http://127.0.0.1:{}/snap.tar.gz", px.port));
    {
        let m = Mount::try_with_env(&url, &td.join("m"), &[], &env)
            .unwrap_or_else(|r| panic!("{}", r.stderr_str()));
        tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
        m.unmount();
    }
    px.faults.strip_range.store(true, Ordering::SeqCst);
    let before = px.bytes();
    let url = PathBuf::from(format!("http://127.0.0.1:{}/snap.tar", px.port));
    let r = util::run_timeout(
        Command::new(util::bin())
            .arg("index")
            .arg(&url)
            .envs(env.iter().map(|(k, v)| (k, v))),
        Duration::from_secs(60),
    );
    util::assert_one_line_error(&r, "Range");
    // Refused, not downloaded: far less than the archive went through.
    let size = big.len() as u64;
    assert!(
        px.bytes() - before < size / 2,
        "{} of {size} bytes fetched from a server ignoring Range",
        px.bytes() - before
    );
}

#[test]
fn s3_layers_stack_over_a_local_base() {
    let td = TestDir::new("remote-layers");
    let s3 = S3::start(&td);
    let base = corpus::small_tar(td.path(), "base.tar", 1);
    let top_src = td.mkdir("top");
    std::fs::write(top_src.join("readme"), b"from the top layer\n").unwrap();
    std::fs::write(top_src.join("d1/.wh.f001.dat"), b"").unwrap_or_else(|_| {
        std::fs::create_dir_all(top_src.join("d1")).unwrap();
        std::fs::write(top_src.join("d1/.wh.f001.dat"), b"").unwrap();
    });
    let top = td.join("top.tar");
    corpus::gnu_tar(&top_src, &top, "posix", &[]);
    let url = s3.put("layers/top.tar", &top);
    let base_s = base.display().to_string();
    let m = s3.mount(&url, &td.join("m"), &[&base_s]);
    assert_eq!(read(&m.join("readme")).unwrap(), b"from the top layer\n");
    assert!(
        !m.join("d1/f001.dat").exists(),
        "whiteout from S3 hides the base file"
    );
    assert_eq!(
        read(&m.join("d2/f002.dat")).unwrap(),
        read(&td.join("src-base.tar/d2/f002.dat")).unwrap()
    );
}

#[test]
fn s3_snapshot_mount_fetches_about_its_index_and_one_file_at_most_two_spans() {
    let td = TestDir::new("remote-bytes");
    let s3 = S3::start(&td);
    let src = td.mkdir("src");
    // 200 files of 4 KiB and 8 MiB of incompressible data: the index is small.
    for i in 0..200 {
        std::fs::write(
            src.join(format!("f{i:03}")),
            util::random_bytes(4096, i as u64),
        )
        .unwrap();
    }
    std::fs::write(src.join("big"), util::random_bytes(8 << 20, 99)).unwrap();
    let snap = snapshot_of(&td, &src);
    let size = std::fs::metadata(&snap).unwrap().len();
    let url = s3.put("snap.tar.gz", &snap);
    let disk = td.mkdir("disk-cache");
    let disk_s = disk.display().to_string();
    let args = ["--disk-cache", disk_s.as_str()];
    let (b0, r0) = (s3.proxy.bytes(), s3.proxy.requests());
    let m = s3.mount(&url, &td.join("m"), &args);
    let mounted = s3.proxy.bytes() - b0;
    // A HEAD, the first block, the last block (footer and index), the sidecar probe.
    let requests = s3.proxy.requests() - r0;
    assert!(requests <= 5, "mount sent {requests} requests");
    let block = 256 << 10;
    // The index of 201 entries is a few KiB; the head and tail blocks hold it.
    assert!(
        mounted <= 3 * block,
        "mount fetched {mounted} bytes of a {size}-byte snapshot"
    );
    let b1 = s3.proxy.bytes();
    let n = walkdir_count(m.path());
    assert_eq!(n, 201);
    assert_eq!(s3.proxy.bytes() - b1, 0, "ls -R fetched bytes");
    let b2 = s3.proxy.bytes();
    assert_eq!(
        read(&m.join("f150")).unwrap(),
        util::random_bytes(4096, 150)
    );
    let one = s3.proxy.bytes() - b2;
    // A span is 4 MiB of tar stream (incompressible: about as much gzip).
    assert!(
        one <= 2 * (4 << 20) + block,
        "one 4 KiB file cost {one} bytes"
    );
    m.unmount();
    // Second mount with the same disk cache: nothing already cached is fetched again.
    let b3 = s3.proxy.bytes();
    let m = s3.mount(&url, &td.join("m"), &args);
    assert_eq!(
        read(&m.join("f150")).unwrap(),
        util::random_bytes(4096, 150)
    );
    assert_eq!(
        s3.proxy.bytes() - b3,
        0,
        "second mount fetched bytes the disk cache holds"
    );
    // `snapfs list` shows the remote source and the cache's hit rate.
    let l = s3.snapfs(&["list", "--disk-cache", &disk_s]);
    let out = l.stdout_str();
    assert!(out.contains("s3://snaps/snap.tar.gz"), "{out}");
    assert!(
        out.contains("# disk cache") && out.contains("hit rate"),
        "{out}"
    );
}

fn walkdir_count(p: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        n += 1;
        let _ = e.metadata().unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walkdir_count(&e.path());
        }
    }
    n
}

/// Asserts that reading `p` fails with EIO (without dumping what it read).
fn assert_eio(p: &Path, what: &str) {
    match read(p) {
        Ok(v) => panic!("{what}: read {} bytes instead of failing", v.len()),
        Err(e) => assert_eq!(util::errno(&e), libc::EIO, "{what}: {e}"),
    }
}

#[test]
fn s3_faults_missing_denied_throttled_cut_and_replaced() {
    let td = TestDir::new("remote-faults");
    let s3 = S3::start(&td);
    let src = td.mkdir("src");
    // a, c, d are 1 MiB apart by 24 MiB of zeros: more than the read-ahead window
    // (16 MiB), so a read of one never fetches the next.
    for (name, seed) in [("a", 1u64), ("c", 3), ("d", 4)] {
        std::fs::write(src.join(name), util::random_bytes(1 << 20, seed)).unwrap();
    }
    std::fs::write(src.join("b-gap"), vec![0u8; 24 << 20]).unwrap();
    std::fs::write(src.join("c-gap"), vec![0u8; 24 << 20]).unwrap();
    let tar = td.join("f.tar");
    let list = td.join("order");
    std::fs::write(&list, "a\nb-gap\nc\nc-gap\nd\n").unwrap();
    util::sh(
        &src,
        &format!(
            "tar --format=posix -cf {} -T {}",
            tar.display(),
            list.display()
        ),
    );
    let url = s3.put("f.tar", &tar);

    // A missing object: one line at mount time.
    let missing = PathBuf::from("s3://snaps/nope.tar");
    let r = Mount::try_with_env(&missing, &td.join("m0"), &[], &s3.env()).err();
    let r = r.expect("mount of a missing object must fail");
    util::assert_one_line_error(&r, "s3://snaps/nope.tar");
    assert!(
        r.stderr_str().contains("no such object"),
        "{}",
        r.stderr_str()
    );

    // Bad credentials: one line.
    *s3.proxy.faults.deny_key.lock().unwrap() = Some("badkey".into());
    let mut env = s3.env();
    env.retain(|(k, _)| k != "AWS_ACCESS_KEY_ID");
    env.push(("AWS_ACCESS_KEY_ID".into(), "badkey".into()));
    let r = util::run_timeout(
        Command::new(util::bin()).arg("index").arg(&url).envs(env),
        Duration::from_secs(60),
    );
    util::assert_one_line_error(&r, "access denied");

    // Throttling: 503 SlowDown on the next requests is retried.
    let m = s3.mount(&url, &td.join("m"), &[]);
    s3.proxy.faults.fail_next.store(3, Ordering::SeqCst);
    assert!(read(&m.join("a")).unwrap() == util::random_bytes(1 << 20, 1));
    assert_eq!(s3.proxy.faults.fail_next.load(Ordering::SeqCst), 0);

    // A network cut: EIO for reads that need the network; the daemon stays up and
    // reads work again once the network is back.
    s3.proxy.faults.down.store(true, Ordering::SeqCst);
    assert_eio(&m.join("c"), "read during a network cut");
    s3.proxy.faults.down.store(false, Ordering::SeqCst);
    assert!(util::is_mounted(m.path()));
    assert!(read(&m.join("c")).unwrap() == util::random_bytes(1 << 20, 3));

    // The object replaced while mounted: EIO, never bytes of the new one.
    std::fs::write(src.join("d"), util::random_bytes(1 << 20, 444)).unwrap();
    let other = td.join("other.tar");
    util::sh(
        &src,
        &format!(
            "tar --format=posix -cf {} -T {}",
            other.display(),
            list.display()
        ),
    );
    s3.put("f.tar", &other);
    assert_eio(&m.join("d"), "read of a replaced object");
    // What was read before is still the old version, or EIO: never the new bytes.
    if let Ok(v) = read(&m.join("c")) {
        assert!(v == util::random_bytes(1 << 20, 3));
    }
    assert!(util::is_mounted(m.path()));
}

#[test]
fn s3_moto_killed_mid_mount_then_restarted_on_the_same_port() {
    let td = TestDir::new("remote-restart");
    let mut s3 = S3::start(&td);
    let src = td.mkdir("src");
    // f1 is 24 MiB of zeros: f2 lies beyond the read-ahead window (16 MiB at most)
    // that reading f0 opens, so its read needs the server.
    for i in 0..4 {
        let bytes = if i == 1 {
            vec![0; 24 << 20]
        } else {
            util::random_bytes(1 << 20, i as u64)
        };
        std::fs::write(src.join(format!("f{i}")), bytes).unwrap();
    }
    let tar = td.join("f.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let url = s3.put("f.tar", &tar);
    let m = s3.mount(&url, &td.join("m"), &[]);
    assert_eq!(read(&m.join("f0")).unwrap(), util::random_bytes(1 << 20, 0));
    // Kill the server: reads fail with EIO.
    let port = s3.moto.port;
    s3.moto._d.stop();
    assert_eio(&m.join("f2"), "read with the server gone");
    // moto keeps objects in memory: a new server is empty, the object is uploaded
    // again, byte for byte (S3's ETag of a single-part upload is its MD5, so the
    // mount's If-Match still holds).
    let log = std::fs::File::create(td.join("moto2.log")).unwrap();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    s3.moto._d = Daemon {
        child,
        what: "moto",
    };
    wait_port(port, "moto_server (restarted)");
    s3.py("s3.create_bucket(Bucket='snaps')", &[]);
    s3.put("f.tar", &tar);
    assert!(util::is_mounted(m.path()));
    assert_eq!(read(&m.join("f2")).unwrap(), util::random_bytes(1 << 20, 2));
}

#[test]
fn s3_foreign_tar_gz_is_indexed_once_and_a_published_index_serves_other_hosts() {
    let td = TestDir::new("remote-publish");
    let s3 = S3::start(&td);
    let (_src, exp, archives) = corpus_in(&td);
    let url = s3.put("foreign.tar.gz", &archives[1]);
    let size = std::fs::metadata(&archives[1]).unwrap().len();
    let b0 = s3.proxy.bytes();
    let r = s3.snapfs(&["index", "--publish", url.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr_str());
    assert!(
        s3.proxy.bytes() - b0 >= size,
        "the pass reads the object once"
    );
    assert!(s3.keys().contains(&"foreign.tar.gz.snapfs-idx".to_string()));
    // A second run here finds the index in the cache dir (keyed by URL+ETag+size).
    let b1 = s3.proxy.bytes();
    let r = s3.snapfs(&["index", url.to_str().unwrap()]);
    assert!(
        r.ok() && r.stdout_str().starts_with("index is up to date"),
        "{}",
        r.stdout_str()
    );
    // Its first block and last two (format and identity, in one round trip), nothing
    // more.
    let block = 256 << 10;
    assert!(s3.proxy.bytes() - b1 <= 3 * block);
    // "Another host": an empty cache dir. It uses the sidecar, not a pass.
    let other_cache = td.mkdir("other-host-cache");
    let mut env = s3.env();
    env.retain(|(k, _)| k != "XDG_CACHE_HOME");
    env.push(("XDG_CACHE_HOME".into(), other_cache.display().to_string()));
    let b2 = s3.proxy.bytes();
    let m = Mount::try_with_env(&url, &td.join("m"), &[], &env)
        .unwrap_or_else(|r| panic!("{}", r.stderr_str()));
    let sidecar = 64 << 10;
    assert!(
        s3.proxy.bytes() - b2 <= 3 * block + sidecar,
        "{} bytes fetched with a published index",
        s3.proxy.bytes() - b2
    );
    tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
}

#[test]
fn create_and_commit_to_s3_upload_objects_gnu_tar_extracts_and_snapfs_mounts() {
    let td = TestDir::new("remote-upload");
    let s3 = S3::start(&td);
    let src = td.join("src");
    corpus::build_small_tree(&src, 21);
    // 20 MiB: three parts of the multipart upload.
    std::fs::write(src.join("big.bin"), util::random_bytes(20 << 20, 8)).unwrap();
    let r = s3.snapfs(&[
        "create",
        src.to_str().unwrap(),
        "-o",
        "s3://snaps/up/made.tar.gz",
    ]);
    assert!(r.ok(), "{}", r.stderr_str());
    let got = td.join("made.tar.gz");
    s3.get("up/made.tar.gz", &got);
    let exp = td.mkdir("exp");
    corpus::extract(&got, &exp);
    assert!(std::fs::read(exp.join("big.bin")).unwrap() == util::random_bytes(20 << 20, 8));
    let url = PathBuf::from("s3://snaps/up/made.tar.gz");
    {
        let m = s3.mount(&url, &td.join("m"), &[]);
        tree::assert_same_tree(&exp, m.path(), &CmpOpts::default());
    }

    // commit: a delta of a view over the S3 snapshot, uploaded as a plain tar.
    let upper = td.mkdir("upper");
    let upper_s = upper.display().to_string();
    {
        let m = s3.mount(&url, &td.join("m"), &["--upper", &upper_s]);
        std::fs::write(m.join("new-file"), b"written in the view\n").unwrap();
        std::fs::remove_file(m.join("readme")).unwrap();
        m.unmount();
    }
    let r = s3.snapfs(&[
        "commit",
        "s3://snaps/up/made.tar.gz",
        "--upper",
        &upper_s,
        "-o",
        "s3://snaps/up/delta.tar",
    ]);
    assert!(r.ok(), "{}", r.stderr_str());
    let delta = td.join("delta.tar");
    s3.get("up/delta.tar", &delta);
    let listed = util::run_ok(Command::new("tar").arg("-tf").arg(&delta)).stdout_str();
    assert!(
        listed.contains("new-file") && listed.contains(".wh.readme"),
        "{listed}"
    );
    let delta_url = PathBuf::from("s3://snaps/up/delta.tar");
    let m = s3.mount(&delta_url, &td.join("m2"), &["s3://snaps/up/made.tar.gz"]);
    assert_eq!(read(&m.join("new-file")).unwrap(), b"written in the view\n");
    assert!(!m.join("readme").exists());
    m.unmount();

    // A failure mid-upload: an error line, the upload aborted, nothing stored.
    s3.proxy.faults.deny_parts.store(true, Ordering::SeqCst);
    let r = s3.snapfs(&[
        "create",
        src.to_str().unwrap(),
        "-o",
        "s3://snaps/up/failed.tar.zst",
    ]);
    util::assert_one_line_error(&r, "s3://snaps/up/failed.tar.zst");
    s3.proxy.faults.deny_parts.store(false, Ordering::SeqCst);
    assert!(
        !s3.keys().iter().any(|k| k.contains("failed")),
        "{:?}",
        s3.keys()
    );
    let pending = s3.py(
        "print(len(s3.list_multipart_uploads(Bucket='snaps').get('Uploads', [])))",
        &[],
    );
    assert_eq!(
        pending.stdout_str().trim(),
        "0",
        "an upload was left behind"
    );
}

#[test]
fn service_views_take_s3_urls() {
    let td = TestDir::new("remote-service");
    let s3 = S3::start(&td);
    let (_src, exp, archives) = corpus_in(&td);
    let url = s3.put("svc/snap.tar.zst", &archives[2]);
    let root = td.mkdir("svc-root");
    let socket = td.join("svc.sock");
    let log = std::fs::File::create(td.join("serve.log")).unwrap();
    let child = Command::new(util::bin())
        .arg("serve")
        .arg("--root")
        .arg(&root)
        .arg("--socket")
        .arg(&socket)
        .envs(s3.env())
        .env_remove("SNAPFS_SERVICE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut serve = Daemon {
        child,
        what: "snapfs serve",
    };
    let up = util::poll_until(Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    assert!(up, "snapfs serve never listened on {}", socket.display());
    let mnt = td.mkdir("m");
    let r = util::run_timeout(
        Command::new(util::bin())
            .arg("mount")
            .arg("--service")
            .arg(&socket)
            .arg(&url)
            .arg(&mnt)
            .envs(s3.env()),
        Duration::from_secs(120),
    );
    assert!(r.ok(), "{}", r.stderr_str());
    let _gone = util::NoMountsLeft(mnt.clone());
    assert!(util::poll_until(Duration::from_secs(30), || {
        util::is_mounted(&mnt)
    }));
    tree::assert_same_tree(&exp, &mnt, &CmpOpts::default());
    let r = util::run_timeout(
        Command::new(util::bin())
            .arg("umount")
            .arg("--service")
            .arg(&socket)
            .arg(&mnt),
        Duration::from_secs(60),
    );
    assert!(r.ok(), "{}", r.stderr_str());
    serve.stop();
}

#[test]
fn s3_oci_archive_mounts_like_its_local_mount_by_ranges_and_verifies() {
    use crate::images::{sha256_of, write_layout, LayerBlob};
    let td = TestDir::new("remote-image");
    let s3 = S3::start(&td);
    // Two layers: a small gzip one, and a plain one with 8 MiB of incompressible data
    // that mounting and reading one small file must not fetch.
    util::sh(
        td.path(),
        "mkdir -p a/etc b/etc b/data && echo one > a/etc/one && echo two > b/etc/two \
         && chmod 0640 a/etc/one && find a b -exec touch -h -d @1600000000 {} + \
         && tar --numeric-owner -C a -cf a.tar . && gzip -kn a.tar",
    );
    std::fs::write(td.join("b/data/big"), util::random_bytes(8 << 20, 7)).unwrap();
    util::sh(
        td.path(),
        "touch -h -d @1600000000 b/data/big && tar --numeric-owner -C b -cf b.tar .",
    );
    let layers = [
        LayerBlob {
            blob: td.join("a.tar.gz"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: sha256_of(&td.join("a.tar")),
        },
        LayerBlob {
            blob: td.join("b.tar"),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: sha256_of(&td.join("b.tar")),
        },
    ];
    let layout = td.join("layout");
    write_layout(&layout, &layers, "v");
    util::sh(
        td.path(),
        "tar --numeric-owner -C layout -cf app.oci.tar oci-layout index.json blobs",
    );
    let archive = td.join("app.oci.tar");
    let size = std::fs::metadata(&archive).unwrap().len();
    let url = s3.put("img/app.oci.tar", &archive);

    // First mount on this host: the outer tar's and the layers' indexes are built
    // (plain tars by their headers), then one small file costs about one block.
    let disk = td.mkdir("disk-cache");
    let disk_s = disk.display().to_string();
    let b0 = s3.proxy.bytes();
    let m = s3.mount(&url, &td.join("m"), &["--disk-cache", disk_s.as_str()]);
    assert_eq!(read(&m.join("etc/one")).unwrap(), b"one\n");
    let fetched = s3.proxy.bytes() - b0;
    let block = 256 << 10;
    assert!(
        fetched <= 6 * block,
        "mount and one small file fetched {fetched} bytes of a {size}-byte image"
    );
    // Every file's bytes and metadata equal the local mount of the same archive.
    let local = Mount::new(&archive, &td.join("local"));
    let n = tree::assert_same_tree(local.path(), m.path(), &CmpOpts::default());
    assert!(n >= 5, "compared {n} entries");
    assert_eq!(
        read(&m.join("data/big")).unwrap(),
        util::random_bytes(8 << 20, 7)
    );
    m.unmount();
    local.unmount();

    // verify reads every blob of the remote image and checks its digest.
    let r = s3.snapfs(&["verify", url.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr_str());
    assert_eq!(
        r.stdout_str().matches("ok layer").count(),
        2,
        "{}",
        r.stdout_str()
    );
    // index takes the image by URL as well (its layers' indexes are current).
    let r = s3.snapfs(&["index", url.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr_str());
}
