#![no_main]

// Backend token inspection and verification (hangar_core::token) and API token parsing
// (hangar_scheduler::api_tokens).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hangar_core::fuzzing::fuzz_token(data);
    hangar_scheduler::fuzzing::fuzz_api_token(data);
});
