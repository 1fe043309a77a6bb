#![no_main]
//! See `starling_fuzz::state_files` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::state_files(data));
