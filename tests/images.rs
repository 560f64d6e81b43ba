//! Container images as snapfs inputs (issue 11). An image is built at test time as an
//! OCI layout — a busybox-static root filesystem (gzip), a layer that deletes files,
//! replaces a directory by a file and makes a directory opaque (plain tar), and a
//! zstd layer of 4 MiB frames with a 64 MiB file and hard links — converted by skopeo to an
//! OCI archive and a docker-archive, and saved by a real dockerd (Debian's docker.io,
//! started here on its own socket and data root). Every form must mount to what
//! `umoci unpack` extracts (type, mode, owner, mtime, xattrs, content, hard links).
//! Also: a mount reads no layer blob in full, `verify` names a broken layer, `commit
//! --image` writes an image skopeo and umoci accept, selection and hostile JSON errors.
//!
//! Needs root, skopeo, umoci, docker.io (dockerd + /usr/bin/docker), busybox-static,
//! pigz, zstd.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::tree::{self, CmpOpts};
use crate::util::{self, sh, snapfs, Mount, TestDir};

/// Panics with one line when a tool the image tests need is missing.
fn need(tool: &str) {
    let r = util::run(
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}")),
    );
    assert!(
        r.ok(),
        "IMAGE TEST NOT RUN: {tool} is missing; apt-get install -y umoci skopeo docker.io busybox-static pigz zstd"
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A layer of a layout being written: the blob file, its media type, its diff_id.
pub(crate) struct LayerBlob {
    pub(crate) blob: PathBuf,
    pub(crate) media_type: &'static str,
    pub(crate) diff_id: String,
}

pub(crate) fn sha256_of(p: &Path) -> String {
    format!("sha256:{}", util::sha256_file(p).unwrap())
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes `bytes` as a blob of `layout`; returns its digest.
fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let hex = util::sha256_hex(bytes);
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    format!("sha256:{hex}")
}

/// A manifest descriptor JSON for `layers` with a config for `arch` (written into
/// `layout`), returning (manifest digest, manifest size).
fn put_image(
    layout: &Path,
    layers: &[LayerBlob],
    arch: &str,
    diff_ids: Option<&[String]>,
) -> (String, usize) {
    let ids: Vec<String> = match diff_ids {
        Some(d) => d.to_vec(),
        None => layers.iter().map(|l| l.diff_id.clone()).collect(),
    };
    let history: Vec<String> = layers
        .iter()
        .enumerate()
        .map(|(i, _)| {
            format!(r#"{{"created":"2023-01-01T00:00:00Z","created_by":"test layer {i}"}}"#)
        })
        .collect();
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{"Cmd":["/bin/sh"],"Env":["PATH=/bin"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}},"history":[{}]}}"#,
        ids.iter()
            .map(|d| format!("{d:?}"))
            .collect::<Vec<_>>()
            .join(","),
        history.join(",")
    );
    let config_digest = put_blob(layout, config.as_bytes());
    let mut descs = Vec::new();
    for l in layers {
        let digest = sha256_of(&l.blob);
        let size = fs::metadata(&l.blob).unwrap().len();
        let dest = layout.join("blobs/sha256").join(&digest[7..]);
        if !dest.exists() {
            fs::copy(&l.blob, &dest).unwrap();
        }
        descs.push(format!(
            r#"{{"mediaType":"{}","digest":"{digest}","size":{size}}}"#,
            l.media_type
        ));
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        descs.join(",")
    );
    (put_blob(layout, manifest.as_bytes()), manifest.len())
}

fn new_layout(dir: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// An OCI layout at `dir` with one image tagged `tag`.
pub(crate) fn write_layout(dir: &Path, layers: &[LayerBlob], tag: &str) {
    new_layout(dir);
    let (d, n) = put_image(dir, layers, host_arch(), None);
    fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{n},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#
        ),
    )
    .unwrap();
}

/// The three-layer test image as an OCI layout at `t/oci` (tag `t`).
pub(crate) fn sample_image(t: &TestDir) -> PathBuf {
    need("pigz");
    need("zstd");
    let l1 = crate::containers::rootfs_dir(&t.join("l1"));
    sh(
        t.path(),
        "mkdir -p l1/srv/dirfile l1/opt/app l1/opt/keep && echo a > l1/opt/app/a && echo b > l1/opt/app/b \
         && echo in > l1/srv/dirfile/inner && echo del > l1/etc/deleteme && echo k > l1/opt/keep/k \
         && chown 1000:1001 l1/opt/app/a && chmod 0640 l1/opt/app/a && chmod 4755 l1/opt/keep/k \
         && setfattr -n user.snap -v one l1/etc/motd && setfattr -n user.keep -v k l1/etc/passwd \
         && find l1 -exec touch -h -d @1600000000 {} + \
         && tar --xattrs --xattrs-include='*' --numeric-owner --format=posix -C l1 -cf l1.tar . \
         && pigz -c l1.tar > l1.tar.gz \
         && mkdir -p l2/etc l2/srv l2/opt/app l2/bin \
         && touch l2/etc/.wh.deleteme l2/bin/.wh.vi l2/opt/app/.wh..wh..opq \
         && echo file > l2/srv/dirfile && echo new > l2/opt/app/new && echo changed > l2/etc/motd \
         && setfattr -n user.snap -v two l2/etc/motd \
         && find l2 -exec touch -h -d @1650000000 {} + \
         && tar --xattrs --xattrs-include='*' --numeric-owner --format=posix -C l2 -cf l2.tar . \
         && mkdir -p l3/big l3/opt/app \
         && head -c 50000000 /dev/urandom | base64 -w 100 | head -c 67108864 > l3/big/file64 \
         && ln l3/big/file64 l3/big/file64-link && echo h > l3/opt/app/h1 && ln l3/opt/app/h1 l3/opt/app/h2 \
         && find l3 -exec touch -h -d @1700000000 {} + \
         && tar --numeric-owner --format=posix -C l3 -cf l3.tar big opt \
         && split -b 4194304 --filter='zstd -q -3 -c' l3.tar > l3.tar.zst",
    );
    assert!(l1.join("bin/busybox").exists());
    let layers = [
        LayerBlob {
            blob: t.join("l1.tar.gz"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: sha256_of(&t.join("l1.tar")),
        },
        LayerBlob {
            blob: t.join("l2.tar"),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: sha256_of(&t.join("l2.tar")),
        },
        LayerBlob {
            blob: t.join("l3.tar.zst"),
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            diff_id: sha256_of(&t.join("l3.tar")),
        },
    ];
    let oci = t.join("oci");
    write_layout(&oci, &layers, "t");
    for f in ["l1.tar", "l2.tar", "l3.tar"] {
        fs::remove_file(t.join(f)).unwrap();
    }
    oci
}

fn skopeo(args: &[&str]) {
    need("skopeo");
    util::run_ok(
        Command::new("skopeo")
            .args(["--insecure-policy"])
            .args(args),
    );
}

/// `umoci unpack` of the image (umoci reads no zstd: a gzip copy made by skopeo);
/// returns the rootfs.
fn umoci_rootfs(t: &TestDir, oci: &Path, tag: &str, name: &str) -> PathBuf {
    need("umoci");
    let gz = t.join(format!("{name}-gz"));
    skopeo(&[
        "copy",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
        &format!("oci:{}:{tag}", s(oci)),
        &format!("oci:{}:{tag}", s(&gz)),
    ]);
    let bundle = t.join(format!("{name}-bundle"));
    util::run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", s(&gz)))
            .arg(&bundle),
    );
    bundle.join("rootfs")
}

fn compare(expected: &Path, mnt: &Path) -> usize {
    tree::assert_same_tree(expected, mnt, &CmpOpts::default())
}

#[test]
fn oci_layout_oci_archive_and_docker_archive_mount_as_umoci_unpacks() {
    let t = TestDir::new("img-forms");
    let oci = sample_image(&t);
    let expected = umoci_rootfs(&t, &oci, "t", "sample");
    // The rootfs really went through whiteouts, a dir→file replacement and opacity.
    assert!(!expected.join("etc/deleteme").exists());
    assert!(expected.join("srv/dirfile").is_file());
    assert!(!expected.join("opt/app/a").exists() && expected.join("opt/app/new").exists());

    // One progress bar, one line per layer; the next inputs reuse the digest-keyed indexes.
    let r = snapfs(["index", &s(&oci)]);
    r.assert_ok();
    let out = r.stdout_str();
    assert_eq!(
        out.lines().filter(|l| l.starts_with("layer ")).count(),
        3,
        "{out}"
    );
    assert!(out.contains("image ") && out.contains("@t:"), "{out}");

    let archive = t.join("x.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:t", s(&oci)),
        &format!("oci-archive:{}:t", s(&archive)),
    ]);
    let digest_of_line = |l: &str| {
        l.split_whitespace()
            .nth(2)
            .unwrap_or("")
            .trim_end_matches(':')
            .to_string()
    };
    let first: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("layer "))
        .map(digest_of_line)
        .collect();
    let r = snapfs(["index", &s(&archive)]);
    r.assert_ok();
    let out = r.stdout_str();
    // skopeo gzips the plain layer on the way; the blobs it kept are not indexed again.
    let mut shared = 0;
    for l in out.lines().filter(|l| l.starts_with("layer ")) {
        if first.contains(&digest_of_line(l)) {
            assert!(l.contains("index is up to date"), "indexed again: {l}");
            shared += 1;
        }
    }
    assert!(shared >= 2, "{out}");

    // skopeo refuses zstd in docker-archive: convert the gzip copy.
    let docker = t.join("y.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:t", s(&t.join("sample-gz"))),
        &format!("docker-archive:{}:snapfs/sample:1", s(&docker)),
    ]);

    for (input, shown) in [
        (&oci, format!("{}@t", s(&oci))),
        (&archive, format!("{}@t", s(&archive))),
        (&docker, format!("{}@docker.io/snapfs/sample:1", s(&docker))),
    ] {
        let m = Mount::new(input, &t.join("mnt"));
        let n = compare(&expected, m.path());
        assert!(n > 250, "compared only {n} entries");
        let list = snapfs(["list"]).stdout_str();
        let line = list
            .lines()
            .find(|l| l.starts_with(&s(m.path())))
            .unwrap_or_default()
            .to_string();
        assert!(
            line.ends_with(&shown),
            "list line {line:?} should end with {shown:?}"
        );
        let info = util::mount_at(m.path()).unwrap();
        assert!(info.source.starts_with("snapfs:"), "{}", info.source);
        assert_eq!(
            info.source.matches(':').count(),
            1,
            "one input, ref colons escaped: {}",
            info.source
        );
    }
    // An image followed by an archive: the archive is one more layer on top.
    let extra = t.join("extra.tar");
    sh(
        t.path(),
        "mkdir -p ex/etc && echo top > ex/etc/motd && tar -C ex -cf extra.tar etc/motd",
    );
    let m = Mount::with_args(&extra, &t.join("mnt"), &[s(&archive).as_str()]);
    assert_eq!(fs::read_to_string(m.join("etc/motd")).unwrap(), "top\n");
    assert!(m.join("opt/app/new").exists());
}

/// A dockerd of the test's own (data root, exec root, socket, pid file); stopped by
/// its pid file on drop.
struct Dockerd {
    dir: PathBuf,
    pid: u32,
}

impl Dockerd {
    fn start(dir: &Path) -> Dockerd {
        need("dockerd");
        assert!(
            Path::new("/usr/bin/docker").exists(),
            "IMAGE TEST NOT RUN: /usr/bin/docker (docker.io) is missing"
        );
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("daemon.json"), "{}").unwrap();
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        let mut child = Command::new("dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", s(&dir.join("sock"))))
            .arg("--pidfile")
            .arg(dir.join("pid"))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver=vfs",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let pid = child.id();
        let d = Dockerd {
            dir: dir.to_path_buf(),
            pid,
        };
        let up = util::poll_until(Duration::from_secs(60), || {
            matches!(child.try_wait(), Ok(None)) && d.docker_try(&["version"]).ok()
        });
        if !up {
            let log = fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
            panic!(
                "IMAGE TEST NOT RUN: dockerd did not come up:\n{}",
                log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
            );
        }
        // Reap it in the background when it exits.
        std::thread::spawn(move || child.wait());
        d
    }

    fn docker_try(&self, args: &[&str]) -> util::Run {
        util::run_timeout(
            Command::new("/usr/bin/docker")
                .arg("-H")
                .arg(format!("unix://{}", s(&self.dir.join("sock"))))
                .args(args),
            Duration::from_secs(300),
        )
    }

    fn docker(&self, args: &[&str]) -> String {
        let r = self.docker_try(args);
        r.assert_ok();
        r.stdout_str()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let pid = fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .unwrap_or(self.pid as i32);
        // SAFETY: signalling a process we started, by its pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let gone = util::poll_until(Duration::from_secs(30), || !util::process_alive(pid as u32));
        if !gone {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            util::poll_until(Duration::from_secs(10), || !util::process_alive(pid as u32));
        }
    }
}

#[test]
fn docker_save_from_a_real_dockerd_mounts_as_the_image() {
    let t = TestDir::new("img-docker");
    // A busybox rootfs, imported and saved.
    crate::containers::rootfs_dir(&t.join("root"));
    sh(
        t.path(),
        "mkdir -p root/srv && echo x > root/srv/x && chown 7:8 root/srv/x && setfattr -n user.a -v b root/srv/x \
         && find root -exec touch -h -d @1600000000 {} + \
         && tar --xattrs --xattrs-include='*' --numeric-owner --format=posix -C root -cf rootfs.tar . \
         && mkdir expected && tar --xattrs --xattrs-include='*' --numeric-owner -xpf rootfs.tar -C expected",
    );
    let d = Dockerd::start(&t.join("docker"));
    d.docker(&["import", &s(&t.join("rootfs.tar")), "snapfs/imported:1"]);
    let saved = t.join("saved.tar");
    d.docker(&["save", "-o", &s(&saved), "snapfs/imported:1"]);
    // The three-layer image, loaded by the daemon and saved back.
    let oci = sample_image(&t);
    let expected3 = umoci_rootfs(&t, &oci, "t", "sample");
    let archive = t.join("sample-docker.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:t", s(&t.join("sample-gz"))),
        &format!("docker-archive:{}:snapfs/sample:3", s(&archive)),
    ]);
    d.docker(&["load", "-i", &s(&archive)]);
    let both = t.join("both.tar");
    d.docker(&[
        "save",
        "-o",
        &s(&both),
        "snapfs/imported:1",
        "snapfs/sample:3",
    ]);
    drop(d);

    let m = Mount::new(&saved, &t.join("mnt"));
    compare(&t.join("expected"), m.path());
    drop(m);
    // Two images in one save: --image chooses; without it the error lists both.
    let r = snapfs(["mount", &s(&both), &s(&t.mkdir("mnt2"))]);
    util::assert_one_line_error(&r, "choose one with --image");
    assert!(
        r.stderr_str().contains("snapfs/imported:1") && r.stderr_str().contains("snapfs/sample:3")
    );
    let m = Mount::with_args(&both, &t.join("mnt2"), &["--image", "snapfs/sample:3"]);
    compare(&expected3, m.path());
    let list = snapfs(["list"]).stdout_str();
    assert!(
        list.contains(&format!("{}@snapfs/sample:3", s(&both))),
        "{list}"
    );
    drop(m);
    let r = snapfs(["verify", &s(&both), "--image", "docker.io/snapfs/sample:3"]);
    r.assert_ok();
    assert_eq!(r.stdout_str().matches("ok layer").count(), 3);
}

/// `rchar` of `/proc/PID/io`.
fn rchar(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_mount_reads_no_layer_blob_in_full() {
    let t = TestDir::new("img-reads");
    // A 1 GiB layer (semi-compressible, pigz -1) above a small one.
    sh(
        t.path(),
        "mkdir -p small/etc big/data && echo hello > small/etc/hello \
         && head -c 800000000 /dev/urandom | base64 -w 100 | head -c 1073741824 > big/data/huge \
         && echo tiny > big/data/tiny && tar -C small -cf small.tar etc \
         && mkfifo stream && { sha256sum < stream > big.diff & } \
         && tar -C big -cf - data | tee stream | pigz -1 -p 2 > big.tar.gz && wait && rm -rf big/data/huge",
    );
    let big = t.join("big.tar.gz");
    let big_diff = format!(
        "sha256:{}",
        fs::read_to_string(t.join("big.diff"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
    );
    let layers = [
        LayerBlob {
            blob: t.join("small.tar"),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: sha256_of(&t.join("small.tar")),
        },
        LayerBlob {
            blob: big.clone(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: big_diff,
        },
    ];
    let oci = t.join("oci");
    write_layout(&oci, &layers, "big");
    fs::remove_file(&big).unwrap();
    let archive = t.join("big-image.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:big", s(&oci)),
        &format!("oci-archive:{}:big", s(&archive)),
    ]);
    fs::remove_dir_all(&oci).unwrap();
    let blob_size: u64 = 1 << 30;
    // The one indexing pass per layer digest, ever (it may have been made before).
    snapfs(["index", &s(&archive)]).assert_ok();

    let mnt = t.mkdir("mnt");
    let r = util::run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("\"$0\" mount \"$1\" \"$2\" && grep rchar /proc/$$/io")
            .arg(util::bin())
            .arg(&archive)
            .arg(&mnt),
    );
    let m = Mount::adopt(&archive, &mnt.canonicalize().unwrap());
    assert!(util::poll_until(Duration::from_secs(30), || {
        util::is_mounted(m.path())
    }));
    let cli: u64 = r
        .stdout_str()
        .trim()
        .trim_start_matches("rchar:")
        .trim()
        .parse()
        .unwrap();
    let pid = util::daemon_pid(m.path(), &archive);
    let at_mount = rchar(pid);
    assert_eq!(fs::read_to_string(m.join("data/tiny")).unwrap(), "tiny\n");
    assert_eq!(fs::read_to_string(m.join("etc/hello")).unwrap(), "hello\n");
    let after = rchar(pid);
    eprintln!(
        "bytes read: mount command {cli}, daemon at mount {at_mount}, for two small files {}",
        after - at_mount
    );
    // A few 4 MiB spans at most (compressed ~3.1 MiB each); the blob is 1 GiB.
    assert!(cli < 16 << 20, "the mount command read {cli} bytes");
    assert!(
        at_mount < 16 << 20,
        "the daemon read {at_mount} bytes to mount"
    );
    assert!(
        after - at_mount < 32 << 20,
        "reading two small files read {} bytes",
        after - at_mount
    );
    assert!(cli + after < blob_size / 16);
}

/// A small two-layer image (gzip + plain) as a layout at `t/NAME`, tag `v`.
pub(crate) fn small_image(t: &TestDir, name: &str) -> (PathBuf, Vec<LayerBlob>) {
    sh(
        t.path(),
        &format!(
            "mkdir -p {name}-a/etc {name}-b/etc && echo one > {name}-a/etc/one && echo two > {name}-b/etc/two \
             && find {name}-a {name}-b -exec touch -h -d @1600000000 {{}} + \
             && tar --numeric-owner -C {name}-a -cf {name}-a.tar . && gzip -kn {name}-a.tar \
             && tar --numeric-owner -C {name}-b -cf {name}-b.tar ."
        ),
    );
    let layers = vec![
        LayerBlob {
            blob: t.join(format!("{name}-a.tar.gz")),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: sha256_of(&t.join(format!("{name}-a.tar"))),
        },
        LayerBlob {
            blob: t.join(format!("{name}-b.tar")),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff_id: sha256_of(&t.join(format!("{name}-b.tar"))),
        },
    ];
    let dir = t.join(name);
    write_layout(&dir, &layers, "v");
    (dir, layers)
}

#[test]
fn verify_names_a_flipped_byte_and_a_wrong_diff_id() {
    let t = TestDir::new("img-verify");
    let (good, layers) = small_image(&t, "good");
    let r = snapfs(["verify", &s(&good)]);
    r.assert_ok();
    assert_eq!(
        r.stdout_str().matches("ok layer").count(),
        2,
        "{}",
        r.stdout_str()
    );

    // A flipped byte inside the gzip layer's compressed data.
    let (bad, _) = small_image(&t, "flip");
    let gz_digest = sha256_of(&layers[0].blob);
    let blob = bad.join("blobs/sha256").join(&gz_digest[7..]);
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&blob, &bytes).unwrap();
    let r = snapfs(["verify", &s(&bad)]);
    util::assert_one_line_error(&r, &gz_digest);
    let r = snapfs(["mount", "--verify", &s(&bad), &s(&t.mkdir("mnt"))]);
    util::assert_one_line_error(&r, &gz_digest);
    assert!(!util::is_mounted(&t.join("mnt").canonicalize().unwrap()));

    // A config whose diff_id for the plain layer is wrong (the blobs are fine).
    let wrong = t.join("wrong");
    new_layout(&wrong);
    let ids = vec![
        layers[0].diff_id.clone(),
        format!("sha256:{}", "0".repeat(64)),
    ];
    let (d, n) = put_image(&wrong, &layers, host_arch(), Some(&ids));
    fs::write(wrong.join("index.json"), format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{n}}}]}}"#)).unwrap();
    let plain = sha256_of(&layers[1].blob);
    let r = snapfs(["verify", &s(&wrong)]);
    util::assert_one_line_error(&r, &plain);
    assert!(r.stderr_str().contains("diff_id"), "{}", r.stderr_str());
    let r = snapfs(["mount", "--verify", &s(&wrong), &s(&t.mkdir("mnt"))]);
    util::assert_one_line_error(&r, "diff_id");
    // Without --verify the mount goes live (it reads no whole blob to check them).
    let m = Mount::new(&wrong, &t.join("mnt"));
    assert_eq!(fs::read_to_string(m.join("etc/two")).unwrap(), "two\n");
}

#[test]
fn commit_image_writes_an_image_of_the_writable_view() {
    let t = TestDir::new("img-commit");
    let (img, _) = small_image(&t, "base");
    let upper = t.join("upper");
    let view = t.join("view");
    {
        let m = Mount::with_args(&img, &t.join("mnt"), &["--upper", &s(&upper)]);
        sh(
            m.path(),
            "rm etc/one && echo new > etc/new && mkdir -p srv/d && echo deep > srv/d/f && chmod 0600 etc/two \
             && setfattr -n user.c -v v etc/new && touch -d @1700000000 etc/new srv/d/f srv/d srv etc .",
        );
        sh(t.path(), &format!("cp -a {}/. {}", s(m.path()), s(&view)));
    }
    let out_dir = t.join("out");
    let out_tar = t.join("out.tar");
    for out in [&out_dir, &out_tar] {
        let r = snapfs([
            "commit",
            &s(&img),
            "--upper",
            &s(&upper),
            "--image",
            &s(out),
            "--tag",
            "next",
        ]);
        r.assert_ok();
        assert!(r.stdout_str().contains("3 layers"), "{}", r.stdout_str());
    }
    // Never over an existing image.
    let r = snapfs([
        "commit",
        &s(&img),
        "--upper",
        &s(&upper),
        "--image",
        &s(&out_dir),
    ]);
    util::assert_one_line_error(&r, "exists");

    let inspect = util::run_ok(
        Command::new("skopeo")
            .args(["inspect"])
            .arg(format!("oci:{}:next", s(&out_dir))),
    )
    .stdout_str();
    assert!(
        inspect.contains("\"Layers\"") && inspect.matches("sha256:").count() >= 4,
        "{inspect}"
    );
    util::run_ok(
        Command::new("skopeo")
            .args(["inspect"])
            .arg(format!("oci-archive:{}:next", s(&out_tar))),
    );
    // skopeo copy checks every blob's digest.
    skopeo(&[
        "copy",
        &format!("oci-archive:{}:next", s(&out_tar)),
        &format!("dir:{}", s(&t.join("copied"))),
    ]);
    let r = snapfs(["verify", &s(&out_tar)]);
    r.assert_ok();
    assert_eq!(r.stdout_str().matches("ok layer").count(), 3);

    let unpacked = umoci_rootfs(&t, &out_dir, "next", "out");
    // The view's root and its own metadata come from the upper dir; compare contents.
    let o = CmpOpts::default();
    tree::assert_same_tree(&view, &unpacked, &o);
    for input in [&out_dir, &out_tar] {
        let m = Mount::new(input, &t.join("mnt"));
        tree::assert_same_tree(&view, m.path(), &o);
    }
}

#[test]
fn docker_25_save_layout_with_manifest_json_beside_index_json() {
    let t = TestDir::new("img-docker25");
    let (dir, _) = small_image(&t, "d25");
    // What Docker 25+ `docker save` writes: the OCI layout plus manifest.json naming
    // blobs by path, and the full name in io.containerd.image.name.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let msize = index["manifests"][0]["size"].as_u64().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(&mdigest[7..])).unwrap())
            .unwrap();
    let path_of = |d: &serde_json::Value| format!("blobs/sha256/{}", &d.as_str().unwrap()[7..]);
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| path_of(&l["digest"]))
        .collect();
    let mj = serde_json::json!([{
        "Config": path_of(&manifest["config"]["digest"]),
        "RepoTags": ["app:1"],
        "Layers": layers,
    }]);
    fs::write(dir.join("manifest.json"), mj.to_string()).unwrap();
    fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{mdigest}","size":{msize},"annotations":{{"io.containerd.image.name":"docker.io/library/app:1","org.opencontainers.image.ref.name":"1"}}}}]}}"#
        ),
    )
    .unwrap();
    sh(
        &dir,
        "tar --numeric-owner -cf ../d25.tar blobs index.json manifest.json oci-layout",
    );
    let save = t.join("d25.tar");
    for args in [&[][..], &["--image", "app:1"][..]] {
        let m = Mount::with_args(&save, &t.join("mnt"), args);
        assert_eq!(fs::read_to_string(m.join("etc/two")).unwrap(), "two\n");
        let list = snapfs(["list"]).stdout_str();
        assert!(
            list.contains(&format!("{}@docker.io/library/app:1", s(&save))),
            "{list}"
        );
    }
    let r = snapfs(["verify", &s(&save)]);
    r.assert_ok();
}

#[test]
fn platform_and_reference_selection_and_hostile_json() {
    let t = TestDir::new("img-select");
    let (_, layers) = small_image(&t, "s");
    // One layout: an index (two platforms) named "multi", plus a plain image "solo".
    let dir = t.join("multi");
    new_layout(&dir);
    let (host_m, host_n) = put_image(&dir, &layers[..1], host_arch(), None);
    let (other_m, other_n) = put_image(&dir, &layers, "s390x", None);
    let host = host_arch();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{host_m}","size":{host_n},"platform":{{"os":"linux","architecture":"{host}"}}}},
{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{other_m}","size":{other_n},"platform":{{"os":"linux","architecture":"s390x"}}}}]}}"#
    );
    let index_digest = put_blob(&dir, index.as_bytes());
    fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[
{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{index_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"multi"}}}},
{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{other_m}","size":{other_n},"annotations":{{"org.opencontainers.image.ref.name":"solo"}}}}]}}"#,
            index.len()
        ),
    )
    .unwrap();
    let mnt = t.mkdir("mnt");
    let r = snapfs(["mount", &s(&dir), &s(&mnt)]);
    util::assert_one_line_error(&r, "choose one with --image: multi, solo");
    let r = snapfs(["mount", "--image", "nope", &s(&dir), &s(&mnt)]);
    util::assert_one_line_error(&r, "no image named \"nope\"; it has: multi, solo");
    {
        let m = Mount::with_args(&dir, &mnt, &["--image", "multi"]);
        assert!(
            m.join("etc/one").exists() && !m.join("etc/two").exists(),
            "host platform: one layer"
        );
    }
    {
        let m = Mount::with_args(
            &dir,
            &mnt,
            &["--image", "multi", "--platform", "linux/s390x"],
        );
        assert!(m.join("etc/two").exists());
    }
    let r = snapfs([
        "mount",
        "--image",
        "multi",
        "--platform",
        "linux/riscv64",
        &s(&dir),
        &s(&mnt),
    ]);
    util::assert_one_line_error(
        &r,
        &format!("no image for linux/riscv64; it has: linux/{host}, linux/s390x"),
    );
    let r = snapfs([
        "mount",
        "--image",
        "solo",
        "--platform",
        "linux/riscv64",
        &s(&dir),
        &s(&mnt),
    ]);
    util::assert_one_line_error(&r, "the image is for linux/s390x, not linux/riscv64");
    let r = snapfs(["mount", "--platform", "linux", &s(&dir), &s(&mnt)]);
    util::assert_one_line_error(&r, "bad platform");

    // Hostile JSON: each a layout whose index.json says one bad thing.
    let d = format!("sha256:{}", "a".repeat(64));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad-digest",
            r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:../../../etc/passwd","size":1}]}"#
                .into(),
            "bad digest",
        ),
        (
            "missing",
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":10}}]}}"#
            ),
            "is missing",
        ),
        (
            "huge",
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":18446744073709551615}}]}}"#
            ),
            "over the",
        ),
        (
            "negative",
            format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{d}","size":-5}}]}}"#),
            "bad JSON",
        ),
        ("deep", "[".repeat(200_000), "bad JSON"),
        (
            "empty",
            r#"{"schemaVersion":2,"manifests":[]}"#.into(),
            "lists no images",
        ),
        (
            "wrong-size",
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{other_m}","size":3}}]}}"#
            ),
            "its descriptor says 3",
        ),
    ];
    for (name, json, needle) in cases {
        let h = t.join(name);
        new_layout(&h);
        for e in fs::read_dir(dir.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), h.join("blobs/sha256").join(e.file_name())).unwrap();
        }
        fs::write(h.join("index.json"), json).unwrap();
        let r = snapfs(["mount", &s(&h), &s(&mnt)]);
        util::assert_one_line_error(&r, needle);
        assert!(
            r.stderr_str().contains(&s(&h)),
            "names the image: {}",
            r.stderr_str()
        );
    }
    // docker save paths with .. and foreign layers are refused too.
    let ds = t.join("dsave");
    fs::create_dir_all(&ds).unwrap();
    fs::write(
        ds.join("manifest.json"),
        r#"[{"Config":"../../etc/passwd","RepoTags":["x:1"],"Layers":["a/layer.tar"]}]"#,
    )
    .unwrap();
    let r = snapfs(["mount", &s(&ds), &s(&mnt)]);
    util::assert_one_line_error(&r, "refusing the path");
    let foreign = t.join("foreign");
    new_layout(&foreign);
    let cfg = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:1111111111111111111111111111111111111111111111111111111111111111"]}}"#;
    let cd = put_blob(&foreign, cfg.as_bytes());
    let man = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{d}","size":5,"urls":["https://example.invalid/layer"]}}]}}"#,
        cfg.len()
    );
    let md = put_blob(&foreign, man.as_bytes());
    fs::write(foreign.join("index.json"), format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{}}}]}}"#, man.len())).unwrap();
    let r = snapfs(["mount", &s(&foreign), &s(&mnt)]);
    util::assert_one_line_error(
        &r,
        "foreign / non-distributable layer, to be fetched from https://example.invalid/layer",
    );
    assert!(!util::is_mounted(&mnt.canonicalize().unwrap()));
}
