//! Generates containerd's snapshots API (server side) and the client messages snapfs
//! sends to containerd from `proto/` (needs `protoc`: Debian's protobuf-compiler and
//! libprotobuf-dev).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(
            &["proto/snapshots/snapshots.proto"],
            &["proto", "/usr/include"],
        )?;
    tonic_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/client/client.proto"], &["proto", "/usr/include"])?;
    Ok(())
}
