//! Byte formats, and nothing else: no state, no I/O.
//!
//! Every decoder here takes untrusted bytes and returns a typed error on anything malformed; none
//! of them panics on any input (the property tests feed them random bytes). Encoders write into
//! caller-provided buffers of a documented size.

pub mod nbd;
