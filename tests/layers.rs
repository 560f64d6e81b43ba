//! Stacked layers: `snapfs mount base delta... mnt` must equal OCI image extraction
//! (whiteouts, opaque directories, type changes), computed here by a small Python
//! applier over GNU-tar-made and tarfile-made layers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::tree::{self, CmpOpts};
use crate::util::{python, sh, Mount, TestDir};

/// Applies OCI layers in order into a directory, as image extraction does.
const OCI_APPLY: &str = r#"
import os, shutil, sys, tarfile
dest = sys.argv[1]
def rm(p):
    if os.path.islink(p) or not os.path.isdir(p):
        if os.path.lexists(p): os.unlink(p)
    else:
        shutil.rmtree(p)
times = {}
for layer in sys.argv[2:]:
    with tarfile.open(layer) as t:
        members = t.getmembers()
        for m in members:
            name = os.path.normpath(m.name.lstrip('/'))
            d, base = os.path.split(name)
            if base == '.wh..wh..opq':
                full = os.path.join(dest, d)
                if os.path.isdir(full) and not os.path.islink(full):
                    for c in os.listdir(full): rm(os.path.join(full, c))
            elif base.startswith('.wh.'):
                full = os.path.join(dest, d, base[4:])
                if os.path.lexists(full): rm(full)
        keep = []
        for m in members:
            name = os.path.normpath(m.name.lstrip('/'))
            if os.path.basename(name).startswith('.wh.'): continue
            full = os.path.join(dest, name)
            if os.path.lexists(full) and not (m.isdir() and os.path.isdir(full) and not os.path.islink(full)):
                rm(full)
            keep.append(m)
        t.extractall(dest, members=keep, numeric_owner=True, filter='fully_trusted')
        for m in keep:
            if m.isdir() or m.issym():
                times[os.path.normpath(m.name.lstrip('/'))] = m.mtime
# The view shows each directory's (and symlink's) metadata from the topmost layer that
# lists it; deleting entries while applying must not count as a change.
for name in sorted(times, key=lambda n: -n.count('/')):
    full = os.path.join(dest, name)
    if os.path.lexists(full):
        os.utime(full, (times[name], times[name]), follow_symlinks=False)
"#;

/// Writes a layer with python's tarfile: lines of `kind path [arg]`.
const MAKE_LAYER: &str = r#"
import io, sys, tarfile
out = sys.argv[1]
with tarfile.open(out, 'w', format=tarfile.PAX_FORMAT) as t:
    for line in sys.argv[2:]:
        kind, path, *rest = line.split(' ', 2)
        ti = tarfile.TarInfo(path)
        ti.mtime = 1700000000; ti.uid = 1000; ti.gid = 1000; ti.mode = 0o644
        data = b''
        if kind == 'f':
            data = (rest[0] if rest else '').encode(); ti.size = len(data)
        elif kind == 'd':
            ti.type = tarfile.DIRTYPE; ti.mode = 0o755
        elif kind == 'l':
            ti.type = tarfile.SYMTYPE; ti.linkname = rest[0]
        elif kind == 'h':
            ti.type = tarfile.LNKTYPE; ti.linkname = rest[0]
        t.addfile(ti, io.BytesIO(data))
"#;

fn make_layer(out: &Path, lines: &[&str]) {
    let mut args: Vec<String> = vec![out.display().to_string()];
    args.extend(lines.iter().map(|l| l.to_string()));
    python(MAKE_LAYER, &args).assert_ok();
}

pub(crate) fn oci_apply(dest: &Path, layers: &[PathBuf]) {
    std::fs::create_dir_all(dest).unwrap();
    let mut args = vec![dest.display().to_string()];
    args.extend(layers.iter().map(|l| l.display().to_string()));
    python(OCI_APPLY, &args).assert_ok();
}

pub(crate) fn mount_layers(layers: &[PathBuf], mnt: &Path) -> Mount {
    let (top, lower) = layers.split_last().unwrap();
    let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    let lower: Vec<&str> = lower.iter().map(|s| s.as_str()).collect();
    Mount::with_args(top, mnt, &lower)
}

#[test]
fn stacked_layers_equal_oci_extraction() {
    let t = TestDir::new("layers-oci");
    sh(
        t.path(),
        "mkdir -p base/etc/app base/opq/deep base/var/x base/keep && \
         echo one > base/etc/app/conf && echo two > base/etc/passwd && \
         echo old > base/opq/old && echo deeper > base/opq/deep/f && \
         echo fx > base/var/x/f && echo k > base/keep/k && \
         ln -s /etc/passwd base/abs-link && ln base/etc/passwd base/etc/passwd-hard && \
         chmod 0700 base/keep && touch -d @1600000000 base/etc/app/conf && \
         tar --numeric-owner -C base -cf base.tar . && gzip -k base.tar",
    )
    .assert_ok();
    let delta1 = t.join("delta1.tar");
    make_layer(
        &delta1,
        &[
            "f etc/.wh.passwd-hard",
            "f etc/app/conf changed",
            "d opq",
            "f opq/.wh..wh..opq",
            "f opq/new fresh",
            "f var/x replaced-dir-by-file",
            "d newdir",
            "f newdir/n n",
            "f .wh.abs-link",
        ],
    );
    let delta2 = t.join("delta2.tar");
    make_layer(
        &delta2,
        &[
            "d var/x",
            "f var/x/again file-under-dir-again",
            "f newdir/.wh.n",
            "l etc/passwd-link passwd",
        ],
    );
    sh(t.path(), "zstd -q delta2.tar -o delta2.tar.zst").assert_ok();
    let layers = vec![
        t.join("base.tar.gz"),
        delta1.clone(),
        t.join("delta2.tar.zst"),
    ];
    let expected = t.join("expected");
    oci_apply(
        &expected,
        &[t.join("base.tar"), delta1, t.join("delta2.tar")],
    );
    let m = mount_layers(&layers, &t.join("mnt"));
    // Directories that no layer lists explicitly get their mtime from the applier.
    let implicit: BTreeSet<PathBuf> = BTreeSet::new();
    let mut o = CmpOpts::with_implicit(implicit);
    o.dir_nlink = true;
    let n = tree::assert_same_tree(&expected, m.path(), &o);
    assert!(n >= 12, "compared only {n} entries");
    // Whiteout markers are never visible.
    let out = sh(m.path(), "find . -name '.wh.*' | wc -l")
        .assert_ok()
        .stdout_str();
    assert_eq!(out.trim(), "0");
}

#[test]
fn fifty_layers_stack() {
    let t = TestDir::new("layers-50");
    let mut layers = Vec::new();
    for i in 0..50 {
        let l = t.join(format!("l{i:02}.tar"));
        let own = format!("f shared/file{i:02} layer{i}");
        let top = format!("f top layer{i}");
        let mut lines = vec!["d shared", own.as_str(), top.as_str()];
        let wh = format!("f shared/.wh.file{:02}", i.max(1) - 1);
        if i % 10 == 9 {
            lines.push(wh.as_str());
        }
        make_layer(&l, &lines);
        layers.push(l);
    }
    let expected = t.join("expected");
    oci_apply(&expected, &layers);
    let m = mount_layers(&layers, &t.join("mnt"));
    let n = tree::assert_same_tree(&expected, m.path(), &CmpOpts::default());
    assert_eq!(n, 2 + 50 - 5);
    assert_eq!(std::fs::read_to_string(m.join("top")).unwrap(), "layer49");
}
