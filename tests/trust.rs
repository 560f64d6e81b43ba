//! The index as a trust boundary (issue 10): a sidecar index that another user owns or
//! can write is ignored and rebuilt; an index embedded in a snapshot that disagrees
//! with the snapshot's own tar headers answers EIO for the files it misdescribes.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::util::{self, Mount, TestDir};

/// A plain tar with files `a` and `b` (distinct contents) in `dir`.
fn two_file_tar(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"the content of a\n").unwrap();
    fs::write(src.join("b"), b"B is something else entirely\n").unwrap();
    let tar = dir.join("snap.tar");
    util::run_ok(
        std::process::Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("--format=posix")
            .arg("-C")
            .arg(&src)
            .arg("a")
            .arg("b"),
    );
    tar
}

/// Renames entry `a` to `0` inside index file `idx` (checksum kept right), so that a
/// mount that uses the file visibly shows `0`.
fn tamper_sidecar(idx: &Path) {
    let mut index = snapfs::index::format::decode(&fs::read(idx).unwrap()).unwrap();
    let root = *index.inode(1).unwrap();
    let d = *index
        .children(&root)
        .iter()
        .find(|d| index.dirent_name(d) == b"a")
        .unwrap();
    index.names[d.name_off as usize] = b'0';
    fs::write(idx, snapfs::index::format::encode(&index)).unwrap();
}

fn names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = util::list_dir(p)
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn issue_10_sidecar_index_owned_by_another_user_or_group_writable_is_ignored() {
    let td = TestDir::new("sidecar-trust");
    let tar = two_file_tar(td.path());
    let cache = td.mkdir("cache");
    let idx = PathBuf::from(format!("{}.snapfs-idx", tar.display()));
    util::run_ok(
        std::process::Command::new(util::bin())
            .env("XDG_CACHE_HOME", &cache)
            .arg("index")
            .arg(&tar),
    );
    assert!(idx.exists(), "the index is written beside the archive");
    tamper_sidecar(&idx);
    let mount = || {
        let mnt = td.mkdir("mnt").canonicalize().unwrap();
        let r = util::run(
            std::process::Command::new(util::bin())
                .env("XDG_CACHE_HOME", &cache)
                .arg("mount")
                .arg(&tar)
                .arg(&mnt),
        );
        let m = Mount::adopt(&tar, &mnt);
        r.assert_ok();
        let seen = names(m.path());
        m.unmount();
        (seen, r.stderr_str())
    };
    // Trusted (ours, not writable by others): it is used as it is, tampered name and all.
    assert_eq!(mount().0, vec!["0", "b"], "a trusted sidecar is used");

    // Group-writable: ignored, the archive is indexed again into the cache dir.
    fs::set_permissions(&idx, fs::Permissions::from_mode(0o664)).unwrap();
    let (seen, log) = mount();
    assert_eq!(seen, vec!["a", "b"], "a group-writable sidecar is ignored");
    assert!(
        log.contains("writable by its group") && log.contains("snap.tar.snapfs-idx"),
        "a log line says why: {log}"
    );
    let cached: Vec<_> = fs::read_dir(cache.join("snapfs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        cached
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".snapfs-idx")),
        "rebuilt in the cache dir: {cached:?}"
    );
    for p in &cached {
        fs::remove_file(p).ok();
    }

    // Owned by another user (and not writable by anyone else): ignored too.
    fs::set_permissions(&idx, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&idx, Some(54321), Some(54321)).unwrap();
    assert_eq!(fs::metadata(&idx).unwrap().uid(), 54321);
    let (seen, log) = mount();
    assert_eq!(seen, vec!["a", "b"], "another user's sidecar is ignored");
    assert!(log.contains("owned by uid 54321"), "{log}");

    // Its directory writable by others (a shared snapshot dir): ignored as well.
    std::os::unix::fs::chown(&idx, Some(0), Some(0)).unwrap();
    fs::set_permissions(td.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let (seen, log) = mount();
    fs::set_permissions(td.path(), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        seen,
        vec!["a", "b"],
        "a sidecar in a world-writable dir is ignored"
    );
    assert!(log.contains("writable by others"), "{log}");
    // Trusted again: the tampered sidecar shows again (only the checks changed).
    assert_eq!(mount().0, vec!["0", "b"]);
}

/// Rewrites the embedded index of plain-tar snapshot `snap` with `edit` applied.
fn rewrite_embedded(snap: &Path, edit: impl FnOnce(&mut snapfs::index::Index)) {
    use snapfs::snapshot::format::{Footer, FOOTER_LEN};
    let archive = snapfs::archive::Archive::open(snap).unwrap();
    let mut index = snapfs::snapshot::read_embedded(&archive)
        .unwrap()
        .expect("an embedded index");
    let bytes = fs::read(snap).unwrap();
    let mut block = [0u8; FOOTER_LEN];
    block.copy_from_slice(&bytes[bytes.len() - FOOTER_LEN..]);
    let footer = Footer::decode(&block).unwrap().expect("a footer");
    edit(&mut index);
    let encoded = snapfs::index::format::encode(&index);
    let mut out = bytes[..footer.index_offset as usize].to_vec();
    out.extend_from_slice(&encoded);
    out.resize(out.len().div_ceil(512) * 512, 0);
    let f = Footer {
        index_len: encoded.len() as u64,
        compressed_len: encoded.len() as u64,
        index_crc: crc32fast::hash(&encoded),
        ..footer
    };
    out.extend_from_slice(&f.encode());
    fs::write(snap, out).unwrap();
}

#[test]
fn issue_10_embedded_index_pointing_a_name_at_another_members_data_gives_eio() {
    let td = TestDir::new("embedded-differential");
    let src = td.mkdir("src");
    fs::write(src.join("a"), b"the content of a\n").unwrap();
    fs::write(src.join("b"), b"B: what a scanner would not see\n").unwrap();
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/c"), vec![b'c'; 100_000]).unwrap();
    let snap = td.join("snap.tar");
    util::run_ok(
        std::process::Command::new(util::bin())
            .arg("create")
            .arg(&src)
            .arg("-o")
            .arg(&snap),
    );
    // Untampered, every file reads right (the check passes).
    {
        let m = Mount::new(&snap, &td.join("mnt"));
        assert_eq!(fs::read(m.join("a")).unwrap(), b"the content of a\n");
        assert_eq!(fs::read(m.join("d/c")).unwrap(), vec![b'c'; 100_000]);
        m.unmount();
    }
    // Point `a` at the data of `b` (with b's size): GNU tar still extracts `a` with
    // its own content, so the mount must not show b's bytes under a's name.
    rewrite_embedded(&snap, |index| {
        let find = |index: &snapfs::index::Index, name: &[u8]| {
            let root = index.inode(1).unwrap();
            let d = index
                .children(root)
                .iter()
                .find(|d| index.dirent_name(d) == name)
                .unwrap();
            d.ino as usize - 1
        };
        let (a, b) = (find(index, b"a"), find(index, b"b"));
        index.inodes[a].data = index.inodes[b].data;
        index.inodes[a].size = index.inodes[b].size;
    });
    let extracted = td.mkdir("x");
    util::run_ok(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(&snap)
            .arg("-C")
            .arg(&extracted),
    );
    assert_eq!(
        fs::read(extracted.join("a")).unwrap(),
        b"the content of a\n"
    );
    let log = td.join("daemon.log");
    let m = Mount::with_args(
        &snap,
        &td.join("mnt"),
        &["--log-file", log.to_str().unwrap()],
    );
    let err = fs::read(m.join("a")).expect_err("a's bytes must not be b's");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        fs::read(m.join("b")).unwrap(),
        b"B: what a scanner would not see\n"
    );
    assert_eq!(fs::read(m.join("d/c")).unwrap(), vec![b'c'; 100_000]);
    m.unmount();
    let log = fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("snap.tar")
            && log.contains("\"a\"")
            && log.contains("disagrees with the tar headers"),
        "one line naming archive and entry: {log}"
    );
}
