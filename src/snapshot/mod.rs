//! STUB: cutting snapshots (being written).
