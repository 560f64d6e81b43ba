//! The mount(8) helper: glue that lets `mount -t fuse.snapfs SOURCE DIR` and fstab
//! lines work. mount(8) runs `/sbin/mount.fuse.snapfs SOURCE DIR [-sfnv] [-o OPTS]`;
//! when the snapfs binary is invoked under that name (install: a symlink), the
//! arguments are translated into `snapfs mount [-o OPTS] ARCHIVE... DIR`.
//!
//! SOURCE is one archive, or several layers (bottom first) separated by `:` when
//! SOURCE itself is not an existing file. snapfs options ride in `-o`
//! (`upper=DIR`, `uid_map=C:H:N`, `owner=U:G`, `cache_size=`, ...; see
//! `mount::fold_options`); mount(8)'s own options (`defaults`, `noauto`, `user`,
//! `_netdev`, `x-*`, ...) are dropped.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use crate::error::{Error, Result};

/// Names under which the binary acts as the mount helper.
const NAMES: [&str; 2] = ["mount.fuse.snapfs", "mount.snapfs"];

/// Whether `argv0` names the mount helper.
pub fn invoked_as_helper(argv0: &OsString) -> bool {
    Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| NAMES.contains(&n))
}

/// Translates mount(8) helper arguments into `snapfs mount` arguments; `None` for a
/// fake mount (`-f`), which must do nothing.
pub fn translate(args: &[OsString]) -> Result<Option<Vec<OsString>>> {
    let usage = || {
        Error::Usage(
            "usage: mount.fuse.snapfs ARCHIVE[:ARCHIVE...] MOUNTPOINT [-o OPTIONS]".to_string(),
        )
    };
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut fake = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let b = a.as_bytes();
        match b {
            b"-o" => options.push(it.next().ok_or_else(usage)?.clone()),
            b"-t" | b"-N" => {
                it.next().ok_or_else(usage)?;
            }
            _ if b.starts_with(b"-o") => options.push(OsString::from_vec(b[2..].to_vec())),
            _ if b.starts_with(b"-") && b.len() > 1 => {
                for flag in &b[1..] {
                    match flag {
                        b'f' => fake = true,
                        b'n' | b's' | b'v' => {}
                        _ => {
                            return Err(Error::Usage(format!(
                                "mount.fuse.snapfs: unknown flag -{}",
                                char::from(*flag)
                            )))
                        }
                    }
                }
            }
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        return Err(usage());
    };
    if fake {
        return Ok(None);
    }
    let mut out: Vec<OsString> = vec!["snapfs".into(), "mount".into()];
    for o in options {
        out.push("-o".into());
        out.push(o);
    }
    if Path::new(source).is_file() {
        out.push(source.clone());
    } else {
        for layer in source.as_bytes().split(|c| *c == b':') {
            if layer.is_empty() {
                return Err(Error::Usage(format!(
                    "mount.fuse.snapfs: empty layer in source {}",
                    Path::new(source).display()
                )));
            }
            out.push(OsString::from_vec(layer.to_vec()));
        }
    }
    out.push(mountpoint.clone());
    Ok(Some(out))
}

/// Runs as the mount helper with the arguments after argv[0].
pub fn run(args: &[OsString]) -> Result<ExitCode> {
    let Some(argv) = translate(args)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let cli = super::Cli::try_parse_from(argv).map_err(|e| {
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or("bad arguments").trim();
        Error::Usage(format!(
            "mount.fuse.snapfs: {}",
            first.trim_start_matches("error: ")
        ))
    })?;
    cli.remote.apply()?;
    super::dispatch_local(cli.command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn translates_mount_arguments() {
        let t = translate(&v(&[
            "/nonexistent/a.tar.gz:/nonexistent/b.tar",
            "/mnt/x",
            "-n",
            "-o",
            "rw,allow_other,upper=/u",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            t,
            v(&[
                "snapfs",
                "mount",
                "-o",
                "rw,allow_other,upper=/u",
                "/nonexistent/a.tar.gz",
                "/nonexistent/b.tar",
                "/mnt/x"
            ])
        );
        assert_eq!(translate(&v(&["a", "b", "-f"])).unwrap(), None);
        assert!(translate(&v(&["a"])).is_err());
        assert!(translate(&v(&["a::b", "/m"])).is_err());
        assert!(invoked_as_helper(&"/sbin/mount.fuse.snapfs".into()));
        assert!(!invoked_as_helper(&"/usr/bin/snapfs".into()));
    }
}
