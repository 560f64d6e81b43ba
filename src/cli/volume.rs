//! `snapfs volume`: glue that asks the service (`--service SOCKET`, `$SNAPFS_SERVICE`,
//! or `--root DIR` for `DIR/snapfs.sock`) about its Docker volumes: `ls`, `inspect`,
//! `snapshot` (with `--pause`, the containers using the volume are paused through
//! the Docker API for the cut and unpaused after it) and `restore`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::error::{Error, Result};
use crate::service::client;
use crate::service::control;
use crate::service::docker::api::{self, Engine};
use crate::service::protocol::Request;
use crate::service::volumes::VolumeInfo;

/// Arguments of `snapfs volume`.
#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// The snapfs service's control socket [default: $SNAPFS_SERVICE, or
    /// DIR/snapfs.sock with --root DIR].
    #[arg(long, value_name = "SOCKET", global = true)]
    service: Option<PathBuf>,
    /// The service's root (its socket is DIR/snapfs.sock).
    #[arg(long, value_name = "DIR", global = true)]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// List the volumes: name, users, snapshot, upper dir.
    Ls,
    /// Show one volume as JSON: snapshot, upper dir, users, kept pre-restore snapshots.
    Inspect {
        /// The volume.
        name: String,
    },
    /// Cut a volume's changes (a delta on its snapshot), or with --full the whole
    /// volume, to OUT (.tar, .tar.gz, .tar.zst). Refused while a container using it
    /// runs, unless --pause.
    Snapshot {
        /// The volume.
        name: String,
        /// The snapshot to write.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// A standalone snapshot of the whole volume instead of a delta.
        #[arg(long)]
        full: bool,
        /// Pause the running containers that use the volume (Docker API) for the cut.
        #[arg(long)]
        pause: bool,
        /// The Docker engine for --pause [default: $DOCKER_HOST, else
        /// unix:///var/run/docker.sock].
        #[arg(long, value_name = "unix://PATH")]
        docker_host: Option<String>,
    },
    /// Point a volume at another snapshot (`a:b:c` for a stack) for its next use; the
    /// old state is cut first and kept as a pre-restore snapshot (printed).
    Restore {
        /// The volume.
        name: String,
        /// The snapshot.
        snapshot: String,
    },
}

/// Runs `snapfs volume`.
pub fn run(args: VolumeArgs) -> Result<ExitCode> {
    let socket = super::service_socket(args.service.as_deref())
        .or_else(|| args.root.as_deref().map(control::default_socket))
        .ok_or_else(|| {
            Error::Usage(
                "snapfs volume needs the service: --service SOCKET, $SNAPFS_SERVICE or --root DIR"
                    .into(),
            )
        })?;
    match args.command {
        VolumeCommand::Ls => {
            let r = client::call(&socket, &Request::VolumeList {})?;
            println!("NAME\tUSERS\tMOUNTED\tSNAPSHOT\tUPPER\tPRE-RESTORE");
            for v in r.volume_list.unwrap_or_default() {
                println!("{}", row(&v));
            }
        }
        VolumeCommand::Inspect { name } => {
            let r = client::call(&socket, &Request::VolumeInspect { name })?;
            let text = serde_json::to_string_pretty(&r.volume)
                .map_err(|e| Error::Internal(format!("cannot encode: {e}")))?;
            println!("{text}");
        }
        VolumeCommand::Snapshot {
            name,
            output,
            full,
            pause,
            docker_host,
        } => {
            let output = absolute(&output)?;
            let req = |paused| Request::VolumeSnapshot {
                name: name.clone(),
                output: output.clone(),
                full,
                paused,
            };
            let r = if pause {
                let host = docker_host
                    .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
                    .unwrap_or_else(|| api::DEFAULT_HOST.to_string());
                paused(&Engine::new(&host)?, &name, || {
                    client::call(&socket, &req(true))
                })?
            } else {
                client::call(&socket, &req(false))?
            };
            let c = r.cut.unwrap_or_default();
            println!(
                "{} ({}): sha256:{}  {} entries  {} bytes  {} ms",
                c.path.unwrap_or_default().display(),
                c.kind,
                c.sha256,
                c.entries,
                c.bytes,
                c.millis
            );
        }
        VolumeCommand::Restore { name, snapshot } => {
            let snapshot = snapshot
                .split(':')
                .map(|p| absolute(Path::new(p)).map(|p| p.display().to_string()))
                .collect::<Result<Vec<_>>>()?
                .join(":");
            let r = client::call(&socket, &Request::VolumeRestore { name, snapshot })?;
            let c = r.cut.unwrap_or_default();
            // The kept state, as `restore` and `-o snapshot=` take it.
            println!("{}", c.pre_restore.unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `f` with the running containers that use volume `name` paused; they are
/// unpaused afterwards whatever `f` did.
fn paused<T>(engine: &Engine, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let ids = engine.running_with_volume(name)?;
    let mut done = Vec::new();
    let mut result = Ok(());
    for id in &ids {
        match engine.pause(id) {
            Ok(()) => done.push(id),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let out = result.and_then(|()| f());
    for id in done {
        if let Err(e) = engine.unpause(id) {
            eprintln!("snapfs: cannot unpause container {id}: {e}");
        }
    }
    out
}

fn row(v: &VolumeInfo) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        v.volume.name,
        v.volume.mounts.len(),
        if v.mounted { "yes" } else { "no" },
        v.volume.snapshot,
        v.upper
            .as_ref()
            .map_or_else(|| "-".to_string(), |u| u.display().to_string()),
        v.volume.pre_restore.len()
    )
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(|e| Error::io("cannot resolve", p, e))?
        .join(p))
}
