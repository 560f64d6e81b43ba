//! The bytes one read returns: a buffer of its own, or a range of a decoded span
//! shared with the span cache, so a large read of a compressed archive reaches the
//! FUSE reply without being copied (and without a second buffer of its size).

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Bytes read from a file of a tree; dereferences to the slice.
pub enum ReadBytes {
    /// A buffer filled for this read.
    Owned(Vec<u8>),
    /// A range of a span buffer the cache also holds.
    Shared(Arc<Vec<u8>>, Range<usize>),
}

impl ReadBytes {
    /// No bytes (a read at or past the end of a file).
    pub fn empty() -> Self {
        ReadBytes::Owned(Vec::new())
    }

    /// The bytes as a vector of their own (copied if shared).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            ReadBytes::Owned(v) => v,
            ReadBytes::Shared(buf, r) => buf[r].to_vec(),
        }
    }
}

impl Deref for ReadBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReadBytes::Owned(v) => v,
            ReadBytes::Shared(buf, r) => &buf[r.clone()],
        }
    }
}

impl From<Vec<u8>> for ReadBytes {
    fn from(v: Vec<u8>) -> Self {
        ReadBytes::Owned(v)
    }
}

impl PartialEq for ReadBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for ReadBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self {
            ReadBytes::Owned(_) => "owned",
            ReadBytes::Shared(..) => "shared",
        };
        write!(f, "ReadBytes({} bytes, {how})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_bytes_are_the_range_of_the_span() {
        let span = Arc::new((0u8..=255).collect::<Vec<u8>>());
        let b = ReadBytes::Shared(span.clone(), 10..20);
        assert_eq!(&*b, &span[10..20]);
        assert_eq!(b, ReadBytes::from(span[10..20].to_vec()));
        assert_eq!(b.into_vec(), span[10..20].to_vec());
        assert!(ReadBytes::empty().is_empty());
    }
}
