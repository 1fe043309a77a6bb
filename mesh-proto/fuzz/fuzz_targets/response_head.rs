#![no_main]
//! Any bytes: decoding a ResponseHead never panics, and what decodes re-encodes to a frame that
//! decodes to the same head.
use libfuzzer_sys::fuzz_target;
use mesh_proto::{ResponseHead, decode_head, encode_frame_vec, frame_len};

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = decode_head::<ResponseHead>(data) {
        let mut out = Vec::new();
        encode_frame_vec(&head, &mut out);
        let (len, prefix) = frame_len(&out, usize::MAX).expect("own frame").expect("complete");
        let again = decode_head(&out[prefix..prefix + len]).expect("own encoding decodes");
        assert_eq!(head, again);
    }
});
