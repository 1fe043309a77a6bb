#![no_main]
//! See `starling_fuzz::signed_policy` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::signed_policy(data));
