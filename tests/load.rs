//! Load (issue 6), both slow (about 70 s and 30 s): fio randread with 8 jobs plus two
//! find+stat loops on a tar.gz mount for 60 s, and concurrent writers and readers in a
//! writable view. The figures (IOPS, loops, the daemon's peak RSS) are printed; run
//! with `-- --nocapture` to see them.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::corpus;
use crate::util::{self, Mount, TestDir};

const MIB: u64 = 1 << 20;
/// `--cache-size` of the load mounts.
const CACHE: u64 = 64 * MIB;

/// 24 files of 4 MiB (`big/b00`..) and 1,000 small ones in 20 directories, as a
/// tar.gz (pigz); returns (archive, source dir).
fn load_corpus(td: &TestDir) -> (PathBuf, PathBuf) {
    let src = td.mkdir("src");
    fs::create_dir_all(src.join("big")).unwrap();
    for i in 0..24u64 {
        fs::write(
            src.join(format!("big/b{i:02}")),
            util::semi_compressible(4 * MIB as usize, 100 + i),
        )
        .unwrap();
    }
    for i in 0..1000u64 {
        let d = src.join(format!("small/d{:02}", i % 20));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("s{i:04}")), util::semi_compressible(2000, i)).unwrap();
    }
    let tar = td.join("load.tar");
    corpus::gnu_tar(&src, &tar, "posix", &[]);
    let gz = td.join("load.tar.gz");
    util::sh(
        td.path(),
        &format!(
            "pigz -p 2 -c {} > {} && rm {}",
            corpus::shq(&tar),
            corpus::shq(&gz),
            corpus::shq(&tar)
        ),
    );
    (gz, src)
}

/// Seconds fio runs: 60, or `SNAPFS_LOAD_SECS` (to iterate quickly by hand).
fn load_secs() -> u64 {
    std::env::var("SNAPFS_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// One find+stat pass over the tree: entries seen (panics on any error).
fn find_stat(root: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("readdir {}: {e}", d.display())) {
            let p = e.expect("dirent").path();
            let md =
                fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
            if md.is_dir() {
                stack.push(p);
            }
            n += 1;
        }
    }
    n
}

#[test]
fn slow_load_fio_randread_8_jobs_and_find_loops_on_tar_gz() {
    let td = TestDir::new("load-fio");
    let (gz, src) = load_corpus(&td);
    let m = Mount::with_args(&gz, &td.join("mnt"), &["--cache-size", "64M"]);
    let pid = util::daemon_pid(m.path(), &gz);
    let rss_start = util::proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let expected_entries = find_stat(m.path());

    let stop = Arc::new(AtomicBool::new(false));
    let finders: Vec<_> = (0..2)
        .map(|_| {
            let (root, stop) = (m.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut loops = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(
                        find_stat(&root),
                        expected_entries,
                        "a find loop saw other entries"
                    );
                    loops += 1;
                }
                loops
            })
        })
        .collect();
    let files: Vec<String> = (0..24).map(|i| format!("big/b{i:02}")).collect();
    let start = Instant::now();
    let r = util::run_timeout(
        Command::new("fio")
            .current_dir(m.path())
            .args([
                "--name=randread",
                "--readonly",
                "--rw=randread",
                "--bs=4k",
                "--numjobs=8",
                "--time_based",
                "--ioengine=psync",
                "--direct=1",
                "--group_reporting",
                "--output-format=json",
            ])
            .arg(format!("--runtime={}", load_secs()))
            .arg(format!("--filename={}", files.join(":"))),
        Duration::from_secs(180),
    );
    let fio_secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let loops: Vec<u64> = finders
        .into_iter()
        .map(|t| t.join().expect("find loop"))
        .collect();
    r.assert_ok();
    let summary = util::python(
        r#"
import json, sys
j = json.loads(sys.argv[1])
jobs = j["jobs"]
print(sum(x["error"] for x in jobs), sum(x["read"]["iops"] for x in jobs),
      sum(x["read"]["io_bytes"] for x in jobs), sum(x["read"].get("short_ios", 0) for x in jobs))
"#,
        [r.stdout_str()],
    )
    .stdout_str();
    let f: Vec<f64> = summary
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (errors, iops, bytes) = (f[0], f[1], f[2]);
    let hwm = util::proc_status_kb(pid, "VmHWM").expect("daemon VmHWM");
    let rss_end = util::proc_status_kb(pid, "VmRSS").unwrap_or(0);
    let index_kb = fs::metadata(gz.with_extension("gz.snapfs-idx"))
        .map(|m| m.len() / 1024)
        .unwrap_or(0);
    println!(
        "load: fio randread 4k x8 for {fio_secs:.1} s: {iops:.0} IOPS, {} MiB read, {errors} errors; \
         find+stat loops: {loops:?} ({expected_entries} entries each); daemon RSS {rss_start} kB at \
         start, {rss_end} kB at end, VmHWM {hwm} kB (cache cap {} kB, index file {index_kb} kB)",
        bytes as u64 >> 20,
        CACHE / 1024
    );
    assert_eq!(errors, 0.0, "fio reported errors:\n{}", r.stdout_str());
    assert!(bytes > 0.0, "fio read nothing");
    assert!(
        loops.iter().all(|&l| l >= 1),
        "a find loop never completed: {loops:?}"
    );
    assert!(util::process_alive(pid), "the daemon died under load");
    // Still exact after the load.
    for i in [0, 7, 23] {
        let p = format!("big/b{i:02}");
        assert!(
            fs::read(m.join(&p)).unwrap() == fs::read(src.join(&p)).unwrap(),
            "{p} differs"
        );
    }
    // The daemon's peak RSS: the span cache cap plus the loaded index, plus what the
    // cap does not count: each decoding thread (8 FUSE workers, 2 prefetchers) holds
    // one span (4 MiB) and its compressed input (less than that here), and 16 MiB of
    // FUSE request buffers and the rest. Without a fixed malloc mmap threshold the
    // daemon peaked at 366 MB here (freed span buffers kept in malloc arenas).
    let allowance_kb = (10 * 8 + 16) * 1024;
    assert!(
        hwm <= CACHE / 1024 + index_kb + allowance_kb,
        "daemon VmHWM {hwm} kB exceeds cache cap {} kB + index {index_kb} kB + {allowance_kb} kB",
        CACHE / 1024
    );
}

#[test]
fn slow_load_writers_and_readers_in_a_writable_view() {
    let td = TestDir::new("load-upper");
    let (gz, src) = load_corpus(&td);
    let upper = td.join("upper");
    let up = upper.to_str().unwrap().to_string();
    let mnt = td.join("mnt");
    let m = Mount::with_args(&gz, &mnt, &["--upper", &up, "--cache-size", "64M"]);
    let root = m.path().to_path_buf();
    let pid = util::daemon_pid(&root, &gz);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (root, stop) = (root.clone(), stop.clone());
        writers.push(std::thread::spawn(move || {
            // New files, rewritten in place, and a patch of a lower file (copy-up).
            let mut rounds = 0u64;
            let lower = root.join(format!("big/b{:02}", w * 5));
            while !stop.load(Ordering::Relaxed) || rounds == 0 {
                let p = root.join(format!("w{w}-{}", rounds % 8));
                let data = util::random_bytes(256 << 10, w * 1000 + rounds);
                let mut f = File::create(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                f.write_all(&data).unwrap();
                drop(f);
                let g = OpenOptions::new().write(true).open(&lower).unwrap();
                g.write_all_at(&rounds.to_le_bytes(), 4096 * (rounds % 64))
                    .unwrap();
                rounds += 1;
            }
            rounds
        }));
    }
    let mut readers = Vec::new();
    for r in 0..4u64 {
        let (root, stop, src) = (root.clone(), stop.clone(), src.clone());
        readers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n == 0 {
                // Files no writer touches read back exactly.
                let i = (n * 5 + r) % 24;
                if i % 5 == 0 {
                    n += 1;
                    continue;
                }
                let p = format!("big/b{i:02}");
                let mut got = Vec::new();
                File::open(root.join(&p))
                    .unwrap()
                    .read_to_end(&mut got)
                    .unwrap();
                assert!(
                    got == fs::read(src.join(&p)).unwrap(),
                    "{p} differs under load"
                );
                let s = format!("small/d{:02}/s{:04}", n % 20, (n * 20 + n % 20) % 1000);
                if let Ok(b) = fs::read(root.join(&s)) {
                    assert_eq!(b, fs::read(src.join(&s)).unwrap(), "{s}");
                }
                n += 1;
            }
            n
        }));
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let rounds: Vec<u64> = writers
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let reads: Vec<u64> = readers
        .into_iter()
        .map(|t| t.join().expect("reader"))
        .collect();
    let hwm = util::proc_status_kb(pid, "VmHWM").unwrap_or(0);
    println!(
        "load with --upper for 20 s: writer rounds {rounds:?}, reader passes {reads:?}, \
         daemon VmHWM {hwm} kB (cache cap {} kB)",
        CACHE / 1024
    );
    assert!(util::process_alive(pid), "the daemon died under load");

    // What each writer wrote last, before and after a remount.
    let check = |root: &Path| {
        for (w, &n) in rounds.iter().enumerate() {
            let w = w as u64;
            for k in n.saturating_sub(8)..n {
                let p = root.join(format!("w{w}-{}", k % 8));
                assert!(
                    fs::read(&p).unwrap() == util::random_bytes(256 << 10, w * 1000 + k),
                    "{} differs",
                    p.display()
                );
            }
            let lower = fs::read(root.join(format!("big/b{:02}", w * 5))).unwrap();
            let mut want = fs::read(src.join(format!("big/b{:02}", w * 5))).unwrap();
            for k in n.saturating_sub(64)..n {
                let at = (4096 * (k % 64)) as usize;
                want[at..at + 8].copy_from_slice(&k.to_le_bytes());
            }
            assert!(lower == want, "patched lower file b{:02} differs", w * 5);
        }
    };
    check(m.path());
    m.unmount();
    let m = Mount::with_args(&gz, &mnt, &["--upper", &up]);
    check(m.path());
}
