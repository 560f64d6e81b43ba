//! containerd's snapshotter: `snapfs serve --containerd SOCKET` answers
//! `containerd.services.snapshots.v1` as a proxy plugin. [`server`] is the gRPC glue,
//! [`snapshotter`] the operations over the service's views and the snapshot model
//! ([`crate::service::snapshots`]), [`content`] the client of containerd's content
//! and image stores that finds layer blobs, so that image layers are served from
//! their blobs instead of being unpacked.

pub mod content;
pub mod proto;
pub mod server;
pub mod snapshotter;

/// The label containerd's pull unpacker (and CRI) puts on a layer's Prepare: the
/// chain ID of the committed snapshot it wants (the "target").
pub const LABEL_REF: &str = "containerd.io/snapshot.ref";
/// The label CRI adds: the layer blob's digest.
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
