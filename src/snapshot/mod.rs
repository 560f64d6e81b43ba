//! Cutting snapshots: a writer of standard tar / tar.gz / tar.zst files that are at
//! the same time seekable (independent 4 MiB gzip members / zstd frames) and
//! self-indexed (the snapfs index rides after the tar end-of-archive marker, found
//! through a fixed-size footer at the very end of the file). GNU tar, gzip and zstd
//! read them as ordinary archives; snapfs mounts them without an indexing pass.
//!
//! * [`write`]: [`SnapshotWriter`], fed [`SnapshotEntry`] values in archive order.
//! * [`format`]: the footer layout and [`read_embedded`], the reader side.
//! * [`dir`]: walking a plain directory into entries (`snapfs create`).
//!
//! `docs/FORMAT.md` describes the bytes.

pub mod cut;
pub mod dir;
pub mod format;
pub mod write;

pub use format::read_embedded;
pub use write::{
    EntryKind, OutputCompression, SnapshotEntry, SnapshotSummary, SnapshotWriter, WriterOptions,
};
