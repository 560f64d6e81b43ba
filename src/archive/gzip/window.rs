//! Sparse checkpoint windows: which bytes of a seek point's 32 KiB window its span
//! actually reads, and the stored (deflated) form of a window.
//!
//! A deflate back-reference reaches at most 32 KiB back, so only the first
//! 32 KiB + 258 bytes of a span's output can copy from the window before the span.
//! Most spans read a small part of it. The indexer keeps the compressed input and the
//! output of that prefix ([`WindowProbe`]) and decodes it twice more with marker
//! windows: window byte `p` set to `p & 0xFF`, then to `(p >> 8) | 0x80`. Deflate's
//! parse does not depend on the data, so an output byte that differs from the real
//! output in either decode was copied from window position `p`, which the two marker
//! bytes spell; literals are the same in all three. Every other window byte is zeroed,
//! and a fourth decode with that sparse window must reproduce the real output, or the
//! whole window is kept. Zeroed windows deflate to a fraction of their size (the
//! technique of gztool and rapidgzip), so seek points can be dense at the same index
//! size. The span CRCs still check every decoded byte.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use super::{Inflater, WBITS_RAW, WINDOW_SIZE};
use libz_rs_sys as z;

/// Output bytes after a checkpoint that can still copy from its window: the window
/// size plus the longest deflate match.
pub(super) const PROBE_LEN: usize = WINDOW_SIZE + 258;

/// Bytes that a decoded table's windows may point into instead of copying them: the
/// mapped index file (its pages stay in the page cache, not in the daemon's heap).
pub type SharedBytes = Arc<dyn SharedStore>;

/// What [`SharedBytes`] are: bytes, and a check of a range of them (an index file's
/// block checksums) that runs before a window in that range is inflated.
pub trait SharedStore: Send + Sync {
    /// All the bytes.
    fn bytes(&self) -> &[u8];
    /// Whether the `len` bytes at `at` are intact; the error says why not.
    fn check(&self, at: usize, len: usize) -> Result<(), String>;
}

/// Plain bytes, with nothing to check them against.
impl SharedStore for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }

    fn check(&self, _at: usize, _len: usize) -> Result<(), String> {
        Ok(())
    }
}

/// A checkpoint's window as stored: raw deflate of `len` bytes (sparse windows have
/// the bytes their span never reads zeroed). Inflated only when its span is decoded.
#[derive(Clone, Default)]
pub struct Window {
    /// Length of the window once inflated (at most 32 KiB).
    len: u32,
    /// Raw deflate data that inflates to the window (empty for an empty window).
    deflated: Deflated,
}

/// Where a window's deflated bytes are.
#[derive(Clone)]
enum Deflated {
    /// A copy of its own.
    Owned(Box<[u8]>),
    /// `len` bytes at `at` of shared bytes (checked to lie within them).
    Shared(SharedBytes, usize, usize),
}

impl Default for Deflated {
    fn default() -> Self {
        Deflated::Owned(Box::default())
    }
}

impl PartialEq for Window {
    fn eq(&self, other: &Window) -> bool {
        self.len == other.len && self.deflated() == other.deflated()
    }
}

impl Eq for Window {}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Window({} bytes, {} deflated)",
            self.len,
            self.deflated().len()
        )
    }
}

impl Window {
    /// Deflates `bytes` (at most 32 KiB, as inflate's window always is).
    pub(super) fn deflate(compressor: &mut flate2::Compress, bytes: &[u8]) -> Window {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        if bytes.is_empty() {
            return Window::default();
        }
        compressor.reset();
        let mut out = Vec::new();
        super::deflate_all(compressor, bytes, &mut out);
        Window {
            len,
            deflated: Deflated::Owned(out.into_boxed_slice()),
        }
    }

    /// A window as read from an encoded table (checked only when inflated).
    pub(super) fn from_parts(len: u32, deflated: &[u8]) -> Window {
        Window {
            len,
            deflated: Deflated::Owned(deflated.into()),
        }
    }

    /// A window whose deflated bytes are `bytes[at..at + n]` (None if out of range).
    pub(super) fn shared(len: u32, bytes: &SharedBytes, at: usize, n: usize) -> Option<Window> {
        let end = at.checked_add(n)?;
        (bytes.bytes().len() >= end).then(|| Window {
            len,
            deflated: Deflated::Shared(bytes.clone(), at, n),
        })
    }

    /// Length of the inflated window.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True for the empty window of a member start.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many bytes the window takes in an encoded table.
    pub fn stored_len(&self) -> usize {
        self.deflated().len()
    }

    /// The deflated bytes as stored.
    pub(super) fn deflated(&self) -> &[u8] {
        match &self.deflated {
            Deflated::Owned(b) => b,
            Deflated::Shared(bytes, at, n) => bytes.bytes().get(*at..at + n).unwrap_or_default(),
        }
    }

    /// The window bytes; an error names what is wrong with a corrupt window.
    pub fn inflate(&self) -> Result<Vec<u8>, String> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        if let Deflated::Shared(bytes, at, n) = &self.deflated {
            bytes.check(*at, *n)?;
        }
        super::inflate_window(
            &mut flate2::Decompress::new(false),
            self.deflated(),
            self.len(),
        )
    }
}

/// The prefix of a span right after a new checkpoint: what [`sparse_window`] needs.
pub(super) struct WindowProbe {
    /// Index of the checkpoint in the indexer's list.
    pub checkpoint: usize,
    /// The checkpoint's full window.
    pub window: Vec<u8>,
    /// `inflatePrime` arguments for the checkpoint's partial byte, if any.
    pub prime: Option<(u8, u8)>,
    /// Compressed bytes from the checkpoint's byte offset on.
    pub input: Vec<u8>,
    /// The real output since the checkpoint, at most [`PROBE_LEN`] bytes.
    pub output: Vec<u8>,
}

impl WindowProbe {
    /// Output bytes still wanted.
    pub fn wants(&self) -> usize {
        PROBE_LEN.saturating_sub(self.output.len())
    }

    /// The window to store: sparse when the marker decodes agree, else whole.
    pub fn finish(self) -> Window {
        thread_local! {
            static COMPRESSOR: RefCell<flate2::Compress> =
                RefCell::new(flate2::Compress::new(flate2::Compression::new(3), false));
        }
        let bytes = sparse_window(&self).unwrap_or(self.window);
        COMPRESSOR.with(|c| Window::deflate(&mut c.borrow_mut(), &bytes))
    }
}

/// The window with every byte the probed output does not read set to zero, or None
/// when the decodes do not prove that it reproduces the output.
fn sparse_window(probe: &WindowProbe) -> Option<Vec<u8>> {
    let (lo, hi) = markers();
    let len = probe.window.len();
    let n = probe.output.len();
    let by_lo = probe_decode(probe, &lo[..len], n)?;
    let by_hi = probe_decode(probe, &hi[..len], n)?;
    let mut sparse = vec![0u8; len];
    for (o, &real) in probe.output.iter().enumerate() {
        let (l, h) = (by_lo[o], by_hi[o]);
        if l != real || h != real {
            let at = usize::from(l) | usize::from(h & 0x7f) << 8;
            *sparse.get_mut(at)? = *probe.window.get(at)?;
        }
    }
    (probe_decode(probe, &sparse, n)? == probe.output).then_some(sparse)
}

/// The two marker windows: byte `p` is `p & 0xFF`, and `(p >> 8) | 0x80`.
fn markers() -> &'static (Vec<u8>, Vec<u8>) {
    static MARKERS: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    MARKERS.get_or_init(|| {
        let lo = (0..WINDOW_SIZE).map(|p| p as u8).collect();
        let hi = (0..WINDOW_SIZE).map(|p| (p >> 8) as u8 | 0x80).collect();
        (lo, hi)
    })
}

/// Decodes up to `n` bytes of the probe's input with `window` as the dictionary;
/// None if inflate fails or produces fewer bytes than the real decode did.
fn probe_decode(probe: &WindowProbe, window: &[u8], n: usize) -> Option<Vec<u8>> {
    let mut inf = Inflater::new(WBITS_RAW).ok()?;
    if let Some((bits, value)) = probe.prime {
        inf.prime(bits, value).ok()?;
    }
    if !window.is_empty() {
        inf.set_dictionary(window).ok()?;
    }
    let mut out = vec![0u8; n];
    let mut done = 0;
    let mut input = &probe.input[..];
    while done < n {
        let step = inf.inflate(input, &mut out[done..], z::Z_NO_FLUSH);
        input = input.get(step.consumed..)?;
        done += step.produced;
        // Stream end, an error, or no progress: `done` tells whether it was enough.
        if step.ret != z::Z_OK || step.consumed + step.produced == 0 {
            break;
        }
    }
    (done == n).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_window_round_trips() {
        let w = Window::deflate(
            &mut flate2::Compress::new(flate2::Compression::new(3), false),
            b"",
        );
        assert!(w.is_empty());
        assert_eq!(w.inflate().unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn window_round_trips_and_corruption_is_an_error() {
        let bytes: Vec<u8> = (0..WINDOW_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let mut c = flate2::Compress::new(flate2::Compression::new(3), false);
        let w = Window::deflate(&mut c, &bytes);
        assert_eq!(w.len(), WINDOW_SIZE);
        assert_eq!(w.inflate().unwrap(), bytes);
        let short = Window::from_parts(w.len, &w.deflated()[..w.deflated().len() / 2]);
        assert!(short.inflate().is_err());
        let long = Window::from_parts(w.len + 1, w.deflated());
        assert!(long.inflate().is_err());
    }
}
