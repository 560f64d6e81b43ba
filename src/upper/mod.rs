//! The writable view: a read-only tree (one archive or stacked layers) under an upper
//! directory that records every change, overlayfs style, with lazy copy-up. Glue
//! only: the jobs live in the submodules.
//!
//! - [`layout`]: the on-disk format of the upper directory, byte ranges of partial
//!   files, and the change list ([`changes`]) that `snapfs commit` reads;
//! - `sys`: the system-call wrappers (descriptor-relative, most of the `unsafe`);
//! - `copyup`: making a lower entry exist in the upper directory;
//! - `tree`: [`UpperTree`], the view itself (lookups, inode numbers, every `Tree` call).

mod copyup;
pub mod layout;
mod sys;
mod tree;

pub use layout::{changes, Change, ChangeKind, Ranges};
pub use tree::UpperTree;
