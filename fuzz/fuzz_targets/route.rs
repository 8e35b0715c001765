#![no_main]

// Route resolution from Host, header and cookie, and the query and cookie token helpers.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hangar_core::fuzzing::fuzz_route(data));
