//! The snapfs integration test binary: mounts archives built at test time
//! and compares the mounted tree with GNU tar's extraction.
//!
//! Needs root, /dev/fuse, GNU tar, gzip, pigz, zstd/pzstd, xz, bzip2, pbzip2, lbzip2, attr (getfattr,
//! setfattr) and python3. Every test works in its own temp dir and unmounts
//! what it mounted.

mod corpus;
mod tree;
mod util;

mod cli;
mod commit;
mod containerd;
mod containers;
mod create;
mod cri;
mod faults;
mod formats;
mod fuzz;
mod hostile;
mod idmap;
mod images;
mod index;
mod layers;
mod lifecycle;
mod load;
mod passthrough;
mod posix;
mod random_ops;
mod regression;
mod remote;
mod semantics;
mod service;
mod trust;
mod upper;
mod volumes;
