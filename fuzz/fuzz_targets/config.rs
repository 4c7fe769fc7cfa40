//! `Config::parse` on any text.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xoauth2_proxy::fuzzing::fuzz_config(data));
