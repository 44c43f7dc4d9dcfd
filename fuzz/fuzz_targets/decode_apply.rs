//! Untrusted bytes through the wire decoder (JSON and MessagePack) into a book with every rule
//! on; the book's invariants are checked after each command. Run it with the command in the
//! docs/development.md ("Fuzzing").
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agora::fuzzing::decode_and_apply(data);
});
