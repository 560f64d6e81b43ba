//! The one error type of snapfs: what went wrong, in which archive, at which entry or
//! offset; and its mapping to an errno for FUSE replies (in one place, [`Error::errno`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Result alias used across snapfs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in snapfs, with enough context for one readable line.
#[derive(Debug)]
pub enum Error {
    /// An I/O error while reading or writing `path`.
    Io {
        /// What we were doing, e.g. "reading archive".
        what: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The archive's bytes are malformed (bad header, truncated data, corrupt stream).
    Archive {
        /// The archive file.
        archive: PathBuf,
        /// The member involved, if known.
        entry: Option<String>,
        /// Offset in the uncompressed tar stream (or the compressed file, as the message says).
        offset: Option<u64>,
        /// What is wrong.
        message: String,
    },
    /// A persisted index is unusable (corrupt, other version, other archive).
    Index {
        /// The index file.
        path: PathBuf,
        /// Why it is rejected.
        message: String,
    },
    /// A container image (OCI layout, OCI archive, `docker save` archive) is malformed,
    /// incomplete, or has no image that matches the selection.
    Image {
        /// The image as given (a file or a layout directory).
        image: PathBuf,
        /// What is wrong, naming the blob (by digest or path) or the reference.
        message: String,
    },
    /// A remote object (`s3://`, `http(s)://`) cannot be used: missing, access
    /// denied, unreachable, or its server ignores Range requests.
    Remote {
        /// The URL as given.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A request that the filesystem answers with a plain errno (ENOENT, EROFS, ...).
    Errno(i32),
    /// Bad command-line usage or configuration.
    Usage(String),
    /// A resource (an upper dir, a view) is held by another snapfs process or view.
    InUse {
        /// The resource.
        path: PathBuf,
        /// Who holds it, e.g. "another snapfs mount".
        holder: String,
    },
    /// A mountpoint cannot be unmounted now (files open, a process inside it).
    Busy {
        /// The mountpoint.
        path: PathBuf,
    },
    /// A mountpoint already has a FUSE (or snapfs) mount on it.
    AlreadyMounted {
        /// The mountpoint.
        path: PathBuf,
        /// The file system type there, e.g. "fuse.snapfs".
        fstype: String,
    },
    /// A path is not what an operation needs (not a mountpoint, not an upper dir,
    /// not a regular file, ...).
    NotA {
        /// The path.
        path: PathBuf,
        /// What it should have been, e.g. "snapfs upper dir".
        expected: &'static str,
        /// Details, if any (what it is instead).
        detail: Option<String>,
    },
    /// A snapfs daemon or service reported an error (its own one line, relayed).
    Daemon(String),
    /// A request to the snapfs service cannot be served as asked (malformed, an
    /// unknown view, a view busy being set up), or its state file is unusable.
    Service(String),
    /// An internal invariant broke (a worker vanished, a writer reused after failure).
    Internal(String),
    /// A containerd snapshot request that the snapshot model refuses; the code is
    /// containerd's class of error (its gRPC status).
    Snapshot {
        /// Why.
        code: SnapshotCode,
        /// One line naming the snapshot.
        message: String,
    },
}

/// The classes of [`Error::Snapshot`], as containerd's errdefs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotCode {
    /// No snapshot (or parent, or content) of that name.
    NotFound,
    /// The name is taken (or the target layer exists already).
    AlreadyExists,
    /// The snapshot is of the wrong kind, or has children.
    FailedPrecondition,
    /// A malformed request.
    InvalidArgument,
}

impl Error {
    /// An I/O error with a description and a path.
    pub fn io(what: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            what,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A malformed-archive error.
    pub fn archive(
        archive: impl AsRef<Path>,
        entry: Option<&[u8]>,
        offset: Option<u64>,
        message: impl Into<String>,
    ) -> Self {
        Error::Archive {
            archive: archive.as_ref().to_path_buf(),
            entry: entry.map(|e| String::from_utf8_lossy(e).into_owned()),
            offset,
            message: message.into(),
        }
    }

    /// An image error.
    pub fn image(image: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Image {
            image: image.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Archive { .. } => libc::EIO,
            Error::Index { .. } => libc::EIO,
            Error::Image { .. } => libc::EIO,
            Error::Remote { .. } => libc::EIO,
            Error::Errno(e) => *e,
            Error::Usage(_) | Error::NotA { .. } | Error::Service(_) => libc::EINVAL,
            Error::InUse { .. } | Error::Busy { .. } | Error::AlreadyMounted { .. } => libc::EBUSY,
            Error::Daemon(_) | Error::Internal(_) => libc::EIO,
            Error::Snapshot { code, .. } => match code {
                SnapshotCode::NotFound => libc::ENOENT,
                SnapshotCode::AlreadyExists => libc::EEXIST,
                SnapshotCode::FailedPrecondition | SnapshotCode::InvalidArgument => libc::EINVAL,
            },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
            Error::Archive {
                archive,
                entry,
                offset,
                message,
            } => {
                write!(f, "archive {}", archive.display())?;
                if let Some(e) = entry {
                    write!(f, ", entry {e:?}")?;
                }
                if let Some(o) = offset {
                    write!(f, " (offset {o})")?;
                }
                write!(f, ": {message}")
            }
            Error::Index { path, message } => {
                write!(f, "index {}: {message}", path.display())
            }
            Error::Image { image, message } => {
                write!(f, "image {}: {message}", image.display())
            }
            Error::Remote { url, message } => write!(f, "remote object {url}: {message}"),
            Error::Errno(e) => write!(f, "{}", io::Error::from_raw_os_error(*e)),
            Error::Usage(m) | Error::Daemon(m) | Error::Service(m) => write!(f, "{m}"),
            Error::Snapshot { message, .. } => write!(f, "{message}"),
            Error::InUse { path, holder } => {
                write!(f, "{} is in use by {holder}", path.display())
            }
            Error::Busy { path } => write!(
                f,
                "{} is busy (files open or a process inside it); close them or use --lazy",
                path.display()
            ),
            Error::AlreadyMounted { path, fstype } => write!(
                f,
                "{} already has a {fstype} mount on it; unmount it first (snapfs umount {})",
                path.display(),
                path.display()
            ),
            Error::NotA {
                path,
                expected,
                detail,
            } => {
                write!(f, "{} is not a {expected}", path.display())?;
                if let Some(d) = detail {
                    write!(f, " ({d})")?;
                }
                Ok(())
            }
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
