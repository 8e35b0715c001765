#![no_main]

// HTTP/2 request header blocks: HPACK decoding, the request checks and the head the backend gets.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hangar_proxy::fuzzing::fuzz_h2_header_block(data));
