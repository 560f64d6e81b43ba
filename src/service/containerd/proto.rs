//! The generated gRPC code (build.rs, from `proto/`), in modules that mirror the
//! protobuf packages so that cross-package references resolve.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `containerd.*`.
pub mod containerd {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the API snapfs serves.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        /// The client messages (see proto/client/client.proto).
        pub mod client {
            /// `containerd.services.client.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.client.v1");
            }
        }
    }
}

pub use containerd::services::client::v1 as client;
pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
