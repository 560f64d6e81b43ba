//! uid/gid mapping seen from the host: `--uid-map`/`--gid-map` shift ids and show
//! unmapped ones as 65534, refuse to store an unmappable id, and map incoming ids back
//! so the upper dir and a cut hold archive-side ids; `--owner` presents one owner and
//! keeps the archive's. (The view from inside a user-namespace container is in
//! `containers.rs`.) ROOT ONLY (mounts, chown).

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::{self, sh, Mount, TestDir};

fn archive(td: &TestDir) -> PathBuf {
    let p = td.join("ids.tar");
    util::owned_tar(
        &p,
        &[
            (".", 0, 0, 0o755, None),
            ("etc", 0, 0, 0o755, None),
            ("etc/conf", 0, 0, 0o644, Some("conf\n")),
            ("srv", 33, 33, 0o775, None),
            ("srv/page", 33, 33, 0o644, Some("page\n")),
            ("far", 4000000, 4000000, 0o644, Some("far\n")),
        ],
    );
    p
}

fn errno_of(r: std::io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn chown(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
}

/// Ranges shift ids both ways; unmapped archive ids show as 65534; an unmappable
/// incoming id is refused; the upper dir and the committed delta hold archive ids.
#[test]
fn uid_map_shifts_ids_and_keeps_archive_ids_in_upper_and_cut() {
    let td = TestDir::new("idmap-ranges");
    fs::set_permissions(
        td.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let tar = archive(&td);
    let upper = td.join("upper");
    let upper_s = upper.display().to_string();
    let m = Mount::with_args(
        &tar,
        &td.join("mnt"),
        &[
            "-o",
            "allow_other",
            "--uid-map",
            "0:100000:65536",
            "--gid-map",
            "0:200000:1000,1000:300000:10",
            "--upper",
            &upper_s,
        ],
    );
    assert_eq!(util::owner_of(&m.join("etc/conf")), (100000, 200000));
    assert_eq!(util::owner_of(&m.join("srv/page")), (100033, 200033));
    assert_eq!(util::owner_of(&m.join("far")), (65534, 65534));
    // Host root (uid 0) is not in the map: it may not create entries.
    let e = fs::write(m.join("new-by-root"), "x");
    assert_eq!(
        e.err().and_then(|e| e.raw_os_error()),
        Some(libc::EPERM),
        "an unmapped caller created a file"
    );
    // chown to mapped ids is stored archive-side; to unmapped ones refused.
    chown(&m.join("etc/conf"), 101234, 300005).unwrap();
    assert_eq!(util::owner_of(&m.join("etc/conf")), (101234, 300005));
    assert_eq!(util::owner_of(&upper.join("tree/etc/conf")), (1234, 1005));
    assert_eq!(
        errno_of(chown(&m.join("srv/page"), 7, 200000)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno_of(chown(&m.join("srv/page"), 100000, 250000)),
        Some(libc::EINVAL)
    );
    assert_eq!(util::owner_of(&m.join("srv/page")), (100033, 200033));
    // A mapped user creates entries: recorded with archive ids.
    let r = util::run(
        std::process::Command::new("setpriv")
            .args(["--reuid=100033", "--regid=200033", "--clear-groups"])
            .args(["sh", "-c", "echo made > srv/made && mkdir srv/dir"])
            .current_dir(m.path()),
    );
    assert!(r.ok(), "mapped user could not write: {}", r.stderr_str());
    assert_eq!(util::owner_of(&m.join("srv/made")), (100033, 200033));
    assert_eq!(util::owner_of(&upper.join("tree/srv/made")), (33, 33));
    assert_eq!(util::owner_of(&upper.join("tree/srv/dir")), (33, 33));
    m.unmount();
    let delta = td.join("delta.tar");
    util::snapfs([
        "commit",
        &tar.display().to_string(),
        "--upper",
        &upper_s,
        "-o",
        &delta.display().to_string(),
    ])
    .assert_ok();
    let listing = sh(td.path(), "tar --numeric-owner -tvf delta.tar")
        .assert_ok()
        .stdout_str();
    let owner = |name: &str| {
        listing
            .lines()
            .find(|l| l.trim_end().trim_end_matches('/').ends_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    assert_eq!(owner("etc/conf").as_deref(), Some("1234/1005"), "{listing}");
    assert_eq!(owner("srv/made").as_deref(), Some("33/33"), "{listing}");
    assert_eq!(owner("srv/dir").as_deref(), Some("33/33"), "{listing}");
    // Remounted unmapped, the view shows the archive-side ids too.
    let m = Mount::with_args(&tar, &td.join("mnt2"), &["--upper", &upper_s]);
    assert_eq!(util::owner_of(&m.join("etc/conf")), (1234, 1005));
    assert_eq!(util::owner_of(&m.join("srv/made")), (33, 33));
}

/// `--owner U:G` shows every entry as U:G; new entries take their parent's archive
/// ids, a chown to U:G keeps the archive's, any other chown is refused.
#[test]
fn owner_presents_one_owner_and_keeps_archive_ids() {
    let td = TestDir::new("idmap-owner");
    let tar = archive(&td);
    let upper = td.join("upper");
    let upper_s = upper.display().to_string();
    let m = Mount::with_args(
        &tar,
        &td.join("mnt"),
        &["--owner", "4321:8765", "--upper", &upper_s],
    );
    for p in ["", "etc", "etc/conf", "srv/page", "far"] {
        assert_eq!(util::owner_of(&m.join(p)), (4321, 8765), "{p}");
    }
    fs::write(m.join("srv/new"), "new\n").unwrap();
    assert_eq!(util::owner_of(&m.join("srv/new")), (4321, 8765));
    assert_eq!(util::owner_of(&upper.join("tree/srv/new")), (33, 33));
    chown(&m.join("srv/page"), 4321, 8765).unwrap();
    assert_eq!(util::owner_of(&upper.join("tree/srv/page")), (33, 33));
    assert_eq!(
        errno_of(chown(&m.join("etc/conf"), 0, 0)),
        Some(libc::EPERM)
    );
    m.unmount();
    let r = util::snapfs([
        "mount",
        "--owner",
        "x",
        &tar.display().to_string(),
        &td.mkdir("bad").display().to_string(),
    ]);
    util::assert_one_line_error(&r, "--owner");
}
