#![no_main]
//! See `starling_fuzz::node_config` for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| starling_fuzz::node_config(data));
