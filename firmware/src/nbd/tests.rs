//! Tests of the NBD server state machine, driven through its inputs and outputs.
