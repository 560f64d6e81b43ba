//! Runs a decompressing reader on its own thread and hands its output to the caller
//! in large buffers, so inflating and tar parsing use both cores during indexing.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

const CHUNK: usize = 1 << 20;
const DEPTH: usize = 4;

/// The consuming end: a `Read` over the producer's buffers.
pub struct PipeReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    /// Drained buffers go back to the producer (no fresh zeroed 1 MiB per chunk).
    back: std::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

/// Starts reading `inner` on a new thread. The handle gives `inner` back once the
/// producer hit its end, an error, or the [`PipeReader`] was dropped.
pub fn spawn<R: Read + Send + 'static>(mut inner: R) -> (PipeReader, JoinHandle<R>) {
    let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
    let (back, returned) = std::sync::mpsc::channel::<Vec<u8>>();
    let handle = std::thread::spawn(move || {
        loop {
            let mut buf = returned.try_recv().unwrap_or_default();
            buf.resize(CHUNK, 0);
            let mut filled = 0;
            let result = loop {
                match inner.read(&mut buf[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(filled);
            let last = filled == 0 || result.is_err();
            let msg = match result {
                Ok(()) => Ok(buf),
                Err(e) => Err(e),
            };
            if filled == 0 && msg.is_ok() {
                break;
            }
            if tx.send(msg).is_err() || last {
                break;
            }
        }
        inner
    });
    (
        PipeReader {
            rx,
            back,
            buf: Vec::new(),
            pos: 0,
            done: false,
        },
        handle,
    )
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    let old = std::mem::replace(&mut self.buf, buf);
                    if old.capacity() > 0 {
                        let _ = self.back.send(old);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_everything_through_and_returns_the_reader() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, h) = spawn(io::Cursor::new(data.clone()));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let inner = h.join().unwrap();
        assert_eq!(inner.position(), data.len() as u64);
    }

    #[test]
    fn dropping_the_reader_stops_the_producer() {
        let data = vec![7u8; 20 << 20];
        let (mut r, h) = spawn(io::Cursor::new(data));
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        drop(r);
        let inner = h.join().unwrap();
        assert!(inner.position() < 20 << 20);
    }
}
