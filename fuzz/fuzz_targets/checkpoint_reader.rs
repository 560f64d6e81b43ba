//! Fuzz target `checkpoint_reader`: see `snapfs::fuzzing::checkpoint_reader` (the same body runs in
//! `tests/fuzz.rs` over the committed corpus).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = snapfs::fuzzing::checkpoint_reader(data) {
        panic!("checkpoint_reader: {e}");
    }
});
