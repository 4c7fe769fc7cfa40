//! The IMAP pre-login framer (`imap::framing::read_command`) and parser
//! (`imap::parser::command`) over any client bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xoauth2_proxy::fuzzing::fuzz_imap_command(data));
