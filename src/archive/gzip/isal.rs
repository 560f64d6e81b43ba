//! Raw-deflate inflate with ISA-L's igzip (Debian's libisal, through the C shim
//! `isal_shim.c`, so Rust never sees the layout of its state). It inflates 1.3–1.6×
//! faster per core than zlib-rs (`docs/BENCHMARKS.md`, inflate table), and decodes the
//! spans of a seek table, both those that resume inside a gzip member and those that
//! start at one. Built where `build.rs` finds libisal-dev's
//! header; the library is loaded on first use (`dlopen` of `libisal.so.2`), so a mount
//! that never inflates does not read it, and a host without it inflates with zlib-rs
//! (a debug log line says so). `SNAPFS_INFLATE=zlib` turns it off.

use std::ffi::c_void;
use std::io;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::OnceLock;

/// Environment variable that picks the span inflater: `zlib` for zlib-rs only.
pub const INFLATE_ENV: &str = "SNAPFS_INFLATE";

/// The shared library loaded on first use.
const LIBRARY: &std::ffi::CStr = c"libisal.so.2";

extern "C" {
    fn snapfs_isal_bind(
        init: *mut c_void,
        reset: *mut c_void,
        set_dict: *mut c_void,
        run: *mut c_void,
    );
    fn snapfs_isal_new() -> *mut c_void;
    fn snapfs_isal_free(s: *mut c_void);
    fn snapfs_isal_start(
        s: *mut c_void,
        gzip: i32,
        dict: *const u8,
        dict_len: u32,
        bits: u8,
        nbits: i32,
    ) -> i32;
    fn snapfs_isal_step(
        s: *mut c_void,
        input: *const u8,
        in_len: u32,
        out: *mut u8,
        out_len: u32,
        consumed: *mut u32,
        given_back: *mut u32,
        produced: *mut u32,
        finished: *mut i32,
    ) -> i32;
}

/// Whether spans inside a member are inflated with ISA-L: unless told otherwise,
/// and once its library is loaded (tried once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(INFLATE_ENV).map_or(true, |v| v != "zlib") && load())
}

/// Loads libisal and binds the shim to it; false (and a debug line) if it is missing.
fn load() -> bool {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is never closed, so
    // the bound pointers stay valid for the life of the process.
    unsafe {
        let lib = libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            log::debug!("ISA-L not loaded ({LIBRARY:?} missing): gzip spans inflate with zlib-rs");
            return false;
        }
        let names = [
            c"isal_inflate_init",
            c"isal_inflate_reset",
            c"isal_inflate_set_dict",
            c"isal_inflate",
        ];
        let syms = names.map(|n| libc::dlsym(lib, n.as_ptr()));
        if syms.iter().any(|p| p.is_null()) {
            log::debug!("ISA-L not used ({LIBRARY:?} lacks its inflate API): zlib-rs");
            return false;
        }
        snapfs_isal_bind(syms[0], syms[1], syms[2], syms[3]);
    }
    true
}

/// ISA-L's return code for a gzip trailer that does not match the data.
pub const CHECKSUM_MISMATCH: i32 = -6;

/// What one [`Inflater::step`] did.
pub struct Step {
    /// ISA-L's return code: negative for corrupt input ([`CHECKSUM_MISMATCH`] for a
    /// member whose CRC or length does not match).
    pub ret: i32,
    /// Input bytes it took.
    pub consumed: usize,
    /// Input bytes an earlier step took that belong after the end of the stream
    /// (ISA-L reads ahead): the input goes back by this many.
    pub given_back: usize,
    /// Output bytes it wrote.
    pub produced: usize,
    /// The stream ended: its final block is out (and, for a gzip member, its trailer
    /// was checked).
    pub finished: bool,
}

/// One ISA-L inflate state (freed on drop).
pub struct Inflater(NonNull<c_void>);

// SAFETY: the state is plain memory owned by this value; ISA-L keeps no thread-local
// or global state per stream.
unsafe impl Send for Inflater {}

impl Inflater {
    /// A raw-deflate stream resuming at a block boundary: `nbits` (< 8) bits of
    /// `bits` come before the first input byte, and `dict` is the window.
    pub fn resume(dict: &[u8], bits: u8, nbits: u8) -> io::Result<Self> {
        let mut s = Self::alloc()?;
        s.start(false, dict, bits, nbits)?;
        Ok(s)
    }

    /// A stream starting at a gzip member header (ISA-L checks its header, CRC and
    /// length).
    pub fn gzip() -> io::Result<Self> {
        let mut s = Self::alloc()?;
        s.next_member()?;
        Ok(s)
    }

    /// Starts over at the next gzip member's header.
    pub fn next_member(&mut self) -> io::Result<()> {
        self.start(true, &[], 0, 0)
    }

    fn alloc() -> io::Result<Self> {
        // SAFETY: allocates and initializes a state, or returns null.
        NonNull::new(unsafe { snapfs_isal_new() })
            .map(Inflater)
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "ISA-L inflate state"))
    }

    fn start(&mut self, gzip: bool, dict: &[u8], bits: u8, nbits: u8) -> io::Result<()> {
        let len = u32::try_from(dict.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "gzip window too large"))?;
        // SAFETY: the state is live; `dict` is valid for `len` bytes (ISA-L copies it).
        let ret = unsafe {
            snapfs_isal_start(
                self.0.as_ptr(),
                gzip.into(),
                dict.as_ptr(),
                len,
                bits,
                nbits.into(),
            )
        };
        if ret != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ISA-L refused the gzip window ({ret})"),
            ));
        }
        Ok(())
    }

    /// Inflates from `input` into `out`.
    pub fn step(&mut self, input: &[u8], out: &mut [MaybeUninit<u8>]) -> Step {
        let in_len = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let out_len = u32::try_from(out.len()).unwrap_or(u32::MAX);
        let (mut consumed, mut given_back, mut produced, mut finished) = (0u32, 0u32, 0u32, 0i32);
        // SAFETY: the state is live; ISA-L reads at most `in_len` bytes of `input` and
        // writes at most `out_len` bytes into `out` (uninitialized memory is fine to
        // write), and reports how many.
        let ret = unsafe {
            snapfs_isal_step(
                self.0.as_ptr(),
                input.as_ptr(),
                in_len,
                out.as_mut_ptr().cast(),
                out_len,
                &mut consumed,
                &mut given_back,
                &mut produced,
                &mut finished,
            )
        };
        Step {
            ret,
            consumed: consumed as usize,
            given_back: given_back as usize,
            produced: produced as usize,
            finished: finished != 0,
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: made by snapfs_isal_new, freed exactly once.
        unsafe { snapfs_isal_free(self.0.as_ptr()) }
    }
}
