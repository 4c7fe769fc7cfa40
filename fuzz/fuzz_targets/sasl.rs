//! The SASL decoders (PLAIN, LOGIN, initial responses) over any client lines,
//! and the XOAUTH2 builder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xoauth2_proxy::fuzzing::fuzz_sasl(data));
