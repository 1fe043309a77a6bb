#![no_main]
//! See `starling_fuzz::enroll_down` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::enroll_down(data));
