#![no_main]
//! See `starling_fuzz::response_head` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::response_head(data));
