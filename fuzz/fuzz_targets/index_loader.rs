//! Fuzz target `index_loader`: see `snapfs::fuzzing::index_loader` (the same body runs in
//! `tests/fuzz.rs` over the committed corpus).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = snapfs::fuzzing::index_loader(data) {
        panic!("index_loader: {e}");
    }
});
