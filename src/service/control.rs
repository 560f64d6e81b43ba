//! The control socket: a Unix stream socket (mode 0600) on which the service reads
//! one JSON request per line and writes one JSON response per line
//! ([`protocol`](super::protocol)). Each connection gets a thread; a bad request gets
//! an error response and the connection (and the service) carries on. A thin
//! adapter: every request goes to [`Service::handle`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::protocol::{self, Response};
use super::Service;
use crate::error::{Error, Result};

/// The longest request line read.
pub const MAX_REQUEST: u64 = 1 << 20;

/// The default socket of a service rooted at `root`.
pub fn default_socket(root: &Path) -> PathBuf {
    root.join("snapfs.sock")
}

/// A listening control socket.
pub struct Control {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Control {
    /// Listens on `socket` for requests to `service`. A socket file left by a dead
    /// service is replaced; one that answers belongs to a running service
    /// ([`Error::InUse`]).
    pub fn bind(service: Service, socket: &Path) -> Result<Control> {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("cannot create the directory of", socket, e))?;
        }
        match std::fs::symlink_metadata(socket) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(socket).is_ok() {
                    return Err(Error::InUse {
                        path: socket.to_path_buf(),
                        holder: "another snapfs service".into(),
                    });
                }
                std::fs::remove_file(socket)
                    .map_err(|e| Error::io("cannot remove stale socket", socket, e))?;
            }
            Ok(_) => {
                return Err(Error::NotA {
                    path: socket.to_path_buf(),
                    expected: "socket",
                    detail: Some("something else is there; choose another --socket".into()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("cannot use socket", socket, e)),
        }
        let listener =
            UnixListener::bind(socket).map_err(|e| Error::io("cannot listen on", socket, e))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("cannot set the mode of", socket, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept(listener, service, flag))
            .map_err(|e| Error::io("cannot start a thread for", socket, e))?;
        Ok(Control {
            socket: socket.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops listening and removes the socket file (connections being served finish
    /// their current request).
    pub fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn accept(listener: UnixListener, service: Service, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => {
                let service = service.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve(stream, &service));
                if let Err(e) = spawned {
                    log::error!("cannot serve a control connection: {e}");
                }
            }
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                log::warn!("control socket: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Answers the requests of one connection until it closes.
fn serve(stream: UnixStream, service: &Service) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_REQUEST + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() as u64 > MAX_REQUEST;
        let response = if too_long {
            Response::error(&Error::Service(format!(
                "bad request: longer than {MAX_REQUEST} bytes"
            )))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            answer(service, &line)
        };
        let bytes = protocol::encode(&response).unwrap_or_else(|_| {
            b"{\"ok\":false,\"error\":\"internal error: cannot encode the response\"}\n".to_vec()
        });
        if writer.write_all(&bytes).is_err() || too_long {
            return;
        }
    }
}

/// The response to one request line; a panic while serving it is an error response.
fn answer(service: &Service, line: &[u8]) -> Response {
    let request = match protocol::parse(line) {
        Ok(r) => r,
        Err(e) => return Response::error(&e),
    };
    match panic::catch_unwind(AssertUnwindSafe(|| service.handle(request))) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            log::info!("request refused: {e}");
            Response::error(&e)
        }
        Err(_) => {
            log::error!("a control request panicked");
            Response::error(&Error::Internal("the request panicked".into()))
        }
    }
}
