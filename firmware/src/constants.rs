//! Every limit of the firmware, in one place, with compile-time checks of how they relate.
