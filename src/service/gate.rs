//! The freeze gate of a served view: every call that changes the tree passes a
//! shared gate, and a cut closes it ([`Gate::freeze`]) so that the tree it reads holds
//! still — calls that would change it wait until the cut is done, reads go on. This
//! is how a volume in use (its containers paused) is cut consistently.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::Result;
use crate::index::tree::{
    Attr, DirPlusSink, DirSink, FreeSpace, FsStats, Owner, ReadBytes, SetAttr, Tree,
};

/// A tree behind a gate.
pub struct Gate {
    tree: Arc<dyn Tree>,
    open: RwLock<()>,
}

impl Gate {
    /// `tree` behind an open gate.
    pub fn new(tree: Box<dyn Tree>) -> Arc<Gate> {
        Arc::new(Gate {
            tree: Arc::from(tree),
            open: RwLock::new(()),
        })
    }

    /// The tree itself (for a cut, while frozen).
    pub fn tree(&self) -> Arc<dyn Tree> {
        self.tree.clone()
    }

    /// Closes the gate until the guard is dropped: changes in flight finish first,
    /// new ones wait.
    pub fn freeze(&self) -> RwLockWriteGuard<'_, ()> {
        self.open.write().unwrap_or_else(|p| p.into_inner())
    }

    fn pass(&self) -> RwLockReadGuard<'_, ()> {
        self.open.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The tree a gated view serves: forwards everything, changes through the gate.
pub struct GatedTree(pub Arc<Gate>);

impl Tree for GatedTree {
    fn attr(&self, ino: u64) -> Result<Attr> {
        self.0.tree.attr(ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        self.0.tree.lookup(parent, name)
    }
    fn read_dir(&self, ino: u64, offset: u64, sink: &mut DirSink<'_>) -> Result<()> {
        self.0.tree.read_dir(ino, offset, sink)
    }
    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        self.0.tree.read_link(ino)
    }
    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>> {
        self.0.tree.xattr_names(ino)
    }
    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.0.tree.xattr(ino, name)
    }
    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadBytes> {
        self.0.tree.read(ino, offset, size)
    }
    fn seek_data(&self, ino: u64, offset: u64, data: bool) -> Result<u64> {
        self.0.tree.seek_data(ino, offset, data)
    }
    fn stats(&self) -> FsStats {
        self.0.tree.stats()
    }
    fn read_dir_plus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirPlusSink<'_>,
    ) -> Result<()> {
        self.0.tree.read_dir_plus(ino, fh, offset, sink)
    }
    fn forget(&self, ino: u64, nlookup: u64) {
        self.0.tree.forget(ino, nlookup)
    }
    fn fallocate(&self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.fallocate(ino, fh, offset, length, mode)
    }
    fn writable(&self) -> bool {
        self.0.tree.writable()
    }
    fn free_space(&self) -> Option<FreeSpace> {
        self.0.tree.free_space()
    }
    fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let _open = self.0.pass();
        self.0.tree.open(ino, flags)
    }
    fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> Result<(u64, u64)> {
        let _open = self.0.pass();
        self.0.tree.create(parent, name, mode, flags, owner)
    }
    fn flush(&self, ino: u64, fh: u64) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.flush(ino, fh)
    }
    fn release(&self, ino: u64, fh: u64) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.release(ino, fh)
    }
    fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.fsync(ino, datasync)
    }
    fn open_dir(&self, ino: u64) -> Result<u64> {
        self.0.tree.open_dir(ino)
    }
    fn read_dir_handle(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<()> {
        self.0.tree.read_dir_handle(ino, fh, offset, sink)
    }
    fn release_dir(&self, ino: u64, fh: u64) -> Result<()> {
        self.0.tree.release_dir(ino, fh)
    }
    fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let _open = self.0.pass();
        self.0.tree.write(ino, fh, offset, data)
    }
    fn set_attr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        let _open = self.0.pass();
        self.0.tree.set_attr(ino, set)
    }
    fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, owner: Owner) -> Result<u64> {
        let _open = self.0.pass();
        self.0.tree.mknod(parent, name, mode, rdev, owner)
    }
    fn mkdir(&self, parent: u64, name: &[u8], mode: u32, owner: Owner) -> Result<u64> {
        let _open = self.0.pass();
        self.0.tree.mkdir(parent, name, mode, owner)
    }
    fn symlink(&self, parent: u64, name: &[u8], target: &[u8], owner: Owner) -> Result<u64> {
        let _open = self.0.pass();
        self.0.tree.symlink(parent, name, target, owner)
    }
    fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<u64> {
        let _open = self.0.pass();
        self.0.tree.link(ino, parent, name)
    }
    fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.unlink(parent, name)
    }
    fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.rmdir(parent, name)
    }
    fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        let _open = self.0.pass();
        self.0
            .tree
            .rename(parent, name, new_parent, new_name, flags)
    }
    fn set_xattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.set_xattr(ino, name, value, flags)
    }
    fn remove_xattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        let _open = self.0.pass();
        self.0.tree.remove_xattr(ino, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Empty;
    impl Tree for Empty {
        fn attr(&self, _: u64) -> Result<Attr> {
            Err(crate::error::Error::Internal("none".into()))
        }
        fn lookup(&self, _: u64, _: &[u8]) -> Result<u64> {
            Ok(1)
        }
        fn read_dir(&self, _: u64, _: u64, _: &mut DirSink<'_>) -> Result<()> {
            Ok(())
        }
        fn read_link(&self, _: u64) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn xattr_names(&self, _: u64) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn xattr(&self, _: u64, _: &[u8]) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn read(&self, _: u64, _: u64, _: u32) -> Result<ReadBytes> {
            Ok(ReadBytes::empty())
        }
        fn seek_data(&self, _: u64, o: u64, _: bool) -> Result<u64> {
            Ok(o)
        }
        fn stats(&self) -> FsStats {
            FsStats {
                blocks: 0,
                files: 0,
            }
        }
    }

    #[test]
    fn a_frozen_gate_holds_changes_but_not_reads() {
        let gate = Gate::new(Box::new(Empty));
        let tree = GatedTree(gate.clone());
        let done = Arc::new(AtomicBool::new(false));
        let frozen = gate.freeze();
        assert_eq!(tree.lookup(1, b"x").unwrap(), 1);
        let t = {
            let done = done.clone();
            std::thread::spawn(move || {
                let _ = tree.unlink(1, b"x");
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst));
        drop(frozen);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }
}
