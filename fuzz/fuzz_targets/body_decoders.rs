#![no_main]

// The chunked, length and read-to-close body decoders, in reads of arbitrary sizes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hangar_proxy::fuzzing::fuzz_body_decoders(data));
