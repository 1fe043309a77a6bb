#![no_main]
//! Any bytes: a length prefix is read or refused, never panics, never exceeds its bound.
use libfuzzer_sys::fuzz_target;
use mesh_proto::frame_len;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((len, prefix))) = frame_len(data, 8192) {
        assert!(len <= 8192);
        assert!((1..=5).contains(&prefix));
    }
});
