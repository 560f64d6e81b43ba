//! Generates containerd's snapshots API (server side) and the client messages snapfs
//! sends to containerd from `proto/` (needs `protoc`: Debian's protobuf-compiler and
//! libprotobuf-dev), and builds the shim over ISA-L's inflate where Debian's
//! libisal-dev header is installed (`cfg(snapfs_isal)`; `SNAPFS_NO_ISAL=1` builds
//! without it; the library itself is loaded at run time).

/// prost's settings: no comments from containerd's protos in the generated code
/// (rustdoc would run their indented text as doctests).
fn config() -> prost_build::Config {
    let mut c = prost_build::Config::new();
    c.disable_comments(["."]);
    c
}

/// Builds the ISA-L shim if libisal's header is there.
fn isal() {
    println!("cargo::rustc-check-cfg=cfg(snapfs_isal)");
    println!("cargo:rerun-if-env-changed=SNAPFS_NO_ISAL");
    println!("cargo:rerun-if-changed=src/archive/gzip/isal_shim.c");
    let header = std::path::Path::new("/usr/include/isa-l/igzip_lib.h");
    println!("cargo:rerun-if-changed={}", header.display());
    if std::env::var_os("SNAPFS_NO_ISAL").is_some() || !header.exists() {
        return;
    }
    cc::Build::new()
        .file("src/archive/gzip/isal_shim.c")
        .compile("snapfs_isal_shim");
    println!("cargo:rustc-cfg=snapfs_isal");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    isal();
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
