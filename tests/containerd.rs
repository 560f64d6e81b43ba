//! snapfs as containerd's snapshotter (issue 12): Debian's containerd (1.6) started
//! here with its own root, state, sockets and config (the snapfs proxy plugin), and
//! `snapfs serve --containerd`. The test image (images.rs: busybox-static root,
//! a layer with whiteouts and an opaque dir, a zstd layer with a 64 MiB file) is
//! imported with `ctr image import`; containers run on snapfs and on overlayfs print
//! the same; a container's changes are committed and seen by a new one; the layers
//! are never extracted into the service's root; a small file of the big layer reads
//! a few spans; fifty containers at once; kill -9 of the service and a restart.
//! containerd is stopped by its pid, and nothing is left mounted or running.
//!
//! Needs root, containerd (with ctr and containerd-shim-runc-v2), runc,
//! busybox-static, pigz, zstd, setfattr.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cri;
use crate::util::{self, poll_until, NoMountsLeft, Run, Service, TestDir};

const IMAGE: &str = "docker.io/library/snapfs-test:1";

fn need(tool: &str) {
    let r = util::run(
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}")),
    );
    assert!(
        r.ok(),
        "CONTAINERD TEST NOT RUN: {tool} is missing; apt-get install -y containerd runc busybox-static pigz zstd attr"
    );
}

/// A containerd of our own, stopped by its pid.
struct Containerd {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    /// The namespace ctr works in.
    ns: &'static str,
}

impl Containerd {
    fn start(dir: &Path, snapfs_sock: &Path) -> Containerd {
        Self::start_with(dir, snapfs_sock, None)
    }

    /// With `cri`, containerd's CRI plugin too, its snapshotter snapfs and the
    /// registry at `cri` reached over plain http.
    fn start_with(dir: &Path, snapfs_sock: &Path, cri: Option<&str>) -> Containerd {
        for t in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
            need(t);
        }
        let root = dir.join("root");
        let state = dir.join("state");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&state).unwrap();
        let sock = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
{disabled}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{sock}.debug"
[proxy_plugins]
  [proxy_plugins.snapfs]
    type = "snapshot"
    address = "{snapfs}"
{cri_config}"#,
                disabled = if cri.is_some() {
                    ""
                } else {
                    r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#
                },
                cri_config = cri.map(|reg| cri_config(dir, reg)).unwrap_or_default(),
                root = root.display(),
                state = state.display(),
                sock = sock.display(),
                snapfs = snapfs_sock.display()
            ),
        )
        .unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn containerd");
        let mut c = Containerd {
            child,
            sock,
            log,
            ns: "default",
        };
        let up = poll_until(Duration::from_secs(30), || {
            c.ctr(&["version"]).ok() || !matches!(c.child.try_wait(), Ok(None))
        });
        assert!(
            up && c.alive(),
            "containerd never answered:\n{}",
            c.log_text()
        );
        c
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Run {
        util::run_timeout(
            Command::new("ctr")
                .arg("-a")
                .arg(&self.sock)
                .args(["-n", self.ns])
                .args(args),
            Duration::from_secs(180),
        )
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let r = self.ctr(args);
        assert!(
            r.ok(),
            "ctr {args:?} failed: {}{}\ncontainerd log tail:\n{}",
            r.stdout_str(),
            r.stderr_str(),
            tail(&self.log_text())
        );
        r.stdout_str()
    }

    fn snap(&self, args: &[&str]) -> String {
        let mut a = vec!["snapshots", "--snapshotter", "snapfs"];
        a.extend_from_slice(args);
        self.ctr_ok(&a)
    }

    /// Every task killed and deleted, every container deleted (best effort).
    fn clear_containers(&self) {
        for id in self.ctr(&["tasks", "ls", "-q"]).stdout_str().lines() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        }
        for id in self.ctr(&["tasks", "ls", "-q"]).stdout_str().lines() {
            let id = id.to_string();
            poll_until(Duration::from_secs(10), || {
                self.ctr(&["tasks", "rm", "-f", &id]).ok()
            });
        }
        for id in self.ctr(&["containers", "ls", "-q"]).stdout_str().lines() {
            let _ = self.ctr(&["containers", "rm", id]);
        }
    }

    /// Every image in `names` removed with a synchronous collection, then containerd's
    /// GC run again (a lease deleted with `--sync`) every few seconds until no snapfs
    /// snapshot (and no view of `svc`) is left, which must happen within a minute: its
    /// scheduler alone may wait a long interval after a slow collection.
    fn remove_images_and_collect(&self, names: &[&str], svc: &Service) {
        for name in names {
            self.ctr_ok(&["images", "rm", "--sync", name]);
        }
        let mut kicked = Instant::now();
        let emptied = poll_until(Duration::from_secs(60), || {
            if active_views(svc).is_empty() && self.snap(&["ls"]).lines().count() <= 1 {
                return true;
            }
            if kicked.elapsed() > Duration::from_secs(3) {
                self.ctr_ok(&["leases", "create", "--id", "snapfs-test-gc"]);
                self.ctr_ok(&["leases", "delete", "--sync", "snapfs-test-gc"]);
                kicked = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
            false
        });
        assert!(
            emptied,
            "snapshots left: {}\nleases: {}",
            self.snap(&["ls"]),
            self.ctr_ok(&["leases", "ls"])
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.alive() {
            self.clear_containers();
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            if !poll_until(Duration::from_secs(20), || !self.alive()) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// The CRI plugin's config: snapfs its snapshotter, `registry` over plain http, its
/// CNI dirs (unused: the test only pulls) and stream server on 127.0.0.1.
fn cri_config(dir: &Path, registry: &str) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "snapfs"
    disable_snapshot_annotations = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"#,
        d = dir.display()
    )
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The test image as an OCI archive named [`IMAGE`]; also the chain IDs of its
/// layers and the path of each layer blob.
fn image_archive(t: &TestDir) -> (PathBuf, Vec<String>, Vec<String>) {
    let oci = crate::images::sample_image(t);
    let index = fs::read_to_string(oci.join("index.json")).unwrap();
    let index = index.replace(
        r#""annotations":{"org.opencontainers.image.ref.name":"t"}"#,
        &format!(
            r#""annotations":{{"org.opencontainers.image.ref.name":"{IMAGE}","io.containerd.image.name":"{IMAGE}"}}"#
        ),
    );
    assert!(index.contains(IMAGE), "{index}");
    fs::write(oci.join("index.json"), &index).unwrap();
    let json = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&fs::read(oci.join("blobs/sha256").join(&d[7..])).unwrap()).unwrap()
    };
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    let manifest = json(index["manifests"][0]["digest"].as_str().unwrap());
    let config = json(manifest["config"]["digest"].as_str().unwrap());
    let mut chain: Vec<String> = Vec::new();
    for d in config["rootfs"]["diff_ids"].as_array().unwrap() {
        let d = d.as_str().unwrap();
        chain.push(match chain.last() {
            None => d.to_string(),
            Some(p) => format!("sha256:{}", util::sha256_hex(format!("{p} {d}").as_bytes())),
        });
    }
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let tar = t.join("image.tar");
    util::run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&oci)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    (tar, chain, layers)
}

/// What a container prints: checksums and metadata of files from every layer,
/// what the whiteouts and the opaque dir hide, and a file it writes.
const SCRIPT: &str = "sha256sum /bin/busybox /etc/motd /etc/passwd /opt/app/new /opt/app/h1 /opt/app/h2 \
    /srv/dirfile /big/file64 /big/file64-link /opt/keep/k; \
    stat -c '%n %a %u %g %s %Y %h' /opt/app/a /opt/app/new /opt/keep/k /big/file64 /srv/dirfile 2>&1; \
    ls /opt/app /etc /srv; test -e /etc/deleteme || echo deleteme-gone; test -e /bin/vi || echo vi-gone; \
    echo written > /tmp/w && sha256sum /tmp/w && rm /etc/motd && ls /etc";

fn start_service(t: &TestDir, ctd_sock: &Path) -> Service {
    Service::start(
        t.path(),
        &t.join("svc"),
        &t.join("svc.sock"),
        &[
            "--containerd",
            t.join("snapfs-grpc.sock").to_str().unwrap(),
            "--containerd-address",
            ctd_sock.to_str().unwrap(),
        ],
    )
}

fn active_views(svc: &Service) -> Vec<serde_json::Value> {
    svc.ok(&serde_json::json!({"op": "list"}))["views"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn containerd_runs_containers_from_unpacked_layers_never_extracted() {
    let t = TestDir::new("containerd");
    let _nm = NoMountsLeft(t.path().to_path_buf());
    let (tar, chain, layers) = image_archive(&t);
    let grpc = t.join("snapfs-grpc.sock");
    let ctd_dir = t.mkdir("ctd");
    // The service first, so that containerd finds the plugin's socket.
    let mut svc = Some(Service::start(
        t.path(),
        &t.join("svc"),
        &t.join("svc.sock"),
        &[
            "--containerd",
            grpc.to_str().unwrap(),
            "--containerd-address",
            ctd_dir.join("containerd.sock").to_str().unwrap(),
        ],
    ));
    let ctd = Containerd::start(&ctd_dir, &grpc);
    let tar_s = tar.to_str().unwrap();
    ctd.ctr_ok(&["images", "import", tar_s]);

    // The same container on overlayfs (unpacked by the import) and on snapfs.
    let reference = ctd.ctr_ok(&["run", "--rm", IMAGE, "ovl", "sh", "-c", SCRIPT]);
    assert!(
        reference.contains("deleteme-gone") && reference.contains("vi-gone"),
        "{reference}"
    );
    let on_snapfs = ctd.ctr_ok(&[
        "run",
        "--snapshotter",
        "snapfs",
        "--rm",
        IMAGE,
        "snap1",
        "sh",
        "-c",
        SCRIPT,
    ]);
    assert_eq!(
        on_snapfs, reference,
        "snapfs and overlayfs containers differ"
    );
    // The image's layers are committed snapshots pointing at their blobs.
    let ls = ctd.snap(&["ls"]);
    for c in &chain {
        assert!(ls.contains(c.as_str()), "chain {c} not in\n{ls}");
    }

    // containerd's GC removes the snapshots of removed containers (their views, and
    // upper dirs) soon after.
    let svc_ref = svc.as_ref().unwrap();
    let uppers = t.join("svc/containerd/upper");
    assert!(poll_until(Duration::from_secs(60), || {
        active_views(svc_ref).is_empty() && fs::read_dir(&uppers).unwrap().next().is_none()
    }));

    // Not extracted: no file of the image under the service's root, only blob
    // links (the content store's inodes), their indexes and small state files.
    let root = t.join("svc");
    let mut own_bytes = 0u64;
    let mut todo = vec![root.clone()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !["busybox", "file64", "motd", "passwd"].contains(&name.as_str()),
                "extracted file {} in the service root",
                e.path().display()
            );
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() && !name.ends_with(".snapfs-idx") {
                use std::os::unix::fs::MetadataExt;
                if m.nlink() == 1 {
                    own_bytes += m.len();
                }
            }
        }
    }
    assert!(
        own_bytes < 1 << 20,
        "{own_bytes} bytes of own files in the service root"
    );

    // A small file of the 64 MiB layer reads the index's few head/tail bytes and a
    // span or two of the blob, not the blob.
    let big = root
        .join("containerd/layers")
        .join(layers[2].replace(':', "-"));
    let big_size = fs::metadata(&big).unwrap().len();
    assert!(big_size > 30 << 20, "the zstd layer is {big_size} bytes");
    // The archive's counter is shared by its views: wait for the removed containers'
    // views to go (containerd's GC removes their snapshots).
    assert!(poll_until(Duration::from_secs(60), || active_views(
        svc_ref
    )
    .is_empty()));
    ctd.snap(&["view", "peek", &chain[2]]);
    let mounts = ctd.snap(&["mounts", "/x", "peek"]);
    let src = mounts.split_whitespace().nth(3).unwrap().to_string();
    let h1 = fs::read_to_string(Path::new(&src).join("opt/app/h1")).unwrap();
    assert_eq!(h1, "h\n");
    let read = svc_ref.bytes_read(&big);
    assert!(
        read > 0 && read < 12 << 20,
        "reading a 2-byte file read {read} of {big_size} bytes"
    );
    ctd.snap(&["rm", "peek"]);

    // A container's changes committed; a new container from the committed snapshot.
    ctd.snap(&["prepare", "work", &chain[2]]);
    let m = t.mkdir("m");
    let mount_cmd = ctd.snap(&["mounts", m.to_str().unwrap(), "work"]);
    util::run_ok(Command::new("sh").arg("-c").arg(&mount_cmd));
    let rootfs = m.to_str().unwrap();
    ctd.ctr_ok(&[
        "run",
        "--rm",
        "--env",
        "PATH=/bin",
        "--rootfs",
        rootfs,
        "writer",
        "/bin/sh",
        "-c",
        "mkdir -p /data && echo committed > /data/f && rm /etc/motd && echo more >> /opt/app/new",
    ]);
    util::run_ok(Command::new("umount").arg(&m));
    ctd.snap(&["commit", "c1", "work"]);
    ctd.snap(&["prepare", "work2", "c1"]);
    let mount_cmd = ctd.snap(&["mounts", rootfs, "work2"]);
    util::run_ok(Command::new("sh").arg("-c").arg(&mount_cmd));
    let seen = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--env",
        "PATH=/bin",
        "--rootfs",
        rootfs,
        "reader",
        "/bin/sh",
        "-c",
        "cat /data/f /opt/app/new; test -e /etc/motd || echo motd-gone; sha256sum /big/file64",
    ]);
    util::run_ok(Command::new("umount").arg(&m));
    let big_sum = reference
        .lines()
        .find(|l| l.ends_with("/big/file64"))
        .unwrap()
        .to_string();
    assert_eq!(
        seen,
        format!("committed\nnew\nmore\nmotd-gone\n{big_sum}\n")
    );
    ctd.snap(&["rm", "work2"]);
    ctd.snap(&["rm", "c1"]);

    // Fifty containers at once, each printing and then waiting for the go file.
    let sync = t.mkdir("sync");
    let sync_s = format!(
        "type=bind,src={},dst=/sync,options=rbind:rw",
        sync.display()
    );
    let mut kids = Vec::new();
    for i in 0..50 {
        let name = format!("many{i}");
        let script = format!(
            "sha256sum /etc/passwd /opt/app/new /srv/dirfile; touch /sync/{i}; \
             while ! test -e /sync/go; do sleep 0.1; done"
        );
        kids.push(
            Command::new("ctr")
                .arg("-a")
                .arg(&ctd.sock)
                .args([
                    "run",
                    "--snapshotter",
                    "snapfs",
                    "--rm",
                    "--mount",
                    &sync_s,
                    IMAGE,
                ])
                .arg(&name)
                .args(["sh", "-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let all_up = poll_until(Duration::from_secs(240), || {
        (0..50).all(|i| sync.join(i.to_string()).exists())
    });
    let live = active_views(svc_ref).len();
    fs::write(sync.join("go"), "").unwrap();
    let want: Vec<&str> = reference
        .lines()
        .filter(|l| {
            l.ends_with("/opt/app/new") || l.ends_with("/etc/passwd") || l.ends_with("/srv/dirfile")
        })
        .collect();
    let want = format!("{}\n", want.join("\n"));
    for k in kids {
        let out = k.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    }
    assert!(all_up, "not all fifty containers started");
    assert!(live >= 50, "{live} views while fifty containers ran");

    // kill -9 of the service while two containers run; a restart mounts every view
    // again, containerd can mount every active snapshot, and a new container starts.
    for name in ["bg1", "bg2"] {
        ctd.ctr_ok(&[
            "run",
            "-d",
            "--snapshotter",
            "snapfs",
            IMAGE,
            name,
            "sh",
            "-c",
            "while true; do sleep 1; done",
        ]);
    }
    // (The fifty containers' snapshots go in containerd's GC, soon after.)
    let svc_ref = svc.as_ref().unwrap();
    assert!(poll_until(Duration::from_secs(60), || {
        active_views(svc_ref).len() == 2 && fs::read_dir(&uppers).unwrap().count() == 2
    }));
    svc.take().unwrap().kill9();
    let svc2 = start_service(&t, &ctd.sock);
    // containerd's connection to the plugin comes back after its retry delay.
    let back = poll_until(Duration::from_secs(60), || {
        ctd.ctr(&["snapshots", "--snapshotter", "snapfs", "ls"])
            .ok()
    });
    assert!(
        back,
        "containerd never reconnected to the restarted service"
    );
    let views = active_views(&svc2);
    assert!(!views.is_empty());
    for v in &views {
        assert_eq!(v["state"], "live", "{v}");
        let mp = PathBuf::from(v["config"]["mountpoint"].as_str().unwrap());
        assert!(util::is_mounted(&mp), "{} not mounted again", mp.display());
    }
    let ls = ctd.snap(&["ls"]);
    let active: Vec<&str> = ls
        .lines()
        .filter(|l| l.trim_end().ends_with("Active"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        active.len(),
        views.len(),
        "ctr snapshots ls:\n{ls}\nservice: {views:?}"
    );
    for k in &active {
        let m = ctd.snap(&["mounts", "/x", k]);
        assert!(m.contains("bind"), "{m}");
    }
    let keys: BTreeSet<String> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert!(chain.iter().all(|c| keys.contains(c)), "{ls}");
    let after = ctd.ctr_ok(&[
        "run",
        "--snapshotter",
        "snapfs",
        "--rm",
        IMAGE,
        "after",
        "cat",
        "/opt/app/new",
    ]);
    assert_eq!(after, "new\n");

    // Teardown: containers, image, snapshots (containerd's GC removes them).
    ctd.clear_containers();
    ctd.remove_images_and_collect(&[IMAGE], &svc2);
    svc2.stop();
    drop(ctd);
    assert!(util::mounts_under(t.path()).is_empty(), "mounts left");
}

/// Debian's docker-registry (distribution 2.8) of our own: storage in a temp dir,
/// http on 127.0.0.1 at a free port, stopped by its pid.
struct Registry {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        assert!(
            util::run(Command::new("sh").arg("-c").arg("command -v docker-registry")).ok(),
            "CONTAINERD PULL TEST NOT RUN: docker-registry is missing; apt-get install -y docker-registry"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn docker-registry");
        let mut r = Registry { child, addr, log };
        let up = poll_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&r.addr).is_ok() || !matches!(r.child.try_wait(), Ok(None))
        });
        assert!(
            up && matches!(r.child.try_wait(), Ok(None)),
            "docker-registry never listened:\n{}",
            fs::read_to_string(&r.log).unwrap_or_default()
        );
        r
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if !poll_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The lazy path: `ctr image pull --snapshotter snapfs` from a local registry. The
/// pull unpacker's Prepares carry the chain ID (`containerd.io/snapshot.ref`); the
/// first layer containerd has not fetched goes through its differ (containerd 1.6
/// fetches only from the first layer it must unpack), every later layer's Prepare
/// waits for its blob and is answered AlreadyExists with a committed snapshot on the
/// blob, never extracted. Containers on the pulled image print what the same
/// containers print on overlayfs.
#[test]
fn containerd_pull_serves_layers_from_their_blobs() {
    need("skopeo");
    let t = TestDir::new("containerd-pull");
    let _nm = NoMountsLeft(t.path().to_path_buf());
    let (_tar, chain, layers) = image_archive(&t);
    let reg = Registry::start(&t.mkdir("registry"));
    let image = format!("{}/snapfs/test:1", reg.addr);
    let push = util::run_timeout(
        Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}", t.join("oci").display()))
            .arg(format!("docker://{image}")),
        Duration::from_secs(120),
    );
    assert!(
        push.ok(),
        "skopeo copy: {}{}",
        push.stdout_str(),
        push.stderr_str()
    );
    let ctd_dir = t.mkdir("ctd");
    let svc = start_service(&t, &ctd_dir.join("containerd.sock"));
    let mut ctd = Containerd::start_with(&ctd_dir, &t.join("snapfs-grpc.sock"), Some(&reg.addr));
    // CRI's namespace.
    ctd.ns = "k8s.io";

    // Watch the scratch dirs (what containerd's differ extracts into) while pulling.
    let scratch = t.join("svc/containerd/scratch");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (scratch, stop) = (scratch.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut most = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0);
                most = most.max(n);
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let pulled = cri::pull(&ctd.sock, &image);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most_scratch = watcher.join().unwrap();
    let log = svc.log_text();
    if let Err(e) = pulled {
        panic!(
            "CRI PullImage {image}: {e}\ncontainerd log tail:\n{}\nservice log:\n{log}",
            tail(&ctd.log_text())
        );
    }
    // Layer 0 (busybox) starts containerd's fetch and is unpacked; layers 1 and 2
    // are served from their blobs.
    assert_eq!(
        log.matches("not fetched yet").count(),
        1,
        "service log:\n{log}"
    );
    for d in &layers[1..] {
        assert!(
            log.contains(&format!("layer {d} served from its blob")),
            "layer {d} not served from its blob; service log:\n{log}"
        );
    }
    assert!(
        most_scratch <= 1,
        "{most_scratch} scratch dirs during the pull"
    );
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0, "scratch left");
    let ls = ctd.snap(&["ls"]);
    for c in &chain {
        assert!(ls.contains(c.as_str()), "chain {c} not in\n{ls}");
    }

    // A small file: the index and a span or two of the 64 MiB zstd layer's blob.
    let small = ctd.ctr_ok(&[
        "run",
        "--snapshotter",
        "snapfs",
        "--rm",
        &image,
        "small",
        "cat",
        "/opt/app/h1",
    ]);
    assert_eq!(small, "h\n");
    let big = t
        .join("svc/containerd/layers")
        .join(layers[2].replace(':', "-"));
    let big_size = fs::metadata(&big).unwrap().len();
    let read = svc.bytes_read(&big);
    assert!(
        read < 12 << 20,
        "reading a 2-byte file read {read} of {big_size} bytes"
    );

    let on_snapfs = ctd.ctr_ok(&[
        "run",
        "--snapshotter",
        "snapfs",
        "--rm",
        &image,
        "snap1",
        "sh",
        "-c",
        SCRIPT,
    ]);
    // The same image unpacked by overlayfs (its blobs are in the content store now).
    ctd.ctr_ok(&["images", "pull", "--plain-http", &image]);
    let reference = ctd.ctr_ok(&["run", "--rm", &image, "ovl", "sh", "-c", SCRIPT]);
    assert!(reference.contains("deleteme-gone"), "{reference}");
    assert_eq!(
        on_snapfs, reference,
        "snapfs and overlayfs containers differ"
    );

    ctd.clear_containers();
    // CRI records the image under its name, its digest and its config's ID.
    let images = ctd.ctr_ok(&["images", "ls", "-q"]);
    let names: Vec<&str> = images.lines().collect();
    ctd.remove_images_and_collect(&names, &svc);
    svc.stop();
    drop(ctd);
    drop(reg);
    assert!(util::mounts_under(t.path()).is_empty(), "mounts left");
}
