#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_store_fuzz::working_set(data));
