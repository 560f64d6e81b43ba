//! The client side of the control socket: one request, one response. Used by
//! `snapfs mount --service`, `snapfs umount` and `snapfs list`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{self, Request, Response};
use crate::error::{Error, Result};

/// How long a request other than `add` may take to be answered.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// The longest response read (a status of many views).
const MAX_RESPONSE: u64 = 256 << 20;

/// Sends `request` to the service listening on `socket` and returns its answer; an
/// error response is an [`Error::Daemon`] carrying the service's line.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| Error::io("cannot reach the snapfs service at", socket, e))?;
    // Adding a view may build an index of a large archive: no bound. The other
    // requests are quick; a service that hangs must not hang `list` or `umount`.
    if !matches!(request, Request::Add { .. }) {
        stream
            .set_read_timeout(Some(ANSWER_WITHIN))
            .map_err(|e| Error::io("cannot talk to the snapfs service at", socket, e))?;
    }
    stream
        .write_all(&protocol::encode(request)?)
        .map_err(|e| Error::io("cannot talk to the snapfs service at", socket, e))?;
    let mut line = Vec::new();
    BufReader::new(&stream)
        .take(MAX_RESPONSE)
        .read_until(b'\n', &mut line)
        .map_err(|e| Error::io("no answer from the snapfs service at", socket, e))?;
    if line.is_empty() {
        return Err(Error::Daemon(format!(
            "the snapfs service at {} closed the connection without answering",
            socket.display()
        )));
    }
    let response: Response = serde_json::from_slice(&line).map_err(|e| {
        Error::Daemon(format!(
            "the snapfs service at {} answered something else than a response: {e}",
            socket.display()
        ))
    })?;
    response.into_result()
}
