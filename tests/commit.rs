//! `snapfs commit`: change a writable view with ordinary tools, cut a delta and a full
//! snapshot, and check that (a) GNU tar extraction of parent + delta with whiteouts
//! applied, (b) mounting parent + delta and (c) mounting the full snapshot alone all
//! equal the view as it was (captured with `cp -a` while mounted).

use std::path::Path;

use crate::layers::mount_layers;
use crate::tree::{self, CmpOpts};
use crate::util::{sh, snapfs, Mount, TestDir};

/// Ordinary tools changing a view (run inside the mountpoint).
const CHANGES: &str = "set -e
cp /etc/hostname etc/copied
mv etc/app/conf etc/conf-moved
mv var/lib opt-lib
rm -rf var/cache
truncate -s 100 big.bin
printf 'PATCH' | dd of=huge.bin bs=1 seek=3000000 conv=notrunc status=none
ln etc/passwd etc/passwd-link2
ln -s ../etc/passwd opt-lib/pw-link
chmod 0600 etc/passwd
chown 1234:4321 etc/group
touch -d '2001-02-03 04:05:06.123456789' etc/hostname-old
setfattr -n user.note -v changed etc/group
mkfifo new-fifo
mkdir -p new/deep/dir && echo fresh > new/deep/dir/file
";

/// Removes what a layer's whiteouts and opaque markers hide (before it is extracted).
const APPLY_WHITEOUTS: &str = r#"
import os, shutil, sys, tarfile
dest, layer = sys.argv[1], sys.argv[2]
def rm(p):
    if os.path.isdir(p) and not os.path.islink(p): shutil.rmtree(p)
    elif os.path.lexists(p): os.unlink(p)
for name in tarfile.open(layer).getnames():
    d, base = os.path.split(os.path.normpath(name))
    if base == '.wh..wh..opq':
        full = os.path.join(dest, d)
        for c in os.listdir(full) if os.path.isdir(full) else []: rm(os.path.join(full, c))
    elif base.startswith('.wh.'):
        rm(os.path.join(dest, d, base[4:]))
"#;

/// GNU tar extraction of layers in order, applying each layer's whiteouts first.
fn gnu_tar_apply(t: &TestDir, dest: &Path, layers: &[&str]) {
    std::fs::create_dir_all(dest).unwrap();
    for layer in layers {
        crate::util::python(
            APPLY_WHITEOUTS,
            [
                dest.display().to_string(),
                t.join(layer).display().to_string(),
            ],
        )
        .assert_ok();
        sh(
            t.path(),
            &format!(
                "tar --xattrs --xattrs-include='*' --numeric-owner --exclude='.wh.*' -xpf {layer} -C {}",
                dest.display()
            ),
        )
        .assert_ok();
    }
}

fn base(t: &TestDir) {
    sh(
        t.path(),
        "set -e; mkdir -p src/etc/app src/var/lib/db src/var/cache/x && cd src && \
         echo root:x:0:0 > etc/passwd && echo root:x:0: > etc/group && echo old > etc/hostname-old && \
         echo conf > etc/app/conf && echo db > var/lib/db/data && echo c > var/cache/x/c && \
         head -c 200000 /dev/zero | tr '\\0' 'a' > big.bin && \
         python3 -c \"import sys; sys.stdout.write(''.join(str(i)+'\\n' for i in range(800000)))\" > huge.bin && \
         ln etc/passwd etc/passwd-hard && setfattr -n user.note -v base etc/group && \
         cd .. && tar --xattrs --format=posix --numeric-owner -C src -czf base.tar.gz .",
    )
    .assert_ok();
}

#[test]
fn delta_and_full_cuts_reproduce_the_view() {
    let t = TestDir::new("commit-cut");
    base(&t);
    let archive = t.join("base.tar.gz");
    let upper = t.join("upper");
    let upper_s = upper.display().to_string();
    let view = t.join("view");
    {
        let m = Mount::with_args(&archive, &t.join("mnt"), &["--upper", &upper_s]);
        sh(m.path(), CHANGES).assert_ok();
        sh(
            t.path(),
            &format!("cp -a {}/. {}", m.path().display(), view.display()),
        )
        .assert_ok();
    }
    // Lazy copy-up: the 5 MB file changed in 5 bytes, the upper dir stays small.
    let used = sh(t.path(), "du -sk upper | cut -f1")
        .assert_ok()
        .stdout_str();
    assert!(
        used.trim().parse::<u64>().unwrap() < 1024,
        "upper dir uses {used} KiB"
    );

    let delta = t.join("delta.tar.gz");
    let full = t.join("full.tar.zst");
    let d = delta.display().to_string();
    let f = full.display().to_string();
    let a = archive.display().to_string();
    snapfs([
        "commit",
        a.as_str(),
        "--upper",
        upper_s.as_str(),
        "-o",
        d.as_str(),
    ])
    .assert_ok();
    snapfs([
        "commit",
        a.as_str(),
        "--upper",
        upper_s.as_str(),
        "--full",
        "-o",
        f.as_str(),
    ])
    .assert_ok();
    // The delta holds the changes, not the base: far smaller than the full cut.
    let listing = sh(t.path(), "tar -tzf delta.tar.gz")
        .assert_ok()
        .stdout_str();
    assert!(
        listing.contains("var/.wh.cache"),
        "no whiteout for var/cache:\n{listing}"
    );
    assert!(
        !listing.contains("var/lib/db/data\n") || listing.contains("var/.wh.lib"),
        "{listing}"
    );
    assert!(
        listing.contains("etc/passwd\n"),
        "metadata-only chmod not captured:\n{listing}"
    );

    let o = CmpOpts {
        dir_nlink: true,
        ..Default::default()
    };
    // (a) GNU tar / OCI extraction of parent + delta.
    sh(t.path(), "gzip -dk base.tar.gz delta.tar.gz").assert_ok();
    let extracted = t.join("extracted");
    gnu_tar_apply(&t, &extracted, &["base.tar", "delta.tar"]);
    tree::assert_same_tree(&view, &extracted, &o);
    // (b) parent + delta mounted as layers.
    {
        let m = mount_layers(&[archive.clone(), delta.clone()], &t.join("mnt-delta"));
        tree::assert_same_tree(&view, m.path(), &o);
    }
    // (c) the full snapshot alone, mounted without an indexing pass.
    let m = Mount::new(&full, &t.join("mnt-full"));
    let n = tree::assert_same_tree(&view, m.path(), &o);
    assert!(n > 20, "compared only {n} entries");
    assert!(!Path::new(&format!("{f}.snapfs-idx")).exists());
}

#[test]
fn commit_refuses_a_mounted_view() {
    let t = TestDir::new("commit-mounted");
    base(&t);
    let archive = t.join("base.tar.gz");
    let upper_s = t.join("upper").display().to_string();
    let m = Mount::with_args(&archive, &t.join("mnt"), &["--upper", &upper_s]);
    sh(m.path(), "echo x > new").assert_ok();
    let out = t.join("cut.tar").display().to_string();
    let a = archive.display().to_string();
    let r = snapfs([
        "commit",
        a.as_str(),
        "--upper",
        upper_s.as_str(),
        "-o",
        out.as_str(),
    ]);
    r.assert_fail();
    assert!(
        r.stderr_str().contains("unmount it first"),
        "{}",
        r.stderr_str()
    );
    assert!(!Path::new(&out).exists());
}
