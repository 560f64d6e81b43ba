//! The `snapfs` executable: every local command; `serve`, `volume` and commands that name
//! a remote object run in `snapfs-net` (see [`snapfs::cli::run_lean`]).

fn main() -> std::process::ExitCode {
    snapfs::cli::exit_code(snapfs::cli::run_lean())
}
