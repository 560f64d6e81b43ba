//! Generates containerd's snapshots API (server side) and the client messages snapfs
//! sends to containerd from `proto/` (needs `protoc`: Debian's protobuf-compiler and
//! libprotobuf-dev).

/// prost's settings: no comments from containerd's protos in the generated code
/// (rustdoc would run their indented text as doctests).
fn config() -> prost_build::Config {
    let mut c = prost_build::Config::new();
    c.disable_comments(["."]);
    c
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .disable_comments(".")
        .build_client(false)
        .build_server(true)
        .compile_protos_with_config(
            config(),
            &["proto/snapshots/snapshots.proto"],
            &["proto", "/usr/include"],
        )?;
    tonic_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos_with_config(
            config(),
            &["proto/client/client.proto"],
            &["proto", "/usr/include"],
        )?;
    Ok(())
}
