//! Randomized equivalence (deterministic LCG seeds): sequences of file operations are
//! applied both to a writable view (`mount --upper`) and to a plain directory
//! extracted by GNU tar; after every sequence the trees must be equal, and again after
//! `snapfs commit` (parent + delta mounted as layers) and after a remount of the
//! same upper dir.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use crate::layers::mount_layers;
use crate::tree::{self, CmpOpts};
use crate::upper::normalize;
use crate::util::{sh, snapfs, Lcg, Mount, TestDir};

const PATHS: &[&str] = &[
    "f1", "f2", "big", "d1", "d1/f3", "d1/d2", "d1/d2/f4", "d3", "d3/f5", "s1", "d1/s2", "new",
    "d4", "d4/g",
];

/// One operation; returns the errno it failed with (0 = success).
fn apply(root: &Path, op: &Op) -> i32 {
    let p = |s: &str| root.join(s);
    let r: std::io::Result<()> = match op {
        Op::Write(a, data) => fs::write(p(a), data),
        Op::Pwrite(a, off, data) => OpenOptions::new()
            .write(true)
            .open(p(a))
            .and_then(|f| f.write_all_at(data, *off)),
        Op::Truncate(a, len) => OpenOptions::new()
            .write(true)
            .open(p(a))
            .and_then(|f| f.set_len(*len)),
        Op::Mkdir(a) => fs::create_dir(p(a)),
        Op::Unlink(a) => fs::remove_file(p(a)),
        Op::Rmdir(a) => fs::remove_dir(p(a)),
        Op::Rename(a, b) => fs::rename(p(a), p(b)),
        Op::Symlink(t, a) => std::os::unix::fs::symlink(t, p(a)),
        Op::Link(a, b) => fs::hard_link(p(a), p(b)),
        Op::Chmod(a, m) => fs::set_permissions(p(a), fs::Permissions::from_mode(*m)),
        Op::SetXattr(a, v) => {
            let path = std::ffi::CString::new(p(a).as_os_str().as_bytes()).unwrap();
            // SAFETY: valid C strings and a buffer with its length.
            let rc = unsafe {
                libc::setxattr(
                    path.as_ptr(),
                    c"user.rnd".as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    0,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
    };
    match r {
        Ok(()) => 0,
        Err(e) => e
            .raw_os_error()
            .unwrap_or(if e.kind() == ErrorKind::NotFound {
                libc::ENOENT
            } else {
                -1
            }),
    }
}

#[derive(Debug)]
enum Op {
    Write(&'static str, Vec<u8>),
    Pwrite(&'static str, u64, Vec<u8>),
    Truncate(&'static str, u64),
    Mkdir(&'static str),
    Unlink(&'static str),
    Rmdir(&'static str),
    Rename(&'static str, &'static str),
    Symlink(&'static str, &'static str),
    Link(&'static str, &'static str),
    Chmod(&'static str, u32),
    SetXattr(&'static str, Vec<u8>),
}

fn random_op(r: &mut Lcg) -> Op {
    let mut pick = || PATHS[r.below(PATHS.len() as u64) as usize];
    let (a, b) = (pick(), pick());
    let n = r.below(20) as usize;
    let data: Vec<u8> = (0..n * 97).map(|i| b'a' + ((i + n) % 26) as u8).collect();
    match r.below(11) {
        0 => Op::Write(a, data),
        1 => Op::Pwrite(a, r.below(300_000), data),
        2 => Op::Truncate(a, r.below(250_000)),
        3 => Op::Mkdir(a),
        4 => Op::Unlink(a),
        5 => Op::Rmdir(a),
        6 => Op::Rename(a, b),
        7 => Op::Symlink(b, a),
        8 => Op::Link(a, b),
        9 => Op::Chmod(a, [0o600, 0o644, 0o755, 0o700][r.below(4) as usize]),
        _ => Op::SetXattr(a, data),
    }
}

fn base(t: &TestDir) {
    sh(
        t.path(),
        "set -e; mkdir -p src/d1/d2 src/d3 && cd src && echo one > f1 && echo two > f2 && \
         seq 1 40000 > big && echo three > d1/f3 && echo four > d1/d2/f4 && echo five > d3/f5 && \
         ln -s f1 s1 && ln d3/f5 d3/f5-hard 2>/dev/null; rm -f d3/f5-hard; \
         find . -exec touch -h -d @1500000000 {} + && cd .. && \
         tar --format=posix --numeric-owner -C src -cf base.tar . && \
         mkdir plain && tar --numeric-owner -xpf base.tar -C plain",
    )
    .assert_ok();
}

#[test]
fn random_operation_sequences_match_a_plain_directory() {
    let t = TestDir::new("random-ops");
    base(&t);
    let archive = t.join("base.tar");
    let plain = t.join("plain");
    let upper = t.join("upper").display().to_string();
    let o = CmpOpts {
        dir_nlink: true,
        ..Default::default()
    };
    let mut total = 0;
    {
        let m = Mount::with_args(&archive, &t.join("mnt"), &["--upper", &upper]);
        for seed in 1..=8u64 {
            let mut r = Lcg::new(seed * 7919);
            let mut log = Vec::new();
            for _ in 0..40 {
                let op = random_op(&mut r);
                let (ev, ep) = (apply(m.path(), &op), apply(&plain, &op));
                log.push(format!("{op:?} -> view {ev}, plain {ep}"));
                assert_eq!(ev, ep, "seed {seed}: results differ:\n{}", log.join("\n"));
                total += 1;
            }
            normalize(m.path());
            normalize(&plain);
            tree::assert_same_tree(&plain, m.path(), &o);
        }
    }
    assert_eq!(total, 320);
    // Remount of the same upper dir: the same view.
    {
        let m = Mount::with_args(&archive, &t.join("mnt"), &["--upper", &upper]);
        tree::assert_same_tree(&plain, m.path(), &o);
    }
    // Cut a delta and a full snapshot; both reproduce the view.
    let a = archive.display().to_string();
    let delta = t.join("delta.tar");
    let full = t.join("full.tar.gz");
    let (d, f) = (delta.display().to_string(), full.display().to_string());
    snapfs([
        "commit",
        a.as_str(),
        "--upper",
        upper.as_str(),
        "-o",
        d.as_str(),
    ])
    .assert_ok();
    snapfs([
        "commit",
        a.as_str(),
        "--upper",
        upper.as_str(),
        "--full",
        "-o",
        f.as_str(),
    ])
    .assert_ok();
    {
        let m = mount_layers(&[archive.clone(), delta], &t.join("mnt-delta"));
        tree::assert_same_tree(&plain, m.path(), &o);
    }
    let m = Mount::new(&full, &t.join("mnt-full"));
    tree::assert_same_tree(&plain, m.path(), &o);
}
