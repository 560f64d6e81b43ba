//! The spill file of one compressed archive: whole decoded spans written once to an
//! unlinked temporary file in the snapfs cache dir, and read back from it, so a span
//! that random readers come back to is inflated once, and is then held by the
//! kernel's page cache (reclaimable, written back to disk) instead of the daemon's
//! memory.
//!
//! Reading every small file of an archive in path order, not archive order, touches
//! every span again and again (the 100k-file benchmark corpus: 100 files of a
//! directory lie in ~100 of its 149 spans). A span cache only helps there if it
//! holds the whole stream (1 GiB of daemon memory for a 600 MB stream); a spill file
//! costs disk space instead, at most its budget (`SNAPFS_SPILL`: a size in bytes, `0`
//! to turn spilling off; default the smaller of 8 GiB and half the free space of the
//! cache dir's filesystem).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Environment variable that sets the spill budget in bytes (`0`: no spill file).
pub const SPILL_ENV: &str = "SNAPFS_SPILL";

/// Default upper bound of one archive's spill file.
const DEFAULT_BUDGET: u64 = 8 << 30;

const IDLE: u8 = 0;
const WRITING: u8 = 1;

/// Decoded spans (or span prefixes) of one archive, in a sparse temporary file at
/// their stream offsets.
pub struct Spill {
    file: File,
    /// Per span: whether a reader is writing to it.
    state: Box<[AtomicU8]>,
    /// Per span: how many of its first bytes are in the file.
    stored: Box<[AtomicU64]>,
    budget: u64,
    used: AtomicU64,
}

impl Spill {
    /// A spill file for a stream of `spans` spans, in the cache dir, or `None` if
    /// spilling is off or no file can be made there (logged at debug level).
    pub fn create(spans: usize) -> Option<Spill> {
        let dir = cache_dir();
        let budget = match std::env::var(SPILL_ENV).ok().map(|v| v.parse::<u64>()) {
            Some(Ok(b)) => b,
            Some(Err(_)) | None => default_budget(&dir),
        };
        if budget == 0 {
            return None;
        }
        let made = std::fs::create_dir_all(&dir).and_then(|()| tempfile::tempfile_in(&dir));
        match made {
            Ok(file) => Some(Spill::in_file(file, spans, budget)),
            Err(e) => {
                log::debug!("no spill file in {}: {e}", dir.display());
                None
            }
        }
    }

    /// A spill of `spans` spans into `file`, of at most `budget` bytes.
    pub fn in_file(file: File, spans: usize, budget: u64) -> Spill {
        Spill {
            file,
            state: (0..spans).map(|_| AtomicU8::new(IDLE)).collect(),
            stored: (0..spans).map(|_| AtomicU64::new(0)).collect(),
            budget,
            used: AtomicU64::new(0),
        }
    }

    /// How many of span `span`'s first bytes are in the file.
    pub fn stored(&self, span: usize) -> u64 {
        self.stored
            .get(span)
            .map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// Whether any of span `span` is in the file.
    pub fn has(&self, span: usize) -> bool {
        self.stored(span) > 0
    }

    /// Whether a reader (or the filler) is writing to span `span` right now.
    pub fn writing(&self, span: usize) -> bool {
        self.state
            .get(span)
            .is_some_and(|s| s.load(Ordering::Acquire) == WRITING)
    }

    /// Whether `len` more bytes fit the budget.
    pub fn has_room(&self, len: u64) -> bool {
        self.used.load(Ordering::Relaxed).saturating_add(len) <= self.budget
    }

    /// Fills `buf` from stream offset `off`, inside a span's stored prefix.
    pub fn read(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    /// Stores `data`, a prefix of span `span` (which starts at stream offset
    /// `start`): the bytes past what is stored already, unless another reader is
    /// writing to that span or they would exceed the budget. A failed write leaves
    /// the stored prefix as it was (reads past it decode as before). False only when
    /// another reader was writing to the span (nothing was stored).
    pub fn store(&self, span: usize, start: u64, data: &[u8]) -> bool {
        let (Some(state), Some(stored)) = (self.state.get(span), self.stored.get(span)) else {
            return true;
        };
        if state
            .compare_exchange(IDLE, WRITING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let have = stored.load(Ordering::Acquire);
        let new = data.len() as u64;
        if new > have {
            let len = new - have;
            let prev = self.used.fetch_add(len, Ordering::Relaxed);
            if prev.saturating_add(len) > self.budget {
                self.used.fetch_sub(len, Ordering::Relaxed);
            } else {
                let from = have as usize;
                match self.file.write_all_at(&data[from..], start + have) {
                    Ok(()) => stored.store(new, Ordering::Release),
                    Err(e) => log::debug!("spill of span {span} failed: {e}"),
                }
            }
        }
        state.store(IDLE, Ordering::Release);
        true
    }

    /// [`Spill::store`], waiting while another writer has the span (a store takes
    /// milliseconds): it then stores only the bytes past that one's prefix. Gives up
    /// after about a second.
    pub fn store_waiting(&self, span: usize, start: u64, data: &[u8]) {
        for _ in 0..5000 {
            if self.store(span, start, data) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}

/// The snapfs cache dir (`$XDG_CACHE_HOME/snapfs` or `~/.cache/snapfs`), as the index
/// store names it.
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("snapfs")
}

/// The smaller of [`DEFAULT_BUDGET`] and half the free space where `dir` is (or would
/// be created).
fn default_budget(dir: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    let Ok(path) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills the struct we own from a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let free = u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize));
    (free / 2).min(DEFAULT_BUDGET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_prefixes_are_stored_grown_within_the_budget_and_read_back() {
        let spill = Spill::in_file(tempfile::tempfile().unwrap(), 4, 10);
        assert!(!spill.has(1));
        spill.store(1, 100, b"abc");
        assert_eq!(spill.stored(1), 3);
        spill.store(1, 100, b"zzzdef");
        assert_eq!(spill.stored(1), 6);
        let mut got = [0u8; 4];
        spill.read(&mut got, 101).unwrap();
        assert_eq!(&got, b"bcde", "stored bytes are never rewritten");
        // Over the budget (6 + 6 > 10): left out.
        assert!(!spill.has_room(6));
        spill.store(2, 200, b"123456");
        assert!(!spill.has(2));
        // Out of range spans are not there and cannot be stored.
        spill.store(9, 0, b"x");
        assert!(!spill.has(9));
    }
}
