//! The `snapfs-net` executable: every command, with the network half (the containerd
//! service, Docker volumes, `s3://` and `http(s)://` objects) that `snapfs` leaves out.

fn main() -> std::process::ExitCode {
    snapfs::cli::exit_code(snapfs::cli::run_net())
}
