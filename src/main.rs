//! The `tokend` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(tokend::cli::main())
}
