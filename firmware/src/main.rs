//! The `tandem` binary: see `tandem --help` and INTERFACE.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    match tandem::cli::main(std::env::args_os().skip(1).collect()) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("tandem: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
