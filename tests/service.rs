//! The snapfs service (`snapfs serve`, issue 12): many views in one process, added
//! through `snapfs mount --service` and the socket, each equal to GNU tar's
//! extraction; views of one archive share its decoded spans (the second reads
//! almost nothing from the archive); one cache cap for all views; every view back
//! after kill -9 and a restart; bad socket requests refused while the service stays
//! up. ROOT ONLY (mounts).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::corpus::{self, Comp};
use crate::tree::{self, CmpOpts};
use crate::util::{self, NoMountsLeft, Service, TestDir};

/// A service rooted in the test dir, its socket beside the root.
fn service(td: &TestDir, args: &[&str]) -> Service {
    Service::start(td.path(), &td.join("root"), &td.join("ctl.sock"), args)
}

/// `snapfs mount --service SOCKET ARGS ARCHIVES... MNT`, asserting success.
fn mount_via(svc: &Service, args: &[&str], archives: &[&Path], mnt: &Path) {
    fs::create_dir_all(mnt).unwrap();
    let r = util::run_timeout(
        Command::new(util::bin())
            .arg("mount")
            .arg("--service")
            .arg(&svc.socket)
            .args(args)
            .args(archives)
            .arg(mnt),
        Duration::from_secs(120),
    );
    r.assert_ok();
    // The service answers once the view is mounted.
    assert!(util::is_mounted(&mnt.canonicalize().unwrap()));
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// `snapfs list [-l]` lines as fields (header checked).
fn list(long: bool) -> Vec<Vec<String>> {
    let r = util::snapfs(if long {
        vec!["list", "-l"]
    } else {
        vec!["list"]
    });
    r.assert_ok();
    let out = r.stdout_str();
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("MOUNTPOINT\tPID\tSTATE\t"), "{header}");
    lines
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}

fn listed(long: bool, mnt: &Path) -> Option<Vec<String>> {
    list(long).into_iter().find(|f| f[0] == s(mnt))
}

#[test]
fn service_serves_many_views_that_match_gnu_tar_and_share_spans() {
    let td = TestDir::new("svc-views");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let (tar, gz) = corpus::std_archive(td.path(), "posix", Comp::Gzip);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let small = corpus::small_tar(td.path(), "small.tar", 5);
    let small_zst = corpus::compress(&small, Comp::ZstdMulti);
    let small_exp = td.join("small-x");
    corpus::extract(&small, &small_exp);
    let gz = gz.canonicalize().unwrap();
    let svc = service(&td, &["--cache-size", "256M"]);

    // A read-only view through `snapfs mount --service`, read whole.
    let a = td.mkdir("a").canonicalize().unwrap();
    mount_via(&svc, &[], &[&gz], &a);
    let n = tree::assert_same_tree(&exp, &a, &CmpOpts::default());
    assert!(n > 330, "compared only {n} entries");
    let first = svc.bytes_read(&gz);
    let size = fs::metadata(&gz).unwrap().len();
    assert!(first >= size / 2, "first view read {first} of {size} bytes");

    // A second read-only view of the same archive, through the socket: its decoded
    // spans are the first view's.
    let b = td.mkdir("b").canonicalize().unwrap();
    svc.add(json!({"key": "b", "mountpoint": b, "layers": [gz]}));
    tree::assert_same_tree(&exp, &b, &CmpOpts::default());
    let second = svc.bytes_read(&gz) - first;
    println!(
        "bytes read from {} ({size} bytes): first view {first}, second view {second}",
        gz.display()
    );
    assert!(
        second * 100 <= first,
        "the second view read {second} bytes from the archive (first: {first})"
    );
    let st = svc.status();
    assert!(st["cache"]["hits"].as_u64().unwrap() > 0, "{st}");

    // A writable view of the same archive, and a view of another archive.
    let c = td.mkdir("c").canonicalize().unwrap();
    let upper = td.join("upper-c");
    mount_via(&svc, &["--upper", s(&upper)], &[&gz], &c);
    tree::assert_same_tree(&exp, &c, &CmpOpts::default());
    fs::write(c.join("new.txt"), b"written in c\n").unwrap();
    fs::write(c.join("text.txt"), b"changed\n").unwrap();
    assert_eq!(fs::read(a.join("text.txt")).unwrap(), b"hello snapfs\n");
    let d = td.mkdir("d").canonicalize().unwrap();
    mount_via(&svc, &["-o", "allow_other"], &[&small_zst], &d);
    tree::assert_same_tree(&small_exp, &d, &CmpOpts::default());
    assert!(util::mount_at(&d)
        .unwrap()
        .super_opts
        .contains("allow_other"));
    assert!(util::mount_at(&c).unwrap().mount_opts.starts_with("rw"));
    assert!(util::mount_at(&a).unwrap().mount_opts.starts_with("ro"));

    // `snapfs list` marks the service's views; -l shows upper dirs and bytes read.
    let pid = format!("service:{}", svc.pid());
    for m in [&a, &b, &c, &d] {
        let f = listed(false, m).unwrap_or_else(|| panic!("{} not listed", m.display()));
        assert_eq!((f[1].as_str(), f[2].as_str()), (pid.as_str(), "live"));
    }
    let f = listed(true, &c).expect("c listed");
    assert_eq!(f[3], s(&svc.socket));
    assert_eq!(f[4], s(&upper.canonicalize().unwrap()));
    assert_eq!(f[5], svc.bytes_read(&gz).to_string());
    assert_eq!(f[6], s(&gz));

    // Views go away while the others keep serving: one by `snapfs umount`, one by
    // the socket, one by a plain umount(8) that the service notices.
    util::snapfs(["umount", s(&a)]).assert_ok();
    assert!(!util::is_mounted(&a));
    svc.ok(&json!({"op": "remove", "key": "b"}));
    assert!(!util::is_mounted(&b));
    util::run_ok(Command::new("umount").arg(&d));
    assert!(util::poll_until(Duration::from_secs(20), || {
        svc.ok(&json!({"op": "list"}))["views"]
            .as_array()
            .unwrap()
            .len()
            == 1
    }));
    assert_eq!(fs::read(c.join("new.txt")).unwrap(), b"written in c\n");
    assert_eq!(
        fs::read(c.join("data/big1.bin")).unwrap(),
        fs::read(exp.join("data/big1.bin")).unwrap()
    );
    let views = svc.ok(&json!({"op": "list"}))["views"].clone();
    assert_eq!(views[0]["config"]["mountpoint"], s(&c));
    assert_eq!(views[0]["state"], "live");

    // SIGTERM unmounts every view and removes the socket.
    let socket = svc.socket.clone();
    svc.stop();
    assert!(util::mounts_under(td.path()).is_empty());
    assert!(!socket.exists());
}

/// Twelve files of 4 MiB (semi-compressible) in a tar.gz; returns (archive, source).
fn big_archive(td: &TestDir, name: &str, seed: u64) -> (PathBuf, PathBuf) {
    let src = td.mkdir(format!("src-{name}"));
    for i in 0..12u64 {
        fs::write(
            src.join(format!("f{i:02}")),
            util::semi_compressible(4 << 20, seed + i),
        )
        .unwrap();
    }
    let tar = td.join(format!("{name}.tar"));
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let gz = corpus::compress(&tar, Comp::Gzip);
    (gz.canonicalize().unwrap(), src)
}

#[test]
fn service_cache_cap_holds_for_all_views_together() {
    const MIB: u64 = 1 << 20;
    const CACHE: u64 = 96 * MIB;
    let td = TestDir::new("svc-cap");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let (one, src_one) = big_archive(&td, "one", 100);
    let (two, src_two) = big_archive(&td, "two", 200);
    let svc = service(&td, &["--cache-size", "96M"]);
    let mut views = Vec::new();
    for (i, (arch, src)) in [
        (&one, &src_one),
        (&two, &src_two),
        (&one, &src_one),
        (&two, &src_two),
    ]
    .into_iter()
    .enumerate()
    {
        let mnt = td.mkdir(format!("v{i}")).canonicalize().unwrap();
        svc.add(json!({"mountpoint": mnt, "layers": [arch], "threads": 4}));
        views.push((mnt, src.clone()));
    }
    // Every view read whole (2 x 48 MiB of data, 4 views): more than the cap.
    for (mnt, src) in &views {
        for i in 0..12 {
            let name = format!("f{i:02}");
            assert!(
                fs::read(mnt.join(&name)).unwrap() == fs::read(src.join(&name)).unwrap(),
                "{name} differs in {}",
                mnt.display()
            );
        }
    }
    let st = svc.status();
    let hwm = util::proc_status_kb(svc.pid(), "VmHWM").expect("VmHWM");
    let index_kb: u64 = [&one, &two]
        .iter()
        .map(|a| {
            fs::metadata(a.with_extension("gz.snapfs-idx"))
                .map(|m| m.len() / 1024)
                .unwrap_or(0)
        })
        .sum();
    println!(
        "service VmHWM {hwm} kB after reading 4 views (cache {} kB, index {index_kb} kB): {st}",
        CACHE / 1024
    );
    assert!(st["cache"]["cached_bytes"].as_u64().unwrap() <= st["cache"]["cap"].as_u64().unwrap());
    // The cap counts the process's own overhead (48 MiB of --cache-size); besides it
    // the decoders in flight (views' FUSE threads, prefetchers) each hold a span
    // and its input: 32 MiB allowed.
    let allowance_kb = 32 * 1024;
    assert!(
        hwm <= CACHE / 1024 + index_kb + allowance_kb,
        "service VmHWM {hwm} kB exceeds cache {} kB + index {index_kb} kB + {allowance_kb} kB",
        CACHE / 1024
    );
    svc.stop();
}

#[test]
fn service_restores_every_view_after_kill_9() {
    let td = TestDir::new("svc-kill");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let (tar, gz) = corpus::std_archive(td.path(), "posix", Comp::Pigz);
    let exp = td.join("x");
    corpus::extract(&tar, &exp);
    let gz = gz.canonicalize().unwrap();
    let ro = td.mkdir("ro").canonicalize().unwrap();
    let rw = td.mkdir("rw").canonicalize().unwrap();
    let upper = td.mkdir("upper").canonicalize().unwrap();
    let svc = service(&td, &[]);
    mount_via(&svc, &[], &[&gz], &ro);
    svc.add(json!({"key": "writable", "mountpoint": rw, "layers": [gz], "upper": upper}));
    let mut f = fs::File::create(rw.join("written.txt")).unwrap();
    f.write_all(b"before the crash\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::remove_file(rw.join("one")).unwrap();
    fs::create_dir(rw.join("newdir")).unwrap();
    let state = fs::read_to_string(td.join("root/state.json")).unwrap();
    assert!(
        state.contains("\"writable\"") && state.contains(s(&upper)),
        "{state}"
    );

    svc.kill9();
    // The views are stale now.
    assert!(util::poll_until(Duration::from_secs(10), || {
        matches!(fs::read_dir(&ro), Err(e) if util::errno(&e) == util::ENOTCONN)
    }));
    assert!(util::is_mounted(&ro) && util::is_mounted(&rw));

    let svc = service(&td, &[]);
    // Back at the same paths, each mounted once (the stale mount is gone), the
    // writable one with its upper dir and what was written.
    for m in [&ro, &rw] {
        let n = util::mountinfo()
            .iter()
            .filter(|i| i.mount_point == *m)
            .count();
        assert_eq!(n, 1, "{} mounted {n} times", m.display());
    }
    tree::assert_same_tree(&exp, &ro, &CmpOpts::default());
    assert_eq!(
        fs::read(rw.join("written.txt")).unwrap(),
        b"before the crash\n"
    );
    assert!(!rw.join("one").exists());
    assert!(rw.join("newdir").is_dir());
    assert_eq!(fs::read(rw.join("text.txt")).unwrap(), b"hello snapfs\n");
    let views = svc.ok(&json!({"op": "list"}))["views"].clone();
    assert_eq!(views.as_array().unwrap().len(), 2, "{views}");
    assert!(
        views
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "live"),
        "{views}"
    );
    assert!(
        svc.log_text().contains("detached the stale mount"),
        "{}",
        svc.log_text()
    );

    // A clean stop keeps the views recorded: the next start mounts them again.
    svc.stop();
    assert!(util::mounts_under(td.path()).is_empty());
    let svc = service(&td, &[]);
    assert!(util::is_mounted(&ro) && util::is_mounted(&rw));
    assert_eq!(
        fs::read(rw.join("written.txt")).unwrap(),
        b"before the crash\n"
    );
    svc.ok(&json!({"op": "remove", "mountpoint": ro}));
    svc.ok(&json!({"op": "remove", "key": "writable"}));
    assert!(util::mounts_under(td.path()).is_empty());
    svc.stop();
    let state = fs::read_to_string(td.join("root/state.json")).unwrap();
    assert!(!state.contains("writable"), "{state}");
}

#[test]
fn service_socket_api_refuses_bad_requests_and_stays_up() {
    let td = TestDir::new("svc-api");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let tar = corpus::small_tar(td.path(), "a.tar", 3)
        .canonicalize()
        .unwrap();
    let mnt = td.mkdir("m").canonicalize().unwrap();
    let file = td.join("plain-file");
    fs::write(&file, b"not a dir").unwrap();
    let svc = service(&td, &[]);
    let add = |view: serde_json::Value| json!({"op": "add", "view": view});
    let refused = |line: &str, needle: &str| {
        let r = svc
            .try_request(line)
            .unwrap_or_else(|e| panic!("no answer to {line}: {e}"));
        assert_eq!(r["ok"], false, "{line} was accepted: {r}");
        let e = r["error"].as_str().unwrap_or_default().to_string();
        assert!(
            e.contains(needle) && !e.contains('\n'),
            "error for {line} is {e:?}, not about {needle:?}"
        );
        // Still up and answering.
        assert_eq!(svc.request(&json!({"op": "status"}))["ok"], true);
    };
    refused("{", "bad request");
    refused("not json at all", "bad request");
    refused(r#"{"op":"mount"}"#, "unknown variant");
    refused(r#"{"op":"list","extra":1}"#, "unknown field");
    refused(
        &add(json!({"mountpoint": mnt, "layers": [tar], "uppr": "/tmp"})).to_string(),
        "unknown field `uppr`",
    );
    refused(
        &add(json!({"mountpoint": mnt, "layers": ["/nonexistent/x.tar.gz"]})).to_string(),
        "/nonexistent/x.tar.gz",
    );
    refused(
        &add(json!({"mountpoint": mnt, "layers": [td.path()]})).to_string(),
        "is not a regular file",
    );
    refused(
        &add(json!({"mountpoint": mnt, "layers": []})).to_string(),
        "at least one archive",
    );
    refused(
        &add(json!({"mountpoint": file, "layers": [tar]})).to_string(),
        "is not a directory",
    );
    refused(
        &add(json!({"mountpoint": "relative/m", "layers": [tar]})).to_string(),
        "absolute",
    );
    refused(
        &add(json!({"mountpoint": mnt, "layers": [tar], "uid_map": ["nonsense"]})).to_string(),
        "uid",
    );
    refused(r#"{"op":"remove","key":"nope"}"#, "no view with key");
    refused(r#"{"op":"remove"}"#, "a key or a mountpoint");
    // One service per root.
    let r = util::run_timeout(
        Command::new(util::bin())
            .args(["serve", "--root"])
            .arg(&svc.root)
            .arg("--socket")
            .arg(td.join("other.sock")),
        Duration::from_secs(60),
    );
    util::assert_one_line_error(&r, "in use by another snapfs service");
    assert!(
        util::mounts_under(td.path()).is_empty(),
        "a refused add left a mount"
    );

    // A good add, then the duplicates.
    let r = svc.add(json!({"key": "one", "mountpoint": mnt, "layers": [tar]}));
    assert_eq!(r["view"]["state"], "live");
    assert_eq!(fs::read(mnt.join("readme")).unwrap(), b"seed 3\n");
    let other = td.mkdir("m2").canonicalize().unwrap();
    refused(
        &add(json!({"key": "two", "mountpoint": mnt, "layers": [tar]})).to_string(),
        "in use by snapfs service view \"one\"",
    );
    refused(
        &add(json!({"key": "one", "mountpoint": other, "layers": [tar]})).to_string(),
        "key \"one\" already",
    );
    // `snapfs mount --service` relays the service's one-line error.
    let r = util::run_timeout(
        Command::new(util::bin())
            .arg("mount")
            .arg("--service")
            .arg(&svc.socket)
            .arg(&tar)
            .arg(&mnt),
        Duration::from_secs(60),
    );
    util::assert_one_line_error(&r, "in use by snapfs service view");
    let r = util::run_timeout(
        Command::new(util::bin())
            .env("SNAPFS_SERVICE", &svc.socket)
            .args(["mount", "--cache-size", "64M"])
            .arg(&tar)
            .arg(&other),
        Duration::from_secs(60),
    );
    util::assert_one_line_error(&r, "--cache-size");

    // Several requests on one connection; list, then remove.
    {
        use std::io::{BufRead, BufReader};
        let mut c = std::os::unix::net::UnixStream::connect(&svc.socket).unwrap();
        c.write_all(b"{\"op\":\"list\"}\n\n{bad\n{\"op\":\"status\"}\n")
            .unwrap();
        let mut lines = BufReader::new(&c).lines();
        let l1: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(l1["views"][0]["config"]["key"], "one");
        assert_eq!(l1["views"][0]["sources"][0]["path"], s(&tar));
        let l2: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(l2["ok"], false);
        let l3: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(l3["status"]["pid"], svc.pid());
    }
    // A view with a file open is busy: refused, and it keeps serving.
    let open = fs::File::open(mnt.join("readme")).unwrap();
    refused(r#"{"op":"remove","key":"one"}"#, "is busy");
    assert_eq!(fs::read(mnt.join("readme")).unwrap(), b"seed 3\n");
    drop(open);
    svc.ok(&json!({"op": "remove", "mountpoint": mnt}));
    assert!(!util::is_mounted(&mnt));
    assert_eq!(svc.ok(&json!({"op": "list"}))["views"], json!([]));
    svc.stop();
}

#[test]
fn service_serves_fifty_views_of_one_archive() {
    const N: usize = 50;
    let td = TestDir::new("svc-fifty");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let tar = corpus::small_tar(td.path(), "a.tar", 8);
    let gz = corpus::compress(&tar, Comp::Gzip).canonicalize().unwrap();
    let want = fs::read(td.join("src-a.tar/d1/f001.dat")).unwrap();
    let pid_file = td.join("serve.pid");
    let svc = service(
        &td,
        &[
            "--cache-size",
            "64M",
            "--threads",
            "2",
            "--pid-file",
            s(&pid_file),
        ],
    );
    assert_eq!(
        fs::read_to_string(&pid_file).unwrap().trim(),
        svc.pid().to_string()
    );
    let rss0 = util::proc_status_kb(svc.pid(), "VmRSS").unwrap_or(0);
    let mut mnts = Vec::new();
    for i in 0..N {
        let m = td.mkdir(format!("v{i:02}")).canonicalize().unwrap();
        let upper = (i % 2 == 1).then(|| td.join(format!("u{i:02}")));
        svc.add(json!({"mountpoint": m, "layers": [gz], "upper": upper}));
        mnts.push(m);
    }
    for (i, m) in mnts.iter().enumerate() {
        assert!(fs::read(m.join("d1/f001.dat")).unwrap() == want, "view {i}");
        if i % 2 == 1 {
            fs::write(m.join("mine"), format!("{i}")).unwrap();
        }
    }
    for (i, m) in mnts.iter().enumerate().filter(|(i, _)| i % 2 == 1) {
        assert_eq!(fs::read_to_string(m.join("mine")).unwrap(), i.to_string());
    }
    let st = svc.status();
    assert_eq!(
        st["sources"].as_array().unwrap().len(),
        1,
        "{}",
        st["sources"]
    );
    assert_eq!(st["sources"][0]["users"], N);
    let rss = util::proc_status_kb(svc.pid(), "VmRSS").unwrap_or(0);
    println!("service RSS: {rss0} kB idle, {rss} kB with {N} views (see scripts/service-rss.sh)");
    svc.stop();
    assert!(util::mounts_under(td.path()).is_empty());
    assert!(!pid_file.exists(), "pid file left after a clean exit");
}

#[test]
fn service_keeps_a_view_it_cannot_restore_as_failed_until_removed() {
    let td = TestDir::new("svc-failed");
    let _left = NoMountsLeft(td.path().to_path_buf());
    let tar = corpus::small_tar(td.path(), "a.tar", 4)
        .canonicalize()
        .unwrap();
    let mnt = td.mkdir("m").canonicalize().unwrap();
    let svc = service(&td, &[]);
    mount_via(&svc, &[], &[&tar], &mnt);
    svc.stop();
    assert!(!util::is_mounted(&mnt));
    fs::rename(&tar, td.join("moved.tar")).unwrap();
    let svc = service(&td, &[]);
    let views = svc.ok(&json!({"op": "list"}))["views"].clone();
    assert_eq!(views[0]["state"], "failed", "{views}");
    let why = views[0]["error"].as_str().unwrap_or_default();
    assert!(why.contains(s(&tar)), "{why}");
    assert!(!util::is_mounted(&mnt));
    let f = listed(false, &mnt).expect("failed view listed");
    assert_eq!(f[2], "failed");
    // `snapfs umount` finds the service that has the view and removes it there.
    util::snapfs(["umount", s(&mnt)]).assert_ok();
    assert_eq!(svc.ok(&json!({"op": "list"}))["views"], json!([]));
    assert!(listed(false, &mnt).is_none());
    svc.stop();
}
