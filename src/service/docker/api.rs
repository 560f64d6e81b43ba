//! The few Docker engine API calls `snapfs volume snapshot --pause` makes, over the
//! engine's Unix socket (`--docker-host unix://...` or `$DOCKER_HOST`): the running
//! containers that use a volume, and pause / unpause.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::http;
use crate::error::{Error, Result};

/// The default engine socket.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// A Docker engine reached on a Unix socket.
pub struct Engine {
    socket: PathBuf,
}

impl Engine {
    /// The engine at `host` (`unix:///path`; other schemes are refused).
    pub fn new(host: &str) -> Result<Engine> {
        let path = host
            .strip_prefix("unix://")
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "docker host {host:?}: snapfs reaches Docker only on a Unix socket (unix:///path)"
                ))
            })?;
        Ok(Engine {
            socket: PathBuf::from(path),
        })
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn call(&self, method: &str, target: &str) -> Result<(u16, Vec<u8>)> {
        let err = |e| Error::io("cannot talk to Docker at", &self.socket, e);
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| Error::io("cannot reach Docker at", &self.socket, e))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(err)?;
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).map_err(err)?;
        let m = http::read_message(&mut BufReader::new(&s), true)?.ok_or_else(|| {
            Error::Daemon(format!(
                "Docker at {} closed the connection without answering",
                self.socket.display()
            ))
        })?;
        Ok((m.status(), m.body))
    }

    fn expect(&self, method: &str, target: &str, ok: &[u16]) -> Result<Vec<u8>> {
        let (status, body) = self.call(method, target)?;
        if !ok.contains(&status) {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(Error::Daemon(format!(
                "Docker refused {method} {target}: {status} {msg}"
            )));
        }
        Ok(body)
    }

    /// IDs of the running containers that mount volume `name`.
    pub fn running_with_volume(&self, name: &str) -> Result<Vec<String>> {
        let filters = serde_json::json!({"volume": [name], "status": ["running"]}).to_string();
        let body = self.expect(
            "GET",
            &format!("/containers/json?filters={}", http::query_escape(&filters)),
            &[200],
        )?;
        let list: Vec<serde_json::Value> = serde_json::from_slice(&body)
            .map_err(|e| Error::Daemon(format!("Docker's container list is unreadable: {e}")))?;
        Ok(list
            .iter()
            .filter_map(|c| c["Id"].as_str().map(String::from))
            .collect())
    }

    /// Pauses container `id`.
    pub fn pause(&self, id: &str) -> Result<()> {
        self.expect("POST", &format!("/containers/{id}/pause"), &[204, 304])
            .map(drop)
    }

    /// Unpauses container `id`.
    pub fn unpause(&self, id: &str) -> Result<()> {
        self.expect("POST", &format!("/containers/{id}/unpause"), &[204, 304])
            .map(drop)
    }
}
