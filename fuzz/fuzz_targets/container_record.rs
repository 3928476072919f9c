#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_store_fuzz::container_record(data));
