//! FUSE at the edge, and the only `fuser` import of snapfs: [`adapter`] turns kernel
//! requests into [`Tree`](crate::index::tree::Tree) calls, [`session`] mounts a tree
//! (options, the mount itself, serving threads, unmounting), [`passthrough`] hands
//! whole upper files to the kernel, [`killpriv`] clears set-id bits on writes for it.
//! Nothing below this module knows FUSE exists.

pub mod adapter;
mod killpriv;
pub mod passthrough;
pub mod session;

pub use adapter::{SnapFs, EXIT_DELAY_HOOK_ENV, MAX_READ, PANIC_HOOK_ENV};
pub use passthrough::NO_BACKING_HOOK_ENV;
pub use session::{default_threads, Access, MountOptions, Served, Session, Unmounter};
