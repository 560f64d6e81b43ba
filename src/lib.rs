//! snapfs: snapshot tarballs as lazy FUSE views, read-only or writable.
//!
//! Data flows one way: archive bytes ([`archive`]) → index ([`index`]) → tree
//! ([`index::tree::Tree`]) → FUSE ([`fs`]). Layers ([`layers`]), the upper directory
//! ([`upper`]) and id maps ([`idmap`]) compose trees, [`view`] assembles them, the
//! snapshot writer ([`snapshot`]) consumes one. Only [`fs`] knows FUSE: everything
//! below it is usable, and tested, as a library. [`service`] serves many views from
//! one process (`snapfs serve`).
#![deny(missing_docs)]

pub mod archive;
pub mod cache;
pub mod cli;
pub mod error;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod idmap;
pub mod image;
pub mod index;
pub mod layers;
pub mod service;
pub mod snapshot;
pub mod source;
pub mod upper;
pub mod view;

pub use error::{Error, Result};
