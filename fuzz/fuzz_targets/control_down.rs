#![no_main]
//! See `starling_fuzz::control_down` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::control_down(data));
