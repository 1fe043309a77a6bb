#![no_main]
//! See `starling_fuzz::cloud_topic` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::cloud_topic(data));
