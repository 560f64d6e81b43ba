//! The `snapfs` binary: parse arguments, run, print one error line, set the exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    match snapfs::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapfs: {e}");
            ExitCode::FAILURE
        }
    }
}
