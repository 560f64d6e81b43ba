//! Writable views (`snapfs mount --upper DIR`): the same ordinary tools run in the view
//! and in GNU tar's extraction must leave equal trees; copy-up stays lazy (no data for
//! metadata changes, only the written ranges of a big file); the view survives a
//! remount and, for fsynced data, a killed daemon.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use crate::corpus::{build_small_tree, build_std_tree, extract, gnu_tar, shq};
use crate::tree::{self, CmpOpts};
use crate::util::{daemon_pid, random_bytes, run_ok, sh, sha256_file, snapfs, Mount, TestDir};

/// Mounts `archives` (bottom first) with `--upper upper`.
fn upper_mount(archives: &[&Path], mnt: &Path, upper: &Path) -> Mount {
    let (top, rest) = archives.split_last().expect("an archive");
    let mut args = vec!["--upper", upper.to_str().expect("utf-8 test path")];
    args.extend(rest.iter().map(|p| p.to_str().expect("utf-8 test path")));
    Mount::with_args(top, mnt, &args)
}

/// Ordinary changes, run with `sh -e` in the view and in the extracted tree.
const OPS: &str = r#"
cp text.txt copied.txt
cp -a dir dir_copy
mv data/big1.bin moved_big1.bin
mv dir/sub renamed_sub
mv hl/other hl_other_moved
rm -rf many
rm -rf 'unicode/日本語'
truncate -s 100 block513
truncate -s 5000 one
truncate -s 0 block512
ln text.txt text_hard
ln -s text.txt new_sym
chmod 0640 modes/ro
chmod 0700 owned/d
chown 77:88 owned/f
chown -h 5:6 sym_abs
touch -d '2001-02-03 04:05:06.123456789' text.txt
touch -h -d '2002-02-03 04:05:06' sym_dangling
setfattr -n user.added -v 1 xattr/f
setfattr -x user.test xattr/f
setfattr -n user.ondir -v 2 dir
mkfifo newfifo
mknod newchr c 1 7
mkdir -p newdir/a/b
echo hi > newdir/a/b/f
dd if=/dev/zero of=data/big2.bin bs=4096 count=1 seek=100 conv=notrunc status=none
printf 'in a hole' | dd of=sparse/s1 bs=1 seek=9000000 conv=notrunc status=none
echo appended >> hl/a
rm hl/b
mv sym_rel sym_rel_moved
rmdir dir/emptydir
mkdir dir/emptydir
mv owned owned2
mv owned2 owned
mv text_hard dir_copy/
echo new > modes/d700/inside2
mv top/d0 top_d0_moved
mv moved_big1.bin top/
rm top/readme
echo replaced > top/hard
mkdir gone_dir
echo x > gone_dir/x
rm -r gone_dir
mv dir/sym_up renamed_sub/
ln top/link top_link_hard
"#;

/// Sets every mtime that the operations made "now" to one fixed time, so that the
/// view and the plain tree can be compared (both are real changes of the same paths).
const NORMALIZE_TIMES: &str = r#"
import os, sys
root = os.fsencode(sys.argv[1])
paths = []
for dp, dns, fns in os.walk(root):
    for n in dns + fns:
        paths.append(os.path.join(dp, n))
for p in paths:
    st = os.lstat(p)
    if st.st_mtime > 1600000000:
        os.utime(p, ns=(1234567890123456789, 1234567890123456789), follow_symlinks=False)
"#;

pub(crate) fn normalize(root: &Path) {
    crate::util::python(NORMALIZE_TIMES, [root.as_os_str()]);
}

/// Base layer: the std corpus; top layer: a small tree under `top/` plus an override.
fn two_layers(d: &TestDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = d.join("src");
    build_std_tree(&src);
    let base = d.join("base.tar");
    gnu_tar(&src, &base, "gnu", &[]);
    let src2 = d.join("src2");
    build_small_tree(&src2.join("top"), 7);
    std::fs::write(src2.join("extra_in_top"), b"top layer\n").unwrap();
    let top = d.join("top.tar");
    gnu_tar(&src2, &top, "gnu", &[]);
    (base, top)
}

#[test]
fn ordinary_tools_match_plain_extraction_and_survive_remount() {
    let d = TestDir::new("upper-ops");
    let (base, top) = two_layers(&d);
    let plain = d.join("plain");
    extract(&base, &plain);
    extract(&top, &plain);
    let upper = d.join("upper");
    let mnt = d.join("mnt");
    {
        let m = upper_mount(&[&base, &top], &mnt, &upper);
        // Untouched view equals the extraction.
        tree::assert_same_tree(&plain, m.path(), &CmpOpts::default());
        sh(&plain, OPS);
        sh(m.path(), OPS);
        normalize(&plain);
        normalize(m.path());
        tree::assert_same_tree(&plain, m.path(), &CmpOpts::default());
        m.unmount();
    }
    let m = upper_mount(&[&base, &top], &mnt, &upper);
    tree::assert_same_tree(&plain, m.path(), &CmpOpts::default());
    // The changes API sees what was done.
    let ch = snapfs::upper::changes(&upper).unwrap();
    let find = |p: &str| ch.iter().find(|c| c.path == p.as_bytes()).map(|c| &c.kind);
    use snapfs::upper::ChangeKind;
    assert_eq!(find("many"), Some(&ChangeKind::Deleted));
    assert!(
        matches!(find("renamed_sub"), Some(ChangeKind::Dir { origin: Some(o), .. }) if o == b"dir/sub")
    );
    assert_eq!(find("sym_rel"), Some(&ChangeKind::Deleted));
    assert!(
        matches!(find("owned/f"), Some(ChangeKind::Partial { ranges, .. }) if ranges.0.is_empty())
    );
    assert_eq!(find("copied.txt"), Some(&ChangeKind::File));
    assert_eq!(find("newfifo"), Some(&ChangeKind::Other));
}

#[test]
fn copy_up_is_lazy_for_a_big_file() {
    let d = TestDir::new("upper-lazy");
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big.img"), random_bytes(64 << 20, 11)).unwrap();
    let tar = d.join("big.tar");
    gnu_tar(&src, &tar, "gnu", &[]);
    let plain = d.join("plain");
    extract(&tar, &plain);
    let upper = d.join("upper");
    let mnt = d.join("mnt");
    let du = |p: &Path| -> u64 {
        let out = run_ok(Command::new("du").arg("-sk").arg(p)).stdout_str();
        out.split_whitespace().next().unwrap().parse().unwrap()
    };
    let m = upper_mount(&[&tar], &mnt, &upper);
    let meta = "chmod 0600 big.img\nchown 12:34 big.img\ntouch -d '2010-01-01 00:00:00' big.img\nsetfattr -n user.note -v hi big.img\n";
    sh(m.path(), meta);
    sh(&plain, meta);
    assert!(
        du(&upper) < 256,
        "metadata-only change copied data: {} KiB",
        du(&upper)
    );
    let poke = "dd if=/dev/urandom of=big.img.patch bs=4096 count=1 status=none\n";
    sh(d.path(), poke);
    let patch = d.join("big.img.patch");
    let apply = format!(
        "dd if={} of=big.img bs=4096 seek=4000 conv=notrunc status=none\n",
        shq(&patch)
    );
    sh(m.path(), &apply);
    sh(&plain, &apply);
    let upper_file = upper.join("tree/big.img");
    let blocks = std::fs::symlink_metadata(&upper_file).unwrap().blocks() * 512;
    assert!(
        blocks <= 64 << 10,
        "upper file holds {blocks} bytes for a 4 KiB write"
    );
    assert!(du(&upper) < 512, "upper dir is {} KiB", du(&upper));
    normalize(&plain);
    normalize(m.path());
    let want = sha256_file(&plain.join("big.img")).unwrap();
    assert_eq!(sha256_file(&m.join("big.img")).unwrap(), want);
    tree::assert_same_tree(&plain, m.path(), &CmpOpts::default());
    m.unmount();
    let m = upper_mount(&[&tar], &mnt, &upper);
    assert_eq!(sha256_file(&m.join("big.img")).unwrap(), want);
    tree::assert_same_tree(&plain, m.path(), &CmpOpts::default());
}

#[test]
fn fsynced_writes_survive_kill_dash_9() {
    let d = TestDir::new("upper-kill");
    let src = d.join("src");
    build_small_tree(&src, 3);
    std::fs::write(src.join("big"), random_bytes(8 << 20, 5)).unwrap();
    let tar = d.join("small.tar");
    gnu_tar(&src, &tar, "gnu", &[]);
    let upper = d.join("upper");
    let mnt = d.join("mnt");
    let m = upper_mount(&[&tar], &mnt, &upper);
    let mnt = m.path().to_path_buf();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("big"))
            .unwrap();
        f.write_all_at(b"durable bytes", 3 << 20).unwrap();
        f.sync_all().unwrap();
        let n = File::create(mnt.join("d1/new")).unwrap();
        n.write_all_at(b"new file", 0).unwrap();
        n.sync_all().unwrap();
        // Kill while the files are still open: no flush, no release.
        std::fs::remove_file(mnt.join("readme")).unwrap();
        std::fs::rename(mnt.join("d2"), mnt.join("d2-renamed")).unwrap();
        let pid = daemon_pid(&mnt, &tar);
        run_ok(Command::new("kill").arg("-9").arg(pid.to_string()));
        assert!(crate::util::poll_until(
            std::time::Duration::from_secs(20),
            || !crate::util::process_alive(pid)
        ));
    }
    snapfs(["umount".as_ref(), mnt.as_os_str()]).assert_ok();
    drop(m);
    let m = upper_mount(&[&tar], &mnt, &upper);
    let mut buf = [0u8; 13];
    File::open(m.join("big"))
        .unwrap()
        .read_exact_at(&mut buf, 3 << 20)
        .unwrap();
    assert_eq!(&buf, b"durable bytes");
    let orig = random_bytes(8 << 20, 5);
    let mut head = vec![0u8; 1 << 20];
    File::open(m.join("big"))
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(head, orig[..1 << 20]);
    assert_eq!(std::fs::read(m.join("d1/new")).unwrap(), b"new file");
    assert!(!m.join("readme").exists());
    assert!(m.join("d2-renamed").is_dir() && !m.join("d2").exists());
}

#[test]
fn control_xattrs_are_hidden_and_refused() {
    let d = TestDir::new("upper-xattr");
    let tar = crate::corpus::small_tar(d.path(), "s.tar", 4);
    let upper = d.join("upper");
    let m = upper_mount(&[&tar], &d.join("mnt"), &upper);
    sh(m.path(), "chmod 600 readme\nmv d0 d0x\nrm d1/f001.dat");
    let r = crate::util::run(
        Command::new("setfattr")
            .args(["-n", "user.snapfs.origin", "-v", "x"])
            .arg(m.join("readme")),
    );
    r.assert_fail();
    assert!(
        r.stderr_str().contains("not permitted"),
        "{}",
        r.stderr_str()
    );
    let names = run_ok(
        Command::new("getfattr")
            .args(["-d", "-m", "-"])
            .arg(m.join("readme")),
    )
    .stdout_str();
    assert!(!names.contains("user.snapfs"), "{names}");
    assert!(names.contains("user.small"), "{names}");
    // Read-only mounts still refuse writes.
    let ro = Mount::new(&tar, &d.join("ro"));
    let e = std::fs::write(ro.join("readme"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(crate::util::EROFS));
}

/// An upper dir of format 1 (ranges in one `user.snapfs.ranges` xattr) still opens:
/// its ranges are read, the format file says 2 from then on, the first change moves
/// the ranges into a range record. A format this snapfs does not know is refused
/// with one line.
#[test]
fn format_1_upper_dir_opens_and_is_upgraded() {
    let d = TestDir::new("upper-format1");
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = random_bytes(1 << 20, 21);
    std::fs::write(src.join("big"), &data).unwrap();
    let tar = d.join("f.tar");
    gnu_tar(&src, &tar, "gnu", &[]);
    let upper = d.join("upper");
    std::fs::create_dir_all(upper.join("tree")).unwrap();
    std::fs::write(upper.join("format"), b"snapfs-upper 1\n").unwrap();
    let f = File::create(upper.join("tree/big")).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(b"HELLO", 0).unwrap();
    f.write_all_at(b"WORLD", 100).unwrap();
    drop(f);
    for (k, v) in [
        ("user.snapfs.origin", "big"),
        ("user.snapfs.ranges", "0-5,100-105"),
    ] {
        run_ok(
            Command::new("setfattr")
                .args(["-n", k, "-v", v])
                .arg(upper.join("tree/big")),
        );
    }
    let mut want = data.clone();
    want[..5].copy_from_slice(b"HELLO");
    want[100..105].copy_from_slice(b"WORLD");
    let mnt = d.join("mnt");
    {
        let m = upper_mount(&[&tar], &mnt, &upper);
        assert!(
            std::fs::read(m.join("big")).unwrap() == want,
            "format 1 ranges"
        );
        assert_eq!(
            std::fs::read(upper.join("format")).unwrap(),
            b"snapfs-upper 2\n"
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("big"))
            .unwrap();
        f.write_all_at(b"!", 200).unwrap();
        want[200] = b'!';
        drop(f);
        m.unmount();
    }
    let names = run_ok(
        Command::new("getfattr")
            .args(["-d", "-m", "-"])
            .arg(upper.join("tree/big")),
    )
    .stdout_str();
    assert!(
        names.contains("user.snapfs.rlog") && !names.contains("user.snapfs.ranges"),
        "{names}"
    );
    let m = upper_mount(&[&tar], &mnt, &upper);
    assert!(
        std::fs::read(m.join("big")).unwrap() == want,
        "after the upgrade"
    );
    m.unmount();
    let ch = snapfs::upper::changes(&upper).unwrap();
    let big = ch.iter().find(|c| c.path == b"big").unwrap();
    assert_eq!(
        big.kind,
        snapfs::upper::ChangeKind::Partial {
            origin: b"big".to_vec(),
            ranges: snapfs::upper::Ranges(vec![(0, 5), (100, 105), (200, 201)]),
        }
    );
    std::fs::write(upper.join("format"), b"snapfs-upper 9\n").unwrap();
    let r = Mount::try_with_args(&tar, &mnt, &["--upper", upper.to_str().unwrap()])
        .err()
        .expect("a format 9 upper dir is refused");
    crate::util::assert_one_line_error(&r, "snapfs-upper 9");
}
