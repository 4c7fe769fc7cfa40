//! The upstream IMAP login dialogue (greeting, capabilities, AUTHENTICATE
//! XOAUTH2, NAMESPACE) against any server bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xoauth2_proxy::fuzzing::fuzz_imap_upstream(data));
