//! `snapfs list`: the live snapfs mounts (fs type `fuse.snapfs` in
//! `/proc/self/mountinfo`), their inputs (from the mount source, see
//! [`source_name`]; an image shows as `IMAGE@REF`), their daemon pids (found in `/proc`
//! by command line and an open `/dev/fuse`) and whether the daemon still answers.
//! Views of a snapfs service (`--service`, `$SNAPFS_SERVICE`, and every `snapfs serve`
//! found in `/proc`) are asked of the service and marked with it; `-l` adds each view's
//! service, upper dir and bytes read per archive.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::error::{Error, Result};
use crate::service::{client, Request, ViewInfo, ViewState};

/// Arguments of `snapfs list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Long listing: also the service, the upper dir and the bytes read from each
    /// archive (known for service views).
    #[arg(short, long)]
    long: bool,
    /// Also list the views of the service on SOCKET [default: $SNAPFS_SERVICE, and
    /// every running `snapfs serve`].
    #[arg(long, value_name = "SOCKET")]
    service: Option<PathBuf>,
}

/// One snapfs mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The inputs (archives or images), bottom layer first.
    pub archives: Vec<PathBuf>,
    /// For each input that is an image, the reference chosen in it.
    pub refs: Vec<Option<String>>,
    /// Mount options as mountinfo shows them (per-mount, then per-superblock).
    pub options: String,
}

/// Bytes of a mount source element that are escaped as `%XX`: the separators (`:`
/// between inputs, `@` before an image reference), `%` itself, and `,` (which the
/// mount helper would turn into `_`).
const ESCAPED: &[u8] = b"%:@,";

fn escape(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    for &c in b {
        if ESCAPED.contains(&c) {
            out.extend_from_slice(format!("%{c:02X}").as_bytes());
        } else {
            out.push(c);
        }
    }
    out
}

fn unescape_pct(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The mount source of a view of `inputs` (path, and for an image the reference
/// chosen in it): `snapfs:IN[:IN...]` where each `IN` is the path, followed for an
/// image by `@REF`, with `%`, `:`, `@` and `,` in either written `%XX`. So
/// `app.tar` holding `repo:tag` is `snapfs:app.tar@repo%3Atag`, and sources without
/// those bytes read as before.
pub fn source_name(inputs: &[(&Path, Option<&str>)]) -> String {
    let mut out = b"snapfs:".to_vec();
    for (i, (path, reference)) in inputs.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        out.extend(escape(path.as_os_str().as_bytes()));
        if let Some(r) = reference {
            out.push(b'@');
            out.extend(escape(r.as_bytes()));
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Inverse of [`source_name`] (after mountinfo's own escapes are undone).
pub fn parse_source(source: &[u8]) -> Vec<(PathBuf, Option<String>)> {
    source
        .strip_prefix(b"snapfs:")
        .unwrap_or(source)
        .split(|c| *c == b':')
        .filter(|a| !a.is_empty())
        .map(|a| {
            let (path, reference) = match a.iter().position(|&c| c == b'@') {
                Some(i) => (&a[..i], Some(&a[i + 1..])),
                None => (a, None),
            };
            (
                PathBuf::from(OsString::from_vec(unescape_pct(path))),
                reference.map(|r| String::from_utf8_lossy(&unescape_pct(r)).into_owned()),
            )
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let o = &b[i + 1..i + 4];
            if o.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(o[0] - b'0') * 64
                    + u32::from(o[1] - b'0') * 8
                    + u32::from(o[2] - b'0');
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Parses mountinfo text into its snapfs mounts.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut v = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 || r[0] != "fuse.snapfs" {
            continue;
        }
        let (archives, refs) = parse_source(&unescape(r[1])).into_iter().unzip();
        v.push(MountEntry {
            mountpoint: PathBuf::from(OsString::from_vec(unescape(l[4]))),
            archives,
            refs,
            options: format!("{},{}", l[5], r[2]),
        });
    }
    v
}

/// The file system types of the mounts stacked on `mountpoint` (bottom first), from
/// mountinfo text.
pub fn types_at(text: &str, mountpoint: &Path) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let at = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            (unescape(at) == mountpoint.as_os_str().as_bytes()).then(|| fstype.to_string())
        })
        .collect()
}

/// Refuses a mountpoint that already has a FUSE mount (snapfs's or another's) on
/// top: mounting again would stack a second mount and hide the first.
pub fn check_not_fuse_mounted(mountpoint: &Path) -> Result<()> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read", "/proc/self/mountinfo", e))?;
    match types_at(&text, mountpoint).pop() {
        Some(t) if t == "fuse" || t.starts_with("fuse.") => Err(Error::AlreadyMounted {
            path: mountpoint.to_path_buf(),
            fstype: t,
        }),
        _ => Ok(()),
    }
}

/// The snapfs mounts visible to this process.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read", "/proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// Pids of snapfs daemons serving `mountpoint`: processes whose command line is
/// `... mount ... <mountpoint>` (a relative path resolved against their cwd) and that
/// hold `/dev/fuse` open.
pub fn daemon_pids(mountpoint: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        if !args.iter().skip(1).any(|a| *a == b"mount") {
            continue;
        }
        let Some(last) = args.last() else { continue };
        let mut p = PathBuf::from(std::ffi::OsStr::from_bytes(last));
        if p.is_relative() {
            match std::fs::read_link(e.path().join("cwd")) {
                Ok(cwd) => p = cwd.join(p),
                Err(_) => continue,
            }
        }
        // No canonicalize: it could block on a hung mount. The daemon's own command
        // line always carries the canonical mountpoint.
        if p != mountpoint {
            continue;
        }
        let holds_fuse = std::fs::read_dir(e.path().join("fd"))
            .map(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path()).ok().as_deref() == Some(Path::new("/dev/fuse"))
                })
            })
            .unwrap_or(false);
        if holds_fuse {
            pids.push(pid);
        }
    }
    pids
}

/// Whether the daemon behind `mountpoint` answers: `statfs` always reaches the daemon
/// (unlike `stat`, which the kernel may answer from its cache) and fails with
/// ENOTCONN once the daemon is gone.
fn state(mountpoint: &Path) -> &'static str {
    let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return "error";
    };
    // SAFETY: c is a valid NUL-terminated path and st a writable statfs buffer.
    let rc = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st)
    };
    if rc == 0 {
        return "live";
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOTCONN) => "stale",
        _ => "error",
    }
}

/// The sockets of the snapfs services to ask: `explicit` (or `$SNAPFS_SERVICE`),
/// then every `snapfs serve` process found in `/proc` (its `--socket`, else
/// `--root`/snapfs.sock).
pub fn service_sockets(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = super::service_socket(explicit).into_iter().collect();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        if !e.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_snapfs = args.first().is_some_and(|a| {
            Path::new(std::ffi::OsStr::from_bytes(a))
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"snapfs"))
        });
        if !is_snapfs || args.get(1) != Some(&&b"serve"[..]) {
            continue;
        }
        let value = |flag: &[u8]| -> Option<PathBuf> {
            let mut it = args.iter();
            while let Some(a) = it.next() {
                if *a == flag {
                    return it
                        .next()
                        .map(|v| PathBuf::from(std::ffi::OsStr::from_bytes(v)));
                }
                if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix(b"=")) {
                    return Some(PathBuf::from(std::ffi::OsStr::from_bytes(v)));
                }
            }
            None
        };
        let socket = value(b"--socket")
            .or_else(|| value(b"--root").map(|r| crate::service::control::default_socket(&r)));
        let Some(mut socket) = socket else { continue };
        if socket.is_relative() {
            match std::fs::read_link(e.path().join("cwd")) {
                Ok(cwd) => socket = cwd.join(socket),
                Err(_) => continue,
            }
        }
        if !v.contains(&socket) {
            v.push(socket);
        }
    }
    v
}

/// A view of a service.
struct ServiceView {
    socket: PathBuf,
    pid: u32,
    info: ViewInfo,
}

/// The views of every service found; an unreachable `explicit` one is an error,
/// found ones that do not answer are skipped.
fn service_views(explicit: Option<&Path>) -> Result<Vec<ServiceView>> {
    let mut v = Vec::new();
    let named = super::service_socket(explicit);
    for socket in service_sockets(explicit) {
        let status = match client::call(&socket, &Request::Status {}) {
            Ok(r) => r.status,
            Err(e) if named.as_deref() == Some(socket.as_path()) => return Err(e),
            Err(_) => continue,
        };
        for info in status.iter().flat_map(|s| s.views.iter()) {
            v.push(ServiceView {
                socket: socket.clone(),
                pid: status.as_ref().map_or(0, |s| s.pid),
                info: info.clone(),
            });
        }
    }
    Ok(v)
}

fn state_name(s: ViewState) -> &'static str {
    match s {
        ViewState::Starting => "starting",
        ViewState::Live => "live",
        ViewState::Stopping => "stopping",
        ViewState::Failed => "failed",
    }
}

/// The inputs as `list` shows them: paths, an image as `IMAGE@REF`.
fn shown(archives: &[PathBuf], refs: &[Option<String>]) -> Vec<String> {
    archives
        .iter()
        .enumerate()
        .map(|(i, a)| match refs.get(i) {
            Some(Some(r)) => format!("{}@{r}", a.display()),
            _ => a.display().to_string(),
        })
        .collect()
}

/// Runs `snapfs list`: one tab-separated line per mount after a header:
/// mountpoint, daemon pid(s) (`-` if none; `service:PID` for a service's view),
/// state (`live`/`stale`, or a service view's `starting`/`failed`/...), archives.
/// With `-l`, between state and archives: the service's socket, the upper dir and
/// the bytes read from each archive (comma separated, archive order; `-` where
/// unknown).
pub fn run(args: ListArgs) -> Result<ExitCode> {
    let mut views = service_views(args.service.as_deref())?;
    let mut out = if args.long {
        String::from("MOUNTPOINT\tPID\tSTATE\tSERVICE\tUPPER\tBYTES_READ\tARCHIVES\n")
    } else {
        String::from("MOUNTPOINT\tPID\tSTATE\tARCHIVES\n")
    };
    let line = |out: &mut String,
                mp: &Path,
                pid: &str,
                state: &str,
                sv: Option<&ServiceView>,
                archives: Vec<String>| {
        out.push_str(&format!("{}\t{pid}\t{state}\t", mp.display()));
        if args.long {
            let dash = || "-".to_string();
            let socket = sv.map_or_else(dash, |v| v.socket.display().to_string());
            let upper = sv
                .and_then(|v| v.info.config.upper.as_ref())
                .map_or_else(dash, |u| u.display().to_string());
            let read = sv.map_or_else(dash, |v| {
                let n: Vec<String> = v
                    .info
                    .sources
                    .iter()
                    .map(|s| s.bytes_read.to_string())
                    .collect();
                n.join(",")
            });
            out.push_str(&format!("{socket}\t{upper}\t{read}\t"));
        }
        out.push_str(&archives.join(" "));
        out.push('\n');
    };
    for m in mounts()? {
        if let Some(i) = views
            .iter()
            .position(|v| v.info.config.mountpoint == m.mountpoint)
        {
            let v = views.remove(i);
            let pid = format!("service:{}", v.pid);
            line(
                &mut out,
                &m.mountpoint,
                &pid,
                state_name(v.info.state),
                Some(&v),
                shown(&m.archives, &m.refs),
            );
            continue;
        }
        let pids = daemon_pids(&m.mountpoint);
        // A found daemon holds the connection open, so the mount is live. Only a mount
        // without one is probed: a path lookup on a mount briefly pins it, and a
        // concurrent umount(2) of it would fail with EBUSY.
        let (pids, state) = if pids.is_empty() {
            ("-".to_string(), state(&m.mountpoint))
        } else {
            let p: Vec<String> = pids.iter().map(u32::to_string).collect();
            (p.join(","), "live")
        };
        line(
            &mut out,
            &m.mountpoint,
            &pids,
            state,
            None,
            shown(&m.archives, &m.refs),
        );
    }
    // Service views not mounted (failed, starting).
    for v in &views {
        let pid = format!("service:{}", v.pid);
        let c = &v.info.config;
        line(
            &mut out,
            &c.mountpoint,
            &pid,
            state_name(v.info.state),
            Some(v),
            shown(&c.layers, &[]),
        );
    }
    if let Some(cache) = crate::source::disk_cache() {
        let s = cache.summary();
        let lookups = s.hits + s.misses;
        let rate = match lookups {
            0 => "-".to_string(),
            n => format!("{:.1}%", s.hits as f64 * 100.0 / n as f64),
        };
        out.push_str(&format!(
            "# disk cache {}: {:.1} MiB in {} blocks, hit rate {rate} ({} of {lookups} block lookups)\n",
            cache.dir().display(),
            s.bytes as f64 / 1048576.0,
            s.blocks,
            s.hits,
        ));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_types_at_a_path_bottom_first() {
        let text = "36 35 98:0 / /mnt/a rw - ext4 /dev/x rw\n\
                    37 36 0:50 / /mnt/a ro - fuse.snapfs snapfs:/a.tar ro\n\
                    38 35 0:51 / /mnt/a\\040b rw - fuse.sshfs h:/ rw\n";
        assert_eq!(types_at(text, Path::new("/mnt/a")), ["ext4", "fuse.snapfs"]);
        assert_eq!(types_at(text, Path::new("/mnt/a b")), ["fuse.sshfs"]);
        assert!(types_at(text, Path::new("/mnt")).is_empty());
    }

    #[test]
    fn parses_snapfs_lines_only() {
        let text = "\
42 27 0:39 / /tmp/a\\040b ro,nosuid,nodev,noatime - fuse.snapfs snapfs:/srv/base.tar.gz:/srv/top.tar ro,user_id=0,group_id=0,default_permissions
43 27 0:40 / /mnt/other rw - fuse.sshfs host:/x rw,user_id=0
44 27 0:41 / /mnt/b rw,nosuid,nodev - fuse.snapfs snapfs:/srv/s.tar.zst rw,user_id=0,group_id=0,default_permissions,allow_other
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/tmp/a b"));
        assert_eq!(
            m[0].archives,
            vec![
                PathBuf::from("/srv/base.tar.gz"),
                PathBuf::from("/srv/top.tar")
            ]
        );
        assert!(m[1].options.contains("allow_other"));
        assert_eq!(m[1].archives, vec![PathBuf::from("/srv/s.tar.zst")]);
        assert_eq!(m[1].refs, vec![None]);
    }

    #[test]
    fn image_sources_round_trip_with_colons_and_ats() {
        let inputs: Vec<(&Path, Option<&str>)> = vec![
            (Path::new("/srv/app.tar"), Some("docker.io/library/app:1.0")),
            (Path::new("/srv/odd:name@x,y%.tar"), None),
            (Path::new("/srv/layout"), Some("sha256:abcd")),
        ];
        let s = source_name(&inputs);
        assert_eq!(s.matches(':').count(), 3, "{s}");
        assert!(!s.contains(','));
        let back = parse_source(s.as_bytes());
        assert_eq!(back.len(), 3);
        for ((p, r), (bp, br)) in inputs.iter().zip(&back) {
            assert_eq!(*p, bp.as_path());
            assert_eq!(r.map(str::to_string), *br);
        }
        let line = format!(
            "45 27 0:42 / /mnt/i ro - fuse.snapfs {} ro,user_id=0\n",
            s.replace(' ', "\\040")
        );
        let m = parse_mountinfo(&line);
        assert_eq!(m[0].refs[0].as_deref(), Some("docker.io/library/app:1.0"));
    }
}
