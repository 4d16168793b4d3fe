//! tandem's test harness: helpers shared by the multi-process and interop tests in `tests/`.
