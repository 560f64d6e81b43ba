//! `snapfs serve`: glue that runs a [`Service`] on `--root` and its control socket,
//! in the foreground, until SIGTERM/SIGINT/SIGHUP: then every view is unmounted (and
//! stays recorded, so the next `snapfs serve --root` mounts it again), the socket
//! and the pid file are removed, and the process exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::error::{Error, Result};
use crate::service::containerd::server::Server as ContainerdServer;
use crate::service::containerd::snapshotter::Snapshotter;
use crate::service::control::{self, Control};
use crate::service::docker::{self, Plugin};
use crate::service::{Service, ServiceConfig};

/// Arguments of `snapfs serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The service's directory: its state (the views it serves), its lock and, by
    /// default, its socket (created if missing).
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// The control socket [default: DIR/snapfs.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Memory for decompressed data of all views together: one span cache and the
    /// service's buffers [default: 256M].
    #[arg(long, value_parser = super::parse_size)]
    cache_size: Option<u64>,
    /// FUSE worker threads of each view (unless the view says) [default: as `mount`
    /// picks them: one per core (2 to 8) for a read-only view of local archives, 8
    /// for a writable view or a remote source].
    #[arg(long)]
    threads: Option<usize>,
    /// Stay in the foreground (the default: the service never detaches; run it
    /// under systemd or `&`).
    #[arg(short, long)]
    foreground: bool,
    /// Write the service's pid to FILE once it answers requests (removed on exit).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Also serve containerd's snapshots API (a proxy plugin) on this socket: the
    /// address of `[proxy_plugins.snapfs]` in containerd's config.toml.
    #[arg(long, value_name = "SOCKET")]
    containerd: Option<PathBuf>,
    /// containerd's own socket, for its content store.
    #[arg(
        long,
        value_name = "PATH",
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd_address: PathBuf,
    /// Also serve Docker's volume plugin protocol as driver NAME, on
    /// DIR/NAME.sock (`docker volume create -d NAME`); the socket goes with the service.
    #[arg(long, value_name = "NAME")]
    docker_plugin: Option<String>,
    /// Where the Docker plugin socket goes.
    #[arg(long, value_name = "DIR", default_value = docker::PLUGIN_DIR, requires = "docker_plugin")]
    docker_plugin_dir: PathBuf,
}

/// Runs `snapfs serve`.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    // The service never detaches; -f is accepted for symmetry with `mount`.
    let _ = args.foreground;
    crate::cache::return_freed_buffers_to_kernel();
    // Before any thread starts: every thread inherits the blocked set, and one
    // waits for the signals below.
    super::mount::block_signals();
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| control::default_socket(&args.root));
    let socket = absolute(socket)?;
    if let Some(name) = &args.docker_plugin {
        docker::check_plugin_name(name)?;
    }
    let service = Service::start(ServiceConfig {
        root: args.root.clone(),
        cache_bytes: super::mount::default_cache_bytes(args.cache_size),
        threads: args.threads,
    })?;
    let mut fronts = FrontEnds::default();
    if let Err(e) = fronts.start(&service, &args, &socket) {
        fronts.close(&service);
        return Err(e);
    }
    if let Some(f) = &args.pid_file {
        if let Err(e) = std::fs::write(f, format!("{}\n", std::process::id())) {
            fronts.close(&service);
            return Err(Error::io("cannot write pid file", f, e));
        }
    }
    log::info!(
        "snapfs service on {} answers on {} (pid {})",
        service.root().display(),
        socket.display(),
        std::process::id()
    );
    super::mount::wait_for_signal();
    log::info!("signal received: unmounting every view");
    fronts.close(&service);
    if let Some(f) = &args.pid_file {
        let _ = std::fs::remove_file(f);
    }
    Ok(ExitCode::SUCCESS)
}

/// The service's front-ends: containerd's snapshots API and Docker's volume plugin when
/// asked for, then the control socket. Whatever started is closed, in reverse.
#[derive(Default)]
struct FrontEnds {
    snapshots: Option<ContainerdServer>,
    control: Option<Control>,
    plugin: Option<Plugin>,
}

impl FrontEnds {
    fn start(
        &mut self,
        service: &Service,
        args: &ServeArgs,
        socket: &std::path::Path,
    ) -> Result<()> {
        if let Some(sock) = &args.containerd {
            let sn = Snapshotter::open(service.clone())?;
            self.snapshots = Some(ContainerdServer::start(
                sn,
                &absolute(sock.clone())?,
                &args.containerd_address,
            )?);
        }
        if let Some(name) = &args.docker_plugin {
            self.plugin = Some(Plugin::bind(
                service.clone(),
                &args.docker_plugin_dir,
                name,
            )?);
        }
        // Last: a client that gets an answer here finds every other front-end up.
        self.control = Some(Control::bind(service.clone(), socket)?);
        Ok(())
    }

    /// Closes the front-ends, then unmounts every view.
    fn close(&mut self, service: &Service) {
        if let Some(c) = self.control.take() {
            c.close();
        }
        if let Some(p) = self.plugin.take() {
            p.close();
        }
        if let Some(s) = self.snapshots.take() {
            s.close();
        }
        service.shutdown();
    }
}

fn absolute(p: PathBuf) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p);
    }
    Ok(std::env::current_dir()
        .map_err(|e| Error::io("cannot resolve", &p, e))?
        .join(p))
}
