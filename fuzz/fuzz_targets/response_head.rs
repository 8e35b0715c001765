#![no_main]

// The proxy's backend response head parser and the body framing it picks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hangar_proxy::fuzzing::fuzz_response_head(data));
