#![no_main]

// The proxy's HTTP/1.1 request head parser, pipelined requests and the head the backend gets.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hangar_proxy::fuzzing::fuzz_request_head(data));
