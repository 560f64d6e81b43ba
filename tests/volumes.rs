//! Docker volumes from snapshots (issue 14), with Debian's own dockerd started by the
//! test (its own data root, exec root, socket and pid file; `--bridge=none
//! --iptables=false`, `--network none` containers of a `docker import`ed
//! busybox-static image) and a `snapfs serve --docker-plugin` whose plugin socket
//! has a name of its own under /run/docker/plugins. One dockerd serves the whole
//! sequence: exact bytes in a container, writes kept across container restarts, a
//! snapshot mounted as a new volume, snapshot --pause of a volume in use, concurrent
//! containers on one view, rm in use refused, bad options refused with one clear
//! error, restore and the kept pre-restore state, and kill -9 of the service and of
//! dockerd. Daemons are stopped by pid; no mount, socket or process is left. ROOT
//! ONLY.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::util::{self, NoMountsLeft, Run, Service, TestDir};

/// Debian's docker.io dockerd (in /usr/sbin; /usr/bin on some layouts).
const DOCKERDS: [&str; 2] = ["/usr/sbin/dockerd", "/usr/bin/dockerd"];
const DOCKER: &str = "/usr/bin/docker";
const PLUGIN_DIR: &str = "/run/docker/plugins";
const LONG: Duration = Duration::from_secs(180);

fn dockerd_bin() -> Option<&'static str> {
    DOCKERDS.into_iter().find(|p| Path::new(p).exists())
}

/// A dockerd of the test's own.
struct Dockerd {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
}

impl Dockerd {
    fn start(dir: &Path) -> Dockerd {
        assert!(
            dockerd_bin().is_some() && Path::new(DOCKER).exists(),
            "DOCKER TEST NOT RUN: {DOCKER} or dockerd missing; apt-get install docker.io"
        );
        fs::create_dir_all(dir).unwrap();
        let mut d = Dockerd {
            child: None,
            dir: dir.to_path_buf(),
            sock: dir.join("docker.sock"),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let child = Command::new(dockerd_bin().expect("dockerd"))
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        self.child = Some(child);
        let up = util::poll_until(Duration::from_secs(60), || {
            util::run(
                Command::new(DOCKER)
                    .arg("-H")
                    .arg(self.host())
                    .arg("version"),
            )
            .ok()
                || !self.alive()
        });
        assert!(up && self.alive(), "dockerd did not start:\n{}", self.log());
    }

    fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H").arg(self.host()).args(args);
        c
    }

    fn docker(&self, args: &[&str]) -> Run {
        util::run_timeout(&mut self.cmd(args), LONG)
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.docker(args);
        if !r.ok() {
            panic!(
                "docker {args:?} failed: {}\n{}\n--- dockerd log tail ---\n{}",
                r.stdout_str(),
                r.stderr_str(),
                tail(&self.log(), 30)
            );
        }
        r.stdout_str()
    }

    /// The containerd that dockerd started (it outlives a kill -9 of dockerd).
    fn containerd_pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir.join("exec/containerd/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// After a kill -9 of dockerd, its containerd dies too (dockerd starts it with a
    /// parent-death signal). Wait until it is gone or only a zombie, and drop its pid
    /// file: the next dockerd would take a zombie's pid for a live containerd.
    fn forget_dead_containerd(&self) {
        let Some(pid) = self.containerd_pid() else {
            return;
        };
        let dead = || !util::process_alive(pid as u32);
        assert!(
            util::poll_until(Duration::from_secs(30), dead),
            "containerd {pid} outlived a kill -9 of dockerd"
        );
        let _ = fs::remove_file(self.dir.join("exec/containerd/containerd.pid"));
    }

    fn signal(&mut self, sig: i32) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            let gone = util::poll_until(Duration::from_secs(60), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            assert!(gone, "dockerd survived signal {sig}");
        }
        self.child = None;
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGTERM);
        }
        // Its containerd, by the pid it recorded.
        if let Some(pid) = self.containerd_pid() {
            if util::process_alive(pid as u32) {
                // SAFETY: kill(2) by pid.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                if !util::poll_until(Duration::from_secs(20), || !util::process_alive(pid as u32)) {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for mp in util::mounts_under(&self.dir).into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&mp).status();
        }
    }
}

/// `snapfs volume ARGS` against the service.
fn volume(svc: &Service, args: &[&str]) -> Run {
    util::run_timeout(
        Command::new(util::bin())
            .arg("volume")
            .arg("--service")
            .arg(&svc.socket)
            .args(args),
        LONG,
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// `hash  /data/rel` lines of every file under `dir`, sorted, as busybox prints them.
fn expected_sums(dir: &Path) -> String {
    let mut lines = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                let rel = p.strip_prefix(dir).unwrap();
                lines.push(format!(
                    "{}  /data/{}",
                    util::sha256_file(&p).unwrap(),
                    rel.display()
                ));
            }
        }
    }
    lines.sort_by(|a, b| a[66..].cmp(&b[66..]));
    lines.join("\n") + "\n"
}

const SUMS: &str = "find /data -type f | sort | xargs sha256sum";

fn plugin_socket(name: &str) -> PathBuf {
    Path::new(PLUGIN_DIR).join(format!("{name}.sock"))
}

fn start_service(td: &TestDir, name: &str) -> Service {
    Service::start(
        td.path(),
        &td.join("root"),
        &td.join("ctl.sock"),
        &["--docker-plugin", name],
    )
}

/// `docker run --rm --network none ARGS`.
fn run(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["run", "--rm", "--network", "none"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    v.extend(args.iter().map(|x| x.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A container on `vol` at /data running `script`; its output.
fn sh(d: &Dockerd, image: &str, vol: &str, script: &str) -> String {
    let mount = format!("{vol}:/data");
    d.ok(&strs(&run(&["-v", &mount, image, "/bin/sh", "-c", script])))
}

/// `docker volume create -d DRIVER -o OPT... VOL`.
fn create(d: &Dockerd, driver: &str, vol: &str, opts: &[&str]) -> Run {
    let mut args = vec!["volume", "create", "-d", driver];
    for o in opts {
        args.push("-o");
        args.push(o);
    }
    args.push(vol);
    d.docker(&args)
}

#[test]
fn docker_volumes_from_snapshots_end_to_end() {
    let td = TestDir::new("volumes");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let name = format!("snapfs-it-{}", std::process::id());
    let driver = name.as_str();

    // Snapshots: s1 (files, a subdir, 1 MiB of random bytes), s2 (other content).
    let src1 = td.mkdir("src1");
    fs::create_dir_all(src1.join("sub/deep")).unwrap();
    fs::write(src1.join("a.txt"), "first snapshot\n").unwrap();
    fs::write(src1.join("sub/deep/r.bin"), util::random_bytes(1 << 20, 7)).unwrap();
    fs::write(src1.join("sub/gone.txt"), "deleted later\n").unwrap();
    let src2 = td.mkdir("src2");
    fs::write(src2.join("b.txt"), "second snapshot\n").unwrap();
    let s1 = td.join("s1.tar.gz");
    let s2 = td.join("s2.tar.zst");
    util::snapfs(["create", s(&src1), "-o", s(&s1)]).assert_ok();
    util::snapfs(["create", s(&src2), "-o", s(&s2)]).assert_ok();

    let mut svc = start_service(&td, driver);
    assert!(plugin_socket(driver).exists());
    let mut dockerd = Dockerd::start(&td.join("docker"));
    let rootfs = crate::containers::rootfs_dir(&td.join("rootfs"));
    let bb_tar = td.join("busybox.tar");
    util::run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&bb_tar)
            .arg("."),
    );
    let image = format!("snapfs-it-busybox:{}", std::process::id());
    dockerd.ok(&["import", s(&bb_tar), &image]);
    let sh = |d: &Dockerd, vol: &str, script: &str| self::sh(d, &image, vol, script);
    let create = |d: &Dockerd, vol: &str, opts: &[&str]| self::create(d, driver, vol, opts);

    // Bad options: one clear error each, nothing created.
    let missing = format!("snapshot={}", td.join("nope.tar.gz").display());
    let snap1 = format!("snapshot={}", s1.display());
    for (opts, why) in [
        (vec![], "needs -o snapshot=PATH"),
        (vec![missing.as_str()], "cannot open snapshot"),
        (vec!["snapshot=relative.tar"], "must be an absolute path"),
        (vec![snap1.as_str(), "uid_map=0:1000"], "uid"),
        (vec![snap1.as_str(), "writable=perhaps"], "bad writable"),
        (
            vec![snap1.as_str(), "size=1G"],
            "unknown volume option \"size\"",
        ),
    ] {
        let r = create(&dockerd, "bad", &opts);
        r.assert_fail();
        let e = r.stderr_str();
        assert!(e.contains(why), "{opts:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    assert!(!dockerd.ok(&["volume", "ls", "-q"]).contains("bad"));

    // A read-only volume shows the snapshot's exact bytes, and refuses writes.
    create(&dockerd, "ro1", &[&snap1]).assert_ok();
    assert_eq!(sh(&dockerd, "ro1", SUMS), expected_sums(&src1));
    let w = dockerd.docker(&strs(&run(&[
        "-v",
        "ro1:/data",
        &image,
        "/bin/sh",
        "-c",
        "echo x > /data/x",
    ])));
    w.assert_fail();
    assert!(w.stderr_str().contains("Read-only"), "{}", w.stderr_str());

    // An image as a volume: `docker save` of the busybox image, its tree at /data.
    let saved = td.join("busybox-save.tar");
    dockerd.ok(&["save", "-o", s(&saved), &image]);
    create(
        &dockerd,
        "img1",
        &[&format!("snapshot={}", saved.display())],
    )
    .assert_ok();
    assert_eq!(
        sh(
            &dockerd,
            "img1",
            "sha256sum /data/bin/busybox | cut -c1-64; cat /data/etc/motd"
        ),
        format!(
            "{}\nsnapfs rootfs marker\n",
            util::sha256_file(&rootfs.join("bin/busybox")).unwrap()
        )
    );

    // Name clash, through the service's socket (Docker answers a same-driver
    // create of an existing name itself).
    let r =
        svc.request(&json!({"op": "volume_create", "name": "ro1", "opts": {"snapshot": s(&s1)}}));
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("exists already"),
        "{r}"
    );

    // A writable volume keeps a container's writes across restarts of it.
    create(&dockerd, "w1", &[&snap1, "writable=true"]).assert_ok();
    let script = "echo run >> /data/log.txt; echo changed > /data/a.txt; rm -f /data/sub/gone.txt; cat /data/log.txt";
    let out = dockerd.ok(&[
        "run",
        "--name",
        "keeper",
        "--network",
        "none",
        "-v",
        "w1:/data",
        &image,
        "/bin/sh",
        "-c",
        script,
    ]);
    assert_eq!(out, "run\n");
    assert_eq!(dockerd.ok(&["start", "-a", "keeper"]), "run\nrun\n");
    dockerd.ok(&["rm", "keeper"]);
    assert_eq!(
        sh(
            &dockerd,
            "w1",
            "cat /data/a.txt /data/log.txt; ls /data/sub"
        ),
        "changed\nrun\nrun\ndeep\n"
    );

    // Its snapshot (a delta on s1, and a full one) is a new volume with the writes.
    let d1 = td.join("d1.tar.gz");
    let f1 = td.join("f1.tar.zst");
    volume(&svc, &["snapshot", "w1", "-o", s(&d1)]).assert_ok();
    volume(&svc, &["snapshot", "w1", "--full", "-o", s(&f1)]).assert_ok();
    let stack = format!("snapshot={}:{}", s1.display(), d1.display());
    create(&dockerd, "w1copy", &[&stack]).assert_ok();
    create(&dockerd, "w1full", &[&format!("snapshot={}", f1.display())]).assert_ok();
    let want = "changed\nrun\nrun\ndeep\n";
    assert_eq!(
        sh(
            &dockerd,
            "w1copy",
            "cat /data/a.txt /data/log.txt; ls /data/sub"
        ),
        want
    );
    assert_eq!(
        sh(
            &dockerd,
            "w1full",
            "cat /data/a.txt /data/log.txt; ls /data/sub"
        ),
        want
    );
    assert_eq!(
        sh(&dockerd, "w1full", "sha256sum /data/sub/deep/r.bin"),
        format!(
            "{}  /data/sub/deep/r.bin\n",
            util::sha256_file(&src1.join("sub/deep/r.bin")).unwrap()
        )
    );

    // A volume in use: one view however many containers; concurrent containers
    // write and read; rm refused; snapshot refused unless --pause.
    dockerd.ok(&[
        "run",
        "-d",
        "--name",
        "busy",
        "--network",
        "none",
        "-v",
        "w1:/data",
        &image,
        "/bin/sh",
        "-c",
        "echo live > /data/live.txt; sleep 600",
    ]);
    assert!(
        util::poll_until(Duration::from_secs(30), || dockerd
            .docker(&["exec", "busy", "test", "-f", "/data/live.txt"])
            .ok()),
        "busy never wrote"
    );
    let vol_mp = svc.root.canonicalize().unwrap().join("volumes/w1/data");
    let children: Vec<Child> = (0..4)
        .map(|i| {
            let script = format!(
                "echo c{i} > /data/c{i}.txt; sha256sum /data/sub/deep/r.bin | cut -c1-64; cat /data/live.txt"
            );
            let args = run(&["-v", "w1:/data", &image, "/bin/sh", "-c", &script]);
            dockerd
                .cmd(&strs(&args))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let r_sum = util::sha256_file(&src1.join("sub/deep/r.bin")).unwrap();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("{r_sum}\nlive\n")
        );
    }
    let views_there = util::mountinfo()
        .iter()
        .filter(|m| m.mount_point == vol_mp)
        .count();
    assert_eq!(views_there, 1, "the view of w1 is mounted once");
    let rm = dockerd.docker(&["volume", "rm", "w1"]);
    rm.assert_fail();
    assert!(rm.stderr_str().contains("in use"), "{}", rm.stderr_str());
    let r = svc.request(&json!({"op": "volume_remove", "name": "w1"}));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("container(s) using volume"),
        "{r}"
    );
    let d2 = td.join("d2.tar");
    let r = volume(&svc, &["snapshot", "w1", "-o", s(&d2)]);
    r.assert_fail();
    assert!(r.stderr_str().contains("--pause"), "{}", r.stderr_str());
    let host = dockerd.host();
    volume(
        &svc,
        &[
            "snapshot",
            "w1",
            "--pause",
            "--docker-host",
            &host,
            "-o",
            s(&d2),
        ],
    )
    .assert_ok();
    assert_eq!(
        dockerd.ok(&["inspect", "-f", "{{.State.Status}}", "busy"]),
        "running\n"
    );
    let listed = util::run_ok(Command::new("tar").arg("-tf").arg(&d2)).stdout_str();
    for f in [
        "live.txt",
        "c0.txt",
        "c3.txt",
        "log.txt",
        "a.txt",
        "sub/.wh.gone.txt",
    ] {
        assert!(
            listed.lines().any(|l| l.trim_start_matches("./") == f),
            "{f} not in {listed}"
        );
    }
    let inspect: serde_json::Value =
        serde_json::from_str(&volume(&svc, &["inspect", "w1"]).assert_ok().stdout_str()).unwrap();
    assert_eq!(
        inspect["mounts"].as_array().map(Vec::len),
        Some(1),
        "{inspect}"
    );
    assert_eq!(inspect["mounted"], true);
    dockerd.ok(&["rm", "-f", "busy"]);

    // Restore goes back to s1; the pre-restore state is kept and mountable.
    let r = volume(&svc, &["restore", "w1", s(&s1)]);
    r.assert_ok();
    let kept = r.stdout_str().trim().to_string();
    assert!(kept.starts_with(s(&s1.canonicalize().unwrap())), "{kept}");
    assert_eq!(sh(&dockerd, "w1", SUMS), expected_sums(&src1));
    create(&dockerd, "before", &[&format!("snapshot={kept}")]).assert_ok();
    assert_eq!(
        sh(
            &dockerd,
            "before",
            "cat /data/a.txt /data/live.txt /data/c2.txt"
        ),
        "changed\nlive\nc2\n"
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&volume(&svc, &["inspect", "w1"]).assert_ok().stdout_str()).unwrap();
    assert_eq!(inspect["pre_restore"][0]["snapshot"], kept.as_str());
    let ls = volume(&svc, &["ls"]).assert_ok().stdout_str();
    assert!(ls.lines().any(|l| l.starts_with("w1\t0\tno\t")), "{ls}");
    // Another snapshot, for the next start.
    volume(&svc, &["restore", "w1", s(&s2)]).assert_ok();
    sh(&dockerd, "w1", "echo after > /data/after.txt");
    assert_eq!(
        sh(&dockerd, "w1", "cat /data/b.txt /data/after.txt"),
        "second snapshot\nafter\n"
    );

    // kill -9 of the service and of dockerd: both come back, the volumes are
    // listed again, and the next docker run -v works.
    svc.kill9();
    dockerd.signal(libc::SIGKILL);
    svc = start_service(&td, driver);
    dockerd.forget_dead_containerd();
    dockerd.spawn();
    let ls = dockerd.ok(&["volume", "ls", "-q"]);
    for v in ["ro1", "img1", "w1", "w1copy", "w1full", "before"] {
        assert!(ls.lines().any(|l| l == v), "{v} not in {ls}");
    }
    assert_eq!(
        sh(&dockerd, "w1", "cat /data/b.txt /data/after.txt"),
        "second snapshot\nafter\n"
    );
    assert_eq!(sh(&dockerd, "ro1", SUMS), expected_sums(&src1));

    // Teardown: volumes removed through the driver, daemons stopped by pid.
    for v in ["ro1", "img1", "w1", "w1copy", "w1full", "before"] {
        dockerd.ok(&["volume", "rm", v]);
    }
    assert!(
        volume(&svc, &["ls"])
            .assert_ok()
            .stdout_str()
            .lines()
            .count()
            == 1
    );
    dockerd.ok(&["rmi", &image]);
    svc.stop();
    assert!(!plugin_socket(driver).exists(), "plugin socket left behind");
    let containerd = dockerd.containerd_pid();
    drop(dockerd);
    if let Some(pid) = containerd {
        assert!(
            !util::process_alive(pid as u32),
            "containerd {pid} left running"
        );
    }
    assert!(
        util::mounts_under(td.path()).is_empty(),
        "{:?}",
        util::mounts_under(td.path())
    );
}

#[test]
fn a_plugin_name_is_checked_and_its_socket_goes_with_the_service() {
    let td = TestDir::new("volumes-plugin");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let r = util::snapfs([
        "serve",
        "--root",
        s(&td.join("root")),
        "--docker-plugin",
        "../evil",
    ]);
    util::assert_one_line_error(&r, "bad Docker plugin name");
    let dir = td.mkdir("plugins");
    let svc = Service::start(
        td.path(),
        &td.join("root"),
        &td.join("ctl.sock"),
        &["--docker-plugin", "p1", "--docker-plugin-dir", s(&dir)],
    );
    let sock = dir.join("p1.sock");
    assert!(sock.exists());
    // The plugin protocol by hand: Activate, Capabilities, a refused Create.
    let call = |path: &str, body: &str| -> serde_json::Value {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        write!(
            c,
            "POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(
            resp.contains("application/vnd.docker.plugins.v1+json"),
            "{resp}"
        );
        serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    assert_eq!(
        call("/Plugin.Activate", ""),
        json!({"Implements": ["VolumeDriver"]})
    );
    assert_eq!(
        call("/VolumeDriver.Capabilities", "{}"),
        json!({"Capabilities": {"Scope": "local"}})
    );
    let r = call("/VolumeDriver.Create", r#"{"Name":"v","Opts":{}}"#);
    assert!(r["Err"].as_str().unwrap().contains("snapshot=PATH"), "{r}");
    assert_eq!(
        call("/VolumeDriver.List", "{}"),
        json!({"Volumes": [], "Err": ""})
    );
    let r = call("/VolumeDriver.Get", r#"{"Name":"v"}"#);
    assert!(
        r["Err"].as_str().unwrap().contains("no snapfs volume"),
        "{r}"
    );
    let r = call("/VolumeDriver.Mount", r#"{"Name":"v"#);
    assert!(
        r["Err"].as_str().unwrap().contains("bad plugin request"),
        "{r}"
    );
    svc.stop();
    assert!(!sock.exists());
}
