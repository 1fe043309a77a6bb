#![no_main]
//! See `starling_fuzz::gateway_config` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::gateway_config(data));
