//! snapfs: lazy, read-only FUSE views of snapshot tarballs.
//!
//! Data flows one way: archive bytes ([`archive`]) → index ([`index`]) → tree
//! ([`index::tree::Tree`]) → FUSE ([`fs`]). `archive` and `index` never touch FUSE and
//! are usable as a library.
#![deny(missing_docs)]

pub mod archive;
pub mod cache;
pub mod cli;
pub mod error;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod idmap;
pub mod index;
pub mod layers;
pub mod snapshot;
pub mod upper;

pub use error::{Error, Result};
