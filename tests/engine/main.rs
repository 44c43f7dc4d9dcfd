//! The engine's tests, in one binary (one link instead of five): the scenario files on both
//! books, the oracle against the reference book, the committed sample, the fuzz target's body,
//! and the layering check. No process, no server.

mod fuzz_inputs;
mod layers;
mod oracle;
mod sample;
mod scenarios;
