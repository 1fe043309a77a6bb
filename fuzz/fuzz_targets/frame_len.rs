#![no_main]
//! See `starling_fuzz::frame_len` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::frame_len(data));
