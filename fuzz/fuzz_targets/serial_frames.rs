#![no_main]
//! See `starling_fuzz::serial_frames` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::serial_frames(data));
