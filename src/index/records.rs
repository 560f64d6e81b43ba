//! The record arrays of an [`Index`](super::Index): owned (built, or read from a file
//! that could not be mapped) or a view into the mapped index file, so a warm mount
//! neither copies nor keeps in its own memory the records it has not touched.
//!
//! A mapped array is the file's own little-endian records, cast in place: the record
//! types are `#[repr(C)]` with the on-disk field order, no padding and only integer
//! fields (every bit pattern valid), and a section is mapped only where it is aligned
//! for its type on a little-endian machine. Anything else is parsed into an owned
//! array. Writing to a mapped array copies it first.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// A fixed-size record that can be read in place from the index file.
///
/// # Safety
/// The type must be `#[repr(C)]` with no padding bytes, consist only of integer
/// fields (any bit pattern is a valid value), and its layout must be the on-disk
/// little-endian layout of the record.
pub unsafe trait Record: Copy + 'static {}

// SAFETY: a byte.
unsafe impl Record for u8 {}

/// An array of records, owned or inside the mapped index file.
pub struct Records<T: Record> {
    inner: Inner<T>,
}

enum Inner<T> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        /// Byte offset of the first record in the mapping (aligned for `T`).
        offset: usize,
        /// Number of records.
        len: usize,
    },
}

impl<T: Record> Records<T> {
    /// The records `bytes[offset..offset + len * size_of::<T>()]` of `map` in place, or
    /// `None` if they are out of range or not aligned for `T`, or this machine is not
    /// little-endian (the caller then parses them).
    pub fn mapped(map: &Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<Self> {
        if cfg!(target_endian = "big") {
            return None;
        }
        let size = len.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(size)?;
        if end > map.len() {
            return None;
        }
        let start = map.as_ptr().wrapping_add(offset);
        if start.align_offset(std::mem::align_of::<T>()) != 0 {
            return None;
        }
        Some(Records {
            inner: Inner::Mapped {
                map: map.clone(),
                offset,
                len,
            },
        })
    }

    /// Whether the records live in the mapped file (for tests and statistics).
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }

    /// The records as an owned vector, copying them out of the mapping first.
    pub fn to_mut(&mut self) -> &mut Vec<T> {
        if let Inner::Mapped { .. } = self.inner {
            self.inner = Inner::Owned(self.deref().to_vec());
        }
        match &mut self.inner {
            Inner::Owned(v) => v,
            Inner::Mapped { .. } => unreachable!("converted above"),
        }
    }

    /// Bytes of the process's own memory the records take (0 when mapped: those
    /// pages belong to the page cache and are dropped under memory pressure).
    pub fn owned_bytes(&self) -> usize {
        match &self.inner {
            Inner::Owned(v) => v.len() * std::mem::size_of::<T>(),
            Inner::Mapped { .. } => 0,
        }
    }
}

impl<T: Record> Default for Records<T> {
    fn default() -> Self {
        Vec::new().into()
    }
}

impl<T: Record> From<Vec<T>> for Records<T> {
    fn from(v: Vec<T>) -> Self {
        Records {
            inner: Inner::Owned(v),
        }
    }
}

impl<T: Record> Deref for Records<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Owned(v) => v,
            Inner::Mapped { map, offset, len } => {
                // SAFETY: `mapped` checked that the range lies inside the mapping and
                // is aligned for T; T is plain old data with the file's layout (see
                // `Record`); the mapping lives as long as `self` holds the Arc, and
                // is read-only.
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset).cast::<T>(), *len) }
            }
        }
    }
}

impl<'a, T: Record> IntoIterator for &'a Records<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Record> DerefMut for Records<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.to_mut()
    }
}

impl<T: Record + PartialEq> PartialEq for Records<T> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl<T: Record + std::fmt::Debug> std::fmt::Debug for Records<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mapped_records_read_in_place_and_copy_on_write() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[9, 1, 0, 0, 0, 2, 0, 0, 0]).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&f) }.unwrap());
        let bytes: Records<u8> = Records::mapped(&map, 1, 8).unwrap();
        assert!(bytes.is_mapped());
        assert_eq!(&bytes[..], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert!(Records::<u8>::mapped(&map, 2, 8).is_none(), "past the end");
        let mut copy: Records<u8> = Records::mapped(&map, 0, 2).unwrap();
        copy[0] = 7;
        assert!(!copy.is_mapped());
        assert_eq!(&copy[..], &[7, 1]);
        assert_eq!(map[0], 9, "the file is untouched");
    }
}
