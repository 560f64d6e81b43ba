//! The little HTTP/1.1 that Docker's plugin protocol and engine API need over a Unix
//! socket: one message read (request or response head, then a body by
//! `Content-Length`, chunked, or until EOF), one written. Bodies are small JSON; sizes
//! are capped.

use std::io::{BufRead, BufReader, Read, Write};

use crate::error::{Error, Result};

/// The longest head read.
const MAX_HEAD: usize = 64 << 10;
/// The longest body read.
pub const MAX_BODY: u64 = 16 << 20;

/// A message read: its first line, headers (names lowercased) and body.
#[derive(Debug, Default)]
pub struct Message {
    /// `POST /Plugin.Activate HTTP/1.1` or `HTTP/1.1 200 OK`.
    pub start: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Message {
    /// The header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The request's method and path (without a query).
    pub fn request_line(&self) -> (&str, &str) {
        let mut it = self.start.split(' ');
        let method = it.next().unwrap_or("");
        let target = it.next().unwrap_or("");
        (method, target.split('?').next().unwrap_or(""))
    }

    /// A response's status code (0 if unreadable).
    pub fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the peer wants the connection closed after this message.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || self.start.ends_with("HTTP/1.0")
    }
}

fn bad(what: String) -> Error {
    Error::Service(format!("bad HTTP message: {what}"))
}

/// Reads one message; `Ok(None)` at a clean EOF before it. A body without a length
/// is read to EOF only if `to_eof` (a response), else it is empty (a request).
pub fn read_message<R: Read>(r: &mut BufReader<R>, to_eof: bool) -> Result<Option<Message>> {
    let mut m = Message::default();
    let mut head = 0usize;
    loop {
        let mut line = String::new();
        let n = r
            .by_ref()
            .take((MAX_HEAD - head.min(MAX_HEAD)) as u64 + 1)
            .read_line(&mut line)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        if n == 0 {
            if head == 0 {
                return Ok(None);
            }
            return Err(bad("connection closed in the head".into()));
        }
        head += n;
        if head > MAX_HEAD {
            return Err(bad(format!("head longer than {MAX_HEAD} bytes")));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if m.start.is_empty() {
            if line.is_empty() {
                continue;
            }
            m.start = line.to_string();
            continue;
        }
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("header line {line:?}")))?;
        m.headers
            .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let chunked = m
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let mut line = String::new();
            r.by_ref()
                .take(1024)
                .read_line(&mut line)
                .map_err(|e| bad(format!("cannot read a chunk: {e}")))?;
            let size = line.trim().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| bad(format!("chunk size {:?}", line.trim())))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    let n = r.by_ref().take(8192).read_line(&mut t).unwrap_or(0);
                    if n == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            if m.body.len() as u64 + size > MAX_BODY {
                return Err(bad(format!("body longer than {MAX_BODY} bytes")));
            }
            let start = m.body.len();
            m.body.resize(start + size as usize, 0);
            r.read_exact(&mut m.body[start..])
                .and_then(|_| {
                    let mut crlf = [0u8; 2];
                    r.read_exact(&mut crlf)
                })
                .map_err(|e| bad(format!("cannot read a chunk: {e}")))?;
        }
    } else if let Some(len) = m.header("content-length") {
        let len: u64 = len
            .parse()
            .map_err(|_| bad(format!("Content-Length {len:?}")))?;
        if len > MAX_BODY {
            return Err(bad(format!("body longer than {MAX_BODY} bytes")));
        }
        m.body.resize(len as usize, 0);
        r.read_exact(&mut m.body)
            .map_err(|e| bad(format!("cannot read the body: {e}")))?;
    } else if to_eof {
        r.by_ref()
            .take(MAX_BODY)
            .read_to_end(&mut m.body)
            .map_err(|e| bad(format!("cannot read the body: {e}")))?;
    }
    Ok(Some(m))
}

/// Writes a 200 response carrying `body` of `content_type`.
pub fn write_response<W: Write>(
    w: &mut W,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// `s` percent-encoded for a URL query value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_chunked_responses_parse() {
        let req = b"POST /VolumeDriver.Mount HTTP/1.1\r\nHost: plugin\r\nContent-Length: 13\r\n\r\n{\"Name\":\"v\"}\nPOST /x HTTP/1.1\r\n\r\n";
        let mut r = BufReader::new(&req[..]);
        let m = read_message(&mut r, false).unwrap().unwrap();
        assert_eq!(m.request_line(), ("POST", "/VolumeDriver.Mount"));
        assert_eq!(m.body, b"{\"Name\":\"v\"}\n");
        let m = read_message(&mut r, false).unwrap().unwrap();
        assert_eq!(m.request_line(), ("POST", "/x"));
        assert!(m.body.is_empty());
        assert!(read_message(&mut r, false).unwrap().is_none());
        let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        let m = read_message(&mut BufReader::new(&resp[..]), true)
            .unwrap()
            .unwrap();
        assert_eq!(m.status(), 200);
        assert_eq!(m.body, b"[1,2]");
        let e = read_message(
            &mut BufReader::new(&b"GET / HTTP/1.1\r\nbad\r\n\r\n"[..]),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("header line"), "{e}");
        assert_eq!(
            query_escape("{\"volume\":[\"a b\"]}"),
            "%7B%22volume%22%3A%5B%22a%20b%22%5D%7D"
        );
    }
}
