//! The SMTP session's line reader and command parser (`smtp::command::parse`),
//! and the end-of-DATA scanner, over any client bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xoauth2_proxy::fuzzing::fuzz_smtp_command(data));
