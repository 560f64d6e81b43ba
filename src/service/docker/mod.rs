//! Docker's volume plugin protocol, a thin adapter over the service's volumes
//! ([`super::volumes`]): HTTP/1.1 POSTs with JSON bodies on a Unix socket
//! (`/run/docker/plugins/NAME.sock` by default), answered with
//! `application/vnd.docker.plugins.v1+json`. Plugin.Activate, VolumeDriver.Create,
//! Remove, Mount, Unmount, Path, Get, List and Capabilities (scope `local`); a
//! refusal is `{"Err": "one line"}`. [`api`] is the other direction: the few engine
//! calls that `snapfs volume snapshot --pause` makes.

pub mod api;
pub mod http;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use super::Service;
use crate::error::{Error, Result};

/// Where Docker looks for plugin sockets.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// A listening plugin socket.
pub struct Plugin {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The socket of plugin `name` in `dir`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// A plugin name: it names a socket file and Docker's driver (`-d NAME`).
pub fn check_plugin_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !name.starts_with('.');
    if !ok {
        return Err(Error::Usage(format!(
            "bad Docker plugin name {name:?}: letters, digits, '_', '.', '-'"
        )));
    }
    Ok(())
}

impl Plugin {
    /// Listens on `DIR/NAME.sock` for Docker. A socket left by a dead service is
    /// replaced; one that answers is another plugin's ([`Error::InUse`]).
    pub fn bind(service: Service, dir: &Path, name: &str) -> Result<Plugin> {
        check_plugin_name(name)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        let socket = socket_path(dir, name);
        match std::fs::symlink_metadata(&socket) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(&socket).is_ok() {
                    return Err(Error::InUse {
                        path: socket,
                        holder: "another Docker plugin".into(),
                    });
                }
                std::fs::remove_file(&socket)
                    .map_err(|e| Error::io("cannot remove stale socket", &socket, e))?;
            }
            Ok(_) => {
                return Err(Error::NotA {
                    path: socket,
                    expected: "socket",
                    detail: Some("something else is there; choose another plugin name".into()),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("cannot use socket", &socket, e)),
        }
        let listener =
            UnixListener::bind(&socket).map_err(|e| Error::io("cannot listen on", &socket, e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("cannot set the mode of", &socket, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("docker-plugin".into())
            .spawn(move || accept(listener, service, flag))
            .map_err(|e| Error::io("cannot start a thread for", &socket, e))?;
        Ok(Plugin {
            socket,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops listening and removes the socket file.
    pub fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
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
                    .name("docker-conn".into())
                    .spawn(move || serve(stream, &service));
                if let Err(e) = spawned {
                    log::error!("cannot serve a Docker plugin connection: {e}");
                }
            }
            Err(e) => {
                log::warn!("Docker plugin socket: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Answers the requests of one connection (keep-alive) until it closes.
fn serve(stream: UnixStream, service: &Service) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let msg = match http::read_message(&mut reader, false) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                log::info!("Docker plugin: {e}");
                let body = json!({"Err": e.to_string()}).to_string();
                let _ = http::write_response(
                    &mut writer,
                    "400 Bad Request",
                    CONTENT_TYPE,
                    body.as_bytes(),
                );
                return;
            }
        };
        let (_, path) = msg.request_line();
        let answer = match panic::catch_unwind(AssertUnwindSafe(|| route(service, path, &msg.body)))
        {
            Ok(v) => v,
            Err(_) => json!({"Err": "internal error: the request panicked"}),
        };
        let body = answer.to_string();
        if http::write_response(&mut writer, "200 OK", CONTENT_TYPE, body.as_bytes()).is_err()
            || msg.closes()
        {
            return;
        }
    }
}

fn field<'a>(req: &'a Value, name: &str) -> Result<&'a str> {
    req[name]
        .as_str()
        .ok_or_else(|| Error::Service(format!("bad plugin request: no {name:?}")))
}

/// The answer to one plugin call: its JSON, `{"Err": ...}` if refused.
pub fn route(service: &Service, path: &str, body: &[u8]) -> Value {
    let req: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return json!({"Err": format!("bad plugin request: {e}")}),
        }
    };
    match call(service, path, &req) {
        Ok(v) => v,
        Err(e) => {
            log::info!("Docker {path} refused: {e}");
            json!({"Err": e.to_string()})
        }
    }
}

fn call(service: &Service, path: &str, req: &Value) -> Result<Value> {
    Ok(match path {
        "/Plugin.Activate" => json!({"Implements": ["VolumeDriver"]}),
        "/VolumeDriver.Capabilities" => json!({"Capabilities": {"Scope": "local"}}),
        "/VolumeDriver.Create" => {
            let name = field(req, "Name")?;
            let mut opts = BTreeMap::new();
            if let Some(o) = req["Opts"].as_object() {
                for (k, v) in o {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    opts.insert(k.clone(), v);
                }
            }
            service.volume_create(name, &opts)?;
            json!({"Err": ""})
        }
        "/VolumeDriver.Remove" => {
            service.volume_remove(field(req, "Name")?)?;
            json!({"Err": ""})
        }
        "/VolumeDriver.Mount" => {
            let mp = service.volume_mount(field(req, "Name")?, field(req, "ID")?)?;
            json!({"Mountpoint": mp, "Err": ""})
        }
        "/VolumeDriver.Unmount" => {
            service.volume_unmount(field(req, "Name")?, field(req, "ID")?)?;
            json!({"Err": ""})
        }
        "/VolumeDriver.Path" => {
            let v = service.volume_inspect(field(req, "Name")?)?;
            json!({"Mountpoint": if v.mounted { v.mountpoint.display().to_string() } else { String::new() }, "Err": ""})
        }
        "/VolumeDriver.Get" => {
            let v = service.volume_inspect(field(req, "Name")?)?;
            json!({"Volume": volume_json(&v), "Err": ""})
        }
        "/VolumeDriver.List" => {
            let all: Vec<Value> = service.volume_list().iter().map(volume_json).collect();
            json!({"Volumes": all, "Err": ""})
        }
        other => return Err(Error::Service(format!("unknown plugin call {other:?}"))),
    })
}

fn volume_json(v: &super::volumes::VolumeInfo) -> Value {
    let mut status = serde_json::Map::new();
    status.insert("snapshot".into(), json!(v.volume.snapshot));
    status.insert("writable".into(), json!(v.volume.writable));
    status.insert("users".into(), json!(v.volume.mounts.len()));
    if let Some(u) = &v.upper {
        status.insert("upper".into(), json!(u));
    }
    if !v.volume.pre_restore.is_empty() {
        let kept: Vec<&str> = v
            .volume
            .pre_restore
            .iter()
            .map(|p| p.snapshot.as_str())
            .collect();
        status.insert("pre_restore".into(), json!(kept));
    }
    json!({
        "Name": v.volume.name,
        "Mountpoint": if v.mounted { v.mountpoint.display().to_string() } else { String::new() },
        "Status": status,
    })
}
