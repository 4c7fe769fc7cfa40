//! The Graph path's readers of an authenticated client's message: RCPT paths
//! and the header section the `Bcc` field is added to.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xoauth2_proxy::fuzzing::fuzz_graph_message(data));
