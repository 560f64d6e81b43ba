//! snapfs views in a real OCI runtime (runc, from Debian's `runc` package), started by
//! the tests: a snapshot as a read-only container rootfs, a data snapshot bound at
//! /data read-only, a writable view bound at /data whose changes are cut as a delta,
//! and uid/gid mapping seen from inside a user-namespace container.
//!
//! ROOT ONLY: runc needs root (namespaces, pivot_root, mounts). The rootfs is built at
//! test time from busybox-static. Where runc is missing or cannot start a container on
//! this machine, the tests fail with one line naming the reason; they never pass
//! without running a container.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{self, sh, Mount, Run, TestDir};

/// The OCI runtime on PATH (runc preferred, crun as a fallback).
fn runtime() -> PathBuf {
    for rt in ["runc", "crun"] {
        let r = util::run(Command::new("sh").arg("-c").arg(format!("command -v {rt}")));
        if r.ok() {
            return PathBuf::from(r.stdout_str().trim());
        }
    }
    panic!("CONTAINER TEST NOT RUN: no OCI runtime (runc or crun) on PATH; apt-get install runc");
}

pub(crate) fn busybox() -> PathBuf {
    let r = util::run(Command::new("sh").arg("-c").arg("command -v busybox"));
    let p = PathBuf::from(r.stdout_str().trim());
    // A dynamically linked busybox would not run in a rootfs without a libc.
    let static_ok = r.ok() && !util::run(Command::new("ldd").arg(&p)).ok();
    assert!(
        static_ok,
        "CONTAINER TEST NOT RUN: no static busybox on PATH; apt-get install busybox-static"
    );
    p
}

/// A busybox root filesystem directory: /bin/busybox, relative applet links, the usual
/// top-level dirs, /etc/passwd and a marker file.
pub(crate) fn rootfs_dir(dir: &Path) -> PathBuf {
    let root = dir.to_path_buf();
    for d in ["bin", "dev", "proc", "sys", "tmp", "data", "etc", "root"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    let list = util::run_ok(Command::new(root.join("bin/busybox")).arg("--list")).stdout_str();
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/motd"), "snapfs rootfs marker\n").unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    root
}

/// Makes `td` traversable by other users (user-namespace containers run as other uids).
fn open_up(td: &TestDir) {
    fs::set_permissions(td.path(), fs::Permissions::from_mode(0o755)).unwrap();
}

/// One bind mount of the bundle.
struct Bind<'a> {
    source: &'a Path,
    dest: &'a str,
    ro: bool,
}

/// Options of the user namespace: (container id, host id, count) for uids and gids.
type UserNs = Option<(u32, u32, u32)>;

/// Writes an OCI bundle (config.json) into `bundle`.
fn write_bundle(
    bundle: &Path,
    rootfs: &Path,
    ro_root: bool,
    args: &str,
    binds: &[Bind<'_>],
    userns: UserNs,
) {
    fs::create_dir_all(bundle).unwrap();
    let q = |s: &str| format!("{s:?}"); // JSON string (Rust debug quoting is JSON-safe for these)
    let mut mounts = String::new();
    let _ = write!(
        mounts,
        r#"{{"destination":"/proc","type":"proc","source":"proc"}},
{{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}},
{{"destination":"/tmp","type":"tmpfs","source":"tmpfs","options":["nosuid","nodev","mode=1777"]}}"#
    );
    // sysfs can only be mounted by a user namespace that owns the network namespace;
    // a bind of the host's /sys works everywhere.
    let _ = write!(
        mounts,
        r#",{{"destination":"/sys","type":"bind","source":"/sys","options":["rbind","nosuid","noexec","nodev","ro"]}}"#
    );
    for b in binds {
        // nosuid,nodev(,noatime) are kept: in a user namespace they are locked flags
        // of the FUSE mount and a bind remount must repeat them.
        let ro = if b.ro { r#","ro""# } else { "" };
        let _ = write!(
            mounts,
            r#",{{"destination":{},"type":"bind","source":{},"options":["rbind","nosuid","nodev","noatime"{ro}]}}"#,
            q(b.dest),
            q(&b.source.display().to_string())
        );
    }
    let mut namespaces = String::from(
        r#"{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},{"type":"network"}"#,
    );
    let mut maps = String::new();
    if let Some((c, h, n)) = userns {
        namespaces.push_str(r#",{"type":"user"}"#);
        let _ = write!(
            maps,
            r#","uidMappings":[{{"containerID":{c},"hostID":{h},"size":{n}}}],"gidMappings":[{{"containerID":{c},"hostID":{h},"size":{n}}}]"#
        );
    }
    let caps =
        r#"["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FOWNER","CAP_KILL","CAP_SETUID","CAP_SETGID"]"#;
    let config = format!(
        r#"{{"ociVersion":"1.0.2","process":{{"terminal":false,"user":{{"uid":0,"gid":0}},"args":["/bin/sh","-c",{args}],"env":["PATH=/bin","HOME=/root"],"cwd":"/","capabilities":{{"bounding":{caps},"effective":{caps},"permitted":{caps}}},"noNewPrivileges":true}},
"root":{{"path":{root},"readonly":{ro_root}}},"hostname":"snapfs-test",
"mounts":[{mounts}],
"linux":{{"namespaces":[{namespaces}]{maps},"maskedPaths":["/proc/kcore","/proc/keys"],"readonlyPaths":["/proc/sys","/proc/sysrq-trigger"]}}}}"#,
        args = q(args),
        root = q(&rootfs.display().to_string()),
    );
    fs::write(bundle.join("config.json"), config).unwrap();
}

/// A container run by the tests; `runc delete -f` on drop (also on failure).
struct Container {
    rt: PathBuf,
    state: PathBuf,
    id: String,
}

impl Container {
    fn run(td: &TestDir, name: &str, bundle: &Path) -> (Container, Run) {
        let rt = runtime();
        let state = td.join("runtime-state");
        fs::create_dir_all(&state).unwrap();
        let id = format!("snapfs-it-{name}-{}", std::process::id());
        let c = Container {
            rt: rt.clone(),
            state: state.clone(),
            id: id.clone(),
        };
        let r = util::run_timeout(
            Command::new(&rt)
                .arg("--root")
                .arg(&state)
                .arg("run")
                .arg("--bundle")
                .arg(bundle)
                .arg(&id),
            Duration::from_secs(120),
        );
        (c, r)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(&self.rt)
            .arg("--root")
            .arg(&self.state)
            .arg("delete")
            .arg("-f")
            .arg(&self.id)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Fails with one line if the runtime could not start the container at all (as opposed
/// to the container's command failing).
fn assert_started(r: &Run) {
    let err = r.stderr_str();
    if err.contains("runc run failed") || err.contains("unable to start container") {
        let line = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        panic!("CONTAINER TEST NOT RUN: the OCI runtime cannot start a container here: {line}");
    }
}

/// Runs the container and returns its stdout; panics with its output if it failed.
fn run_container(td: &TestDir, name: &str, bundle: &Path) -> String {
    let (_c, r) = Container::run(td, name, bundle);
    assert_started(&r);
    assert!(
        r.ok(),
        "container {name} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        r.status,
        r.stdout_str(),
        r.stderr_str()
    );
    r.stdout_str()
}

/// The value after `key=` on a line of the container's output.
fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::trim)
}

// ---------------------------------------------------------------- (a) rootfs

/// (a) A busybox rootfs snapshot (tar.gz) mounted by snapfs is the container's
/// read-only root; the container runs a shell command. ROOT ONLY.
#[test]
fn runc_runs_a_container_on_a_snapfs_rootfs() {
    let td = TestDir::new("oci-rootfs");
    let src = rootfs_dir(&td.join("src"));
    sh(
        td.path(),
        "tar --numeric-owner --owner=0 --group=0 -C src -czf rootfs.tar.gz .",
    )
    .assert_ok();
    let m = Mount::new(&td.join("rootfs.tar.gz"), &td.join("rootfs"));
    let script = "echo motd=$(cat /etc/motd); \
        echo rootfs=$(awk '$5 == \"/\" {for (i = 7; $i != \"-\"; i++) {}; print $(i+1)}' /proc/self/mountinfo); \
        echo applets=$(ls /bin | wc -l); \
        echo sum=$(sha256sum /bin/busybox | cut -d' ' -f1); \
        if touch /new-file 2>/dev/null; then echo write=allowed; else echo write=refused; fi; \
        echo uid=$(id -u)";
    let bundle = td.join("bundle");
    write_bundle(&bundle, m.path(), true, script, &[], None);
    let out = run_container(&td, "rootfs", &bundle);
    assert_eq!(field(&out, "motd"), Some("snapfs rootfs marker"), "{out}");
    assert_eq!(
        field(&out, "rootfs"),
        Some("fuse.snapfs"),
        "the container's / is not the snapfs mount:\n{out}"
    );
    let applets = fs::read_dir(src.join("bin")).unwrap().count();
    assert_eq!(
        field(&out, "applets"),
        Some(applets.to_string().as_str()),
        "{out}"
    );
    let want = util::sha256_file(&src.join("bin/busybox")).unwrap();
    assert_eq!(field(&out, "sum"), Some(want.as_str()), "{out}");
    assert_eq!(field(&out, "write"), Some("refused"), "{out}");
    assert_eq!(field(&out, "uid"), Some("0"), "{out}");
    m.unmount();
}

// ---------------------------------------------------------------- (b) data, read-only

fn data_tree(dir: &Path) {
    fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    fs::write(dir.join("small.txt"), "hello from the snapshot\n").unwrap();
    fs::write(dir.join("sub/random.bin"), util::random_bytes(3 << 20, 41)).unwrap();
    fs::write(
        dir.join("sub/deeper/text.bin"),
        util::semi_compressible(5 << 20, 42),
    )
    .unwrap();
    fs::write(dir.join("empty"), b"").unwrap();
    fs::write(dir.join("old.txt"), "to be deleted\n").unwrap();
    fs::write(dir.join("append.txt"), "line 1\n").unwrap();
}

/// Host-side `sha256 path` lines of every regular file under `dir`, sorted.
fn host_sums(dir: &Path) -> Vec<String> {
    let out = sh(dir, "find . -type f | sort | xargs sha256sum")
        .assert_ok()
        .stdout_str();
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// (b) A data snapshot mounted by snapfs, bound read-only at /data: the container
/// checksums every file (same sums as the source tree) and cannot write. ROOT ONLY.
#[test]
fn runc_reads_and_checksums_a_data_snapshot_at_data() {
    let td = TestDir::new("oci-data-ro");
    let rootfs = rootfs_dir(&td.join("rootfs"));
    data_tree(&td.join("data-src"));
    sh(
        td.path(),
        "tar --numeric-owner -C data-src -czf data.tar.gz .",
    )
    .assert_ok();
    let m = Mount::new(&td.join("data.tar.gz"), &td.join("mnt"));
    let script = "cd /data && find . -type f | sort | xargs sha256sum; \
        if echo x 2>/tmp/err > /data/new; then echo write=allowed; else echo write=refused; fi; \
        echo err=$(cat /tmp/err); \
        if rm /data/small.txt 2>/dev/null; then echo rm=allowed; else echo rm=refused; fi";
    let bundle = td.join("bundle");
    write_bundle(
        &bundle,
        &rootfs,
        true,
        script,
        &[Bind {
            source: m.path(),
            dest: "/data",
            ro: true,
        }],
        None,
    );
    let out = run_container(&td, "data-ro", &bundle);
    let sums: Vec<String> = out
        .lines()
        .filter(|l| l.contains("  ./"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        sums,
        host_sums(&td.join("data-src")),
        "container output:\n{out}"
    );
    assert_eq!(field(&out, "write"), Some("refused"), "{out}");
    assert!(
        field(&out, "err").is_some_and(|e| e.contains("Read-only file system")),
        "{out}"
    );
    assert_eq!(field(&out, "rm"), Some("refused"), "{out}");
    assert!(!m.join("new").exists());
    assert!(m.join("small.txt").exists());
    m.unmount();
}

// ---------------------------------------------------------------- (c) writable view

/// Members of a tar file, `./` and trailing `/` stripped, sorted.
pub fn tar_members(td: &TestDir, tar: &str) -> Vec<String> {
    let out = sh(td.path(), &format!("tar -tf {tar}"))
        .assert_ok()
        .stdout_str();
    let mut v: Vec<String> = out
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != ".")
        .collect();
    v.sort();
    v
}

/// (c) A writable view (`--upper`) bound read-write at /data: the container writes,
/// then `snapfs umount` and `snapfs commit` cut a delta that holds exactly the change.
/// ROOT ONLY.
#[test]
fn runc_writes_into_a_writable_view_and_commit_cuts_exactly_the_change() {
    let td = TestDir::new("oci-data-rw");
    let rootfs = rootfs_dir(&td.join("rootfs"));
    data_tree(&td.join("data-src"));
    sh(
        td.path(),
        "tar --numeric-owner -C data-src -czf data.tar.gz .",
    )
    .assert_ok();
    let upper = td.join("upper");
    let upper_s = upper.display().to_string();
    let m = Mount::with_args(
        &td.join("data.tar.gz"),
        &td.join("mnt"),
        &["--upper", &upper_s],
    );
    let script = "set -e; cd /data; echo 'written in a container' > new.txt; \
        echo 'line 2' >> append.txt; rm old.txt; mkdir -p made/here; echo deep > made/here/f; \
        sync; echo done=yes";
    let bundle = td.join("bundle");
    write_bundle(
        &bundle,
        &rootfs,
        true,
        script,
        &[Bind {
            source: m.path(),
            dest: "/data",
            ro: false,
        }],
        None,
    );
    let out = run_container(&td, "data-rw", &bundle);
    assert_eq!(field(&out, "done"), Some("yes"), "{out}");
    // The host sees the container's writes through the view.
    assert_eq!(
        fs::read_to_string(m.join("new.txt")).unwrap(),
        "written in a container\n"
    );
    let mnt = m.path().to_path_buf();
    // commit refuses a mounted view; unmount with the CLI, then cut.
    util::snapfs([std::ffi::OsStr::new("umount"), mnt.as_os_str()]).assert_ok();
    m.unmount(); // checks it is gone
    util::snapfs([
        "commit",
        &td.join("data.tar.gz").display().to_string(),
        "--upper",
        &upper_s,
        "-o",
        &td.join("delta.tar").display().to_string(),
    ])
    .assert_ok();
    let members = tar_members(&td, "delta.tar");
    let mut want: Vec<String> = [
        "new.txt",
        "append.txt",
        ".wh.old.txt",
        "made",
        "made/here",
        "made/here/f",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    // The root directory itself may be recorded (its mtime changed); nothing else may.
    let got: Vec<String> = members.into_iter().filter(|m| !m.is_empty()).collect();
    assert_eq!(got, want, "delta members");
    // Contents: extract the delta and compare.
    sh(td.path(), "mkdir x && tar -xf delta.tar -C x").assert_ok();
    assert_eq!(
        fs::read_to_string(td.join("x/new.txt")).unwrap(),
        "written in a container\n"
    );
    assert_eq!(
        fs::read_to_string(td.join("x/append.txt")).unwrap(),
        "line 1\nline 2\n"
    );
    assert_eq!(
        fs::read_to_string(td.join("x/made/here/f")).unwrap(),
        "deep\n"
    );
    assert_eq!(fs::metadata(td.join("x/.wh.old.txt")).unwrap().len(), 0);
    // Parent + delta mount as the view the container left.
    let m2 = crate::layers::mount_layers(
        &[td.join("data.tar.gz"), td.join("delta.tar")],
        &td.join("mnt2"),
    );
    assert!(!m2.join("old.txt").exists());
    assert_eq!(
        fs::read_to_string(m2.join("append.txt")).unwrap(),
        "line 1\nline 2\n"
    );
    let want_sum = util::sha256_file(&td.join("data-src/sub/random.bin")).unwrap();
    assert_eq!(
        util::sha256_file(&m2.join("sub/random.bin")).unwrap(),
        want_sum
    );
}

// ---------------------------------------------------------------- uid/gid mapping

/// An archive with entries owned by 0:0, 1000:1000, 1000:50 and an id outside the
/// map (70000:70000).
fn owned_archive(td: &TestDir) -> PathBuf {
    let p = td.join("owned.tar");
    util::owned_tar(
        &p,
        &[
            (".", 0, 0, 0o755, None),
            ("root-file", 0, 0, 0o644, Some("root\n")),
            ("home", 1000, 1000, 0o755, None),
            ("home/user-file", 1000, 50, 0o600, Some("user\n")),
            ("stranger", 70000, 70000, 0o644, Some("x\n")),
        ],
    );
    p
}

/// --uid-map/--gid-map 0:100000:65536: the host sees shifted ids, a user-namespace
/// container with the same map sees the archive's ids, and what the container writes
/// is recorded with archive-side ids (in the upper dir and in the committed delta).
/// ROOT ONLY.
#[test]
fn runc_userns_container_sees_archive_ids_through_the_map() {
    let td = TestDir::new("oci-idmap");
    open_up(&td);
    let rootfs = rootfs_dir(&td.join("rootfs"));
    let archive = owned_archive(&td);
    let upper = td.join("upper");
    let upper_s = upper.display().to_string();
    let m = Mount::with_args(
        &archive,
        &td.join("mnt"),
        &[
            "-o",
            "allow_other",
            "--uid-map",
            "0:100000:65536",
            "--gid-map",
            "0:100000:65536",
            "--upper",
            &upper_s,
        ],
    );
    // Host side.
    assert_eq!(util::owner_of(m.path()), (100000, 100000));
    assert_eq!(util::owner_of(&m.join("root-file")), (100000, 100000));
    assert_eq!(util::owner_of(&m.join("home/user-file")), (101000, 100050));
    assert_eq!(util::owner_of(&m.join("stranger")), (65534, 65534));
    // Container side: root in a user namespace whose root is host uid 100000.
    let script = "cd /data; for f in . root-file home home/user-file stranger; do \
            echo \"ids $f=$(stat -c %u:%g $f)\"; done; \
        echo uidmap=$(cat /proc/self/uid_map); \
        echo user-file=$(cat home/user-file); \
        echo made-by-container > new-file && echo new=$(stat -c %u:%g new-file); \
        mkdir home/made && chown 1000:1000 home/made && echo chowned=$(stat -c %u:%g home/made)";
    let bundle = td.join("bundle");
    write_bundle(
        &bundle,
        &rootfs,
        true,
        script,
        &[Bind {
            source: m.path(),
            dest: "/data",
            ro: false,
        }],
        Some((0, 100000, 65536)),
    );
    let out = run_container(&td, "idmap", &bundle);
    assert_eq!(field(&out, "ids ."), Some("0:0"), "{out}");
    assert_eq!(field(&out, "ids root-file"), Some("0:0"), "{out}");
    assert_eq!(field(&out, "ids home"), Some("1000:1000"), "{out}");
    assert_eq!(field(&out, "ids home/user-file"), Some("1000:50"), "{out}");
    assert_eq!(field(&out, "ids stranger"), Some("65534:65534"), "{out}");
    assert!(
        field(&out, "uidmap").is_some_and(|m| m.split_whitespace().eq(["0", "100000", "65536"])),
        "{out}"
    );
    assert_eq!(field(&out, "user-file"), Some("user"), "{out}");
    assert_eq!(field(&out, "new"), Some("0:0"), "{out}");
    assert_eq!(field(&out, "chowned"), Some("1000:1000"), "{out}");
    // The host sees them shifted; the upper dir stores archive-side ids.
    assert_eq!(util::owner_of(&m.join("new-file")), (100000, 100000));
    assert_eq!(util::owner_of(&m.join("home/made")), (101000, 101000));
    assert_eq!(util::owner_of(&upper.join("tree/new-file")), (0, 0));
    assert_eq!(util::owner_of(&upper.join("tree/home/made")), (1000, 1000));
    m.unmount();
    // A cut of the mapped view records archive-side ids.
    util::snapfs([
        "commit",
        &archive.display().to_string(),
        "--upper",
        &upper_s,
        "-o",
        &td.join("delta.tar").display().to_string(),
    ])
    .assert_ok();
    let listing = sh(td.path(), "tar --numeric-owner -tvf delta.tar")
        .assert_ok()
        .stdout_str();
    let owner_of = |name: &str| {
        listing
            .lines()
            .find(|l| l.trim_end().trim_end_matches('/').ends_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    assert_eq!(owner_of("new-file").as_deref(), Some("0/0"), "{listing}");
    assert_eq!(
        owner_of("home/made").as_deref(),
        Some("1000/1000"),
        "{listing}"
    );
}
