#![no_main]

// The DNS zone lookup, and whole messages through hickory's decoder and the server's handler.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hangar_dns::fuzzing::fuzz_dns_query(data));
