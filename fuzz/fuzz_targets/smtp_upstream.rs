//! The upstream SMTP multi-line reply reader against any server bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xoauth2_proxy::fuzzing::fuzz_smtp_upstream(data));
