//! Fuzz target `tar_index`: see `snapfs::fuzzing::tar_index` (the same body runs in
//! `tests/fuzz.rs` over the committed corpus).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = snapfs::fuzzing::tar_index(data) {
        panic!("tar_index: {e}");
    }
});
