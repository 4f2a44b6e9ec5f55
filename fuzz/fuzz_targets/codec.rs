//! See `crates/highlander-fuzz`: the body of this target, and what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| highlander_fuzz::codec(data));
