//! [`SnapshotWriter`]: writes a standard tar / tar.gz / tar.zst that is also seekable
//! and carries its own snapfs index.
//!
//! The uncompressed tar stream (ustar headers, PAX `x` headers where needed) is cut
//! into chunks of `chunk_bytes`; each chunk is compressed on its own (a gzip member, a
//! zstd frame with content size) on the rayon pool and written in order, and a seek
//! point is recorded at each chunk start. Since the writer knows where every member's
//! data lands in the stream, it builds the index as it goes (the same
//! [`TreeBuilder`] the indexing pass uses). After the end-of-archive marker come the
//! encoded index (its own member / frame) and a fixed-size footer (see
//! [`crate::snapshot::format`]). Everything goes to a temporary file in the target
//! directory, which is fsynced and renamed over the final name by [`finish`].
//!
//! [`finish`]: SnapshotWriter::finish

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::archive::gzip::{GzipCheckpoint, GzipSeekTable};
use crate::archive::tar::{Data, Member, MemberKind};
use crate::archive::zstd::{ZstdCheckpoint, ZstdSeekTable};
use crate::archive::{Compression, SeekTable};
use crate::error::{Error, Result};
use crate::index::build::TreeBuilder;
use crate::index::format as index_format;
use crate::snapshot::format::{wrap_footer, Footer};

const BLOCK: usize = 512;
/// Largest value of an 11-digit octal field (size, mtime).
const MAX_OCTAL_11: u64 = 0o777_7777_7777;
/// Largest value of a 7-digit octal field (mode, uid, gid, devices).
const MAX_OCTAL_7: u64 = 0o777_7777;
/// Name of every PAX extended header (fixed, for deterministic output).
const PAX_NAME: &[u8] = b"././@PaxHeader";

/// How the tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputCompression {
    /// Plain tar.
    None,
    /// gzip members, one per chunk, at this level (0..=9).
    Gzip {
        /// deflate level.
        level: u32,
    },
    /// zstd frames, one per chunk, at this level (1..=22).
    Zstd {
        /// zstd level.
        level: i32,
    },
}

impl OutputCompression {
    /// The matching reader-side compression.
    pub fn kind(self) -> Compression {
        match self {
            OutputCompression::None => Compression::None,
            OutputCompression::Gzip { .. } => Compression::Gzip,
            OutputCompression::Zstd { .. } => Compression::Zstd,
        }
    }
}

/// Options of a [`SnapshotWriter`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Compression of the output.
    pub compression: OutputCompression,
    /// Uncompressed bytes per independently compressed chunk (= seek point spacing).
    pub chunk_bytes: u64,
    /// Show a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Expected uncompressed bytes of entry data, for the progress bar's length.
    pub expected_bytes: Option<u64>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            compression: OutputCompression::Gzip { level: 6 },
            chunk_bytes: crate::index::build::DEFAULT_SPAN,
            progress: false,
            expected_bytes: None,
        }
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file; its content comes from `SnapshotEntry::data`.
    File,
    /// Directory.
    Dir,
    /// Symbolic link to `SnapshotEntry::link`.
    Symlink,
    /// Hard link to the earlier entry whose path is `SnapshotEntry::link`.
    Hardlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// One entry to archive.
pub struct SnapshotEntry {
    /// Cleaned relative path: components separated by `/`, no `.`/`..`/empty
    /// components, no leading or trailing `/`. Empty = the root directory (`./`).
    pub path: Vec<u8>,
    /// Kind.
    pub kind: EntryKind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds (0..1e9).
    pub mtime_nsec: u32,
    /// Access time (seconds, nanoseconds 0..1e9): a PAX `atime` record, as GNU tar
    /// writes with `--format=pax`. `None`: no record (readers then use the mtime).
    pub atime: Option<(i64, u32)>,
    /// Status change time, as `atime` (a PAX `ctime` record).
    pub ctime: Option<(i64, u32)>,
    /// File size (regular files; ignored otherwise).
    pub size: u64,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Symlink target, or the hard link's earlier path (cleaned like `path`).
    pub link: Vec<u8>,
    /// Extended attributes, in the order to store them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Regular files: a source of exactly `size` bytes.
    pub data: Option<Box<dyn Read + Send>>,
}

impl SnapshotEntry {
    /// An entry of `kind` at `path` with everything else zero / empty.
    pub fn new(path: impl Into<Vec<u8>>, kind: EntryKind) -> Self {
        SnapshotEntry {
            path: path.into(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            atime: None,
            ctime: None,
            size: 0,
            dev_major: 0,
            dev_minor: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            data: None,
        }
    }
}

impl std::fmt::Debug for SnapshotEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotEntry")
            .field("path", &String::from_utf8_lossy(&self.path))
            .field("kind", &self.kind)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// What [`SnapshotWriter::finish`] reports.
#[derive(Debug, Clone)]
pub struct SnapshotSummary {
    /// The final path.
    pub path: PathBuf,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
    /// Entries added.
    pub entries: u64,
    /// Size of the file written.
    pub bytes: u64,
    /// Size of the uncompressed tar stream (entries + end marker).
    pub stream_bytes: u64,
    /// Seconds from `create` to the end of `finish`.
    pub seconds: f64,
}

/// Result of compressing one chunk on the pool: (sequence, input buffer back, output).
type Done = (u64, Vec<u8>, io::Result<Vec<u8>>);

/// Writes one snapshot; see the module documentation.
pub struct SnapshotWriter {
    final_path: PathBuf,
    tmp: tempfile::NamedTempFile,
    opts: WriterOptions,
    started: Instant,
    tree: TreeBuilder<'static>,
    entries: u64,
    /// Current chunk buffer (`chunk_len` long) and how much of it is filled.
    buf: Vec<u8>,
    fill: usize,
    chunk_len: usize,
    /// Uncompressed stream offset of `buf[0]`.
    chunk_start: u64,
    /// Chunks handed out / written, by sequence number.
    next_seq: u64,
    next_write: u64,
    in_flight: usize,
    max_in_flight: usize,
    reorder: BTreeMap<u64, (Vec<u8>, io::Result<Vec<u8>>)>,
    spare: Vec<Vec<u8>>,
    tx: Sender<Done>,
    rx: Receiver<Done>,
    /// Uncompressed starts of chunks not yet written.
    starts: BTreeMap<u64, u64>,
    /// Bytes written to the file, and their hash.
    written: u64,
    sha: Sha256,
    gz_points: Vec<GzipCheckpoint>,
    zs_points: Vec<ZstdCheckpoint>,
    bar: Option<indicatif::ProgressBar>,
    /// A failure poisons the writer (the temp file is then discarded on drop).
    failed: bool,
    /// For an `s3://` output: the multipart upload the bytes stream into (instead of
    /// the temporary file), completed by `finish`, aborted on drop.
    upload: Option<Box<dyn crate::source::ObjectWriter>>,
}

impl SnapshotWriter {
    /// Starts a snapshot that [`finish`](Self::finish) will move to `final_path`.
    pub fn create(final_path: &Path, opts: WriterOptions) -> Result<Self> {
        let chunk_len = usize::try_from(opts.chunk_bytes)
            .ok()
            .filter(|&c| (BLOCK..=1 << 30).contains(&c))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "chunk size {} must be between 512 bytes and 1 GiB",
                    opts.chunk_bytes
                ))
            })?;
        match opts.compression {
            OutputCompression::Gzip { level } if level > 9 => {
                return Err(Error::Usage(format!("gzip level {level} is not in 0..=9")))
            }
            OutputCompression::Zstd { level } if !(1..=22).contains(&level) => {
                return Err(Error::Usage(format!("zstd level {level} is not in 1..=22")))
            }
            _ => {}
        }
        let remote = crate::source::is_remote(final_path);
        let upload = match remote {
            true => Some(crate::source::start_upload(&final_path.to_string_lossy())?),
            false => None,
        };
        let temp_dir = std::env::temp_dir();
        let dir = match final_path.parent() {
            // An upload writes no file: the temporary one stays empty.
            _ if remote => temp_dir.as_path(),
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".snapfs-create-")
            .suffix(".tmp")
            // Like any new file: 0666 less the umask (tempfile's default is 0600).
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(|e| Error::io("cannot create a temporary file in", dir, e))?;
        let threads = rayon::current_num_threads().max(1);
        let (tx, rx) = channel();
        let bar = (opts.progress && io::stderr().is_terminal()).then(|| {
            let bar = match opts.expected_bytes {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Ok(SnapshotWriter {
            final_path: final_path.to_path_buf(),
            tmp,
            started: Instant::now(),
            // Root uid/gid/mtime only matter when no root entry is added; 0 keeps
            // the output deterministic.
            tree: TreeBuilder::new(Path::new("snapshot"), 0),
            entries: 0,
            buf: vec![0u8; chunk_len],
            fill: 0,
            chunk_len,
            chunk_start: 0,
            next_seq: 0,
            next_write: 0,
            in_flight: 0,
            max_in_flight: threads * 2 + 1,
            reorder: BTreeMap::new(),
            spare: Vec::new(),
            tx,
            rx,
            starts: BTreeMap::new(),
            written: 0,
            sha: Sha256::new(),
            gz_points: Vec::new(),
            zs_points: Vec::new(),
            bar,
            opts,
            failed: false,
            upload,
        })
    }

    /// The temporary file being written (e.g. to leave it out of a directory walk).
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Uncompressed stream bytes produced so far.
    pub fn stream_position(&self) -> u64 {
        self.chunk_start + self.fill as u64
    }

    fn io_err(&self, e: io::Error) -> Error {
        Error::io("writing", self.tmp.path(), e)
    }

    /// Appends one entry. Regular files read their data source to the end.
    pub fn add(&mut self, entry: SnapshotEntry) -> Result<()> {
        if self.failed {
            return Err(Error::Internal(
                "snapshot writer used after a failure".into(),
            ));
        }
        let r = self.add_inner(entry);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn add_inner(&mut self, mut e: SnapshotEntry) -> Result<()> {
        let bad = |what: &str| {
            Error::Usage(format!(
                "snapshot entry {:?}: {what}",
                String::from_utf8_lossy(&e.path)
            ))
        };
        if !clean_rel(&e.path) {
            return Err(bad("path is not a clean relative path"));
        }
        if e.path.is_empty() && e.kind != EntryKind::Dir {
            return Err(bad("the root must be a directory"));
        }
        match e.kind {
            EntryKind::Hardlink if e.link.is_empty() || !clean_rel(&e.link) => {
                return Err(bad("hard link target is not a clean relative path"))
            }
            EntryKind::Symlink if e.link.is_empty() || e.link.contains(&0) => {
                return Err(bad("symlink target is empty or contains NUL"))
            }
            _ => {}
        }
        let nsec_ok = |t: Option<(i64, u32)>| t.is_none_or(|(_, ns)| ns < 1_000_000_000);
        if e.mtime_nsec >= 1_000_000_000 || !nsec_ok(e.atime) || !nsec_ok(e.ctime) {
            return Err(bad("nanoseconds out of range"));
        }
        if e.xattrs
            .iter()
            .any(|(n, _)| n.is_empty() || n.contains(&0) || n.contains(&b'='))
        {
            return Err(bad("invalid xattr name"));
        }
        let size = if e.kind == EntryKind::File { e.size } else { 0 };
        let mut name = if e.path.is_empty() {
            b"./".to_vec()
        } else {
            e.path.clone()
        };
        if e.kind == EntryKind::Dir && !e.path.is_empty() {
            name.push(b'/');
        }

        // PAX records, when the ustar header cannot say it all.
        let mut pax: Vec<u8> = Vec::new();
        let needs_pax = |v: &[u8], max: usize| v.len() > max || !v.is_ascii();
        if needs_pax(&name, 100) {
            pax_record(&mut pax, b"path", &name);
        }
        let has_link = matches!(e.kind, EntryKind::Symlink | EntryKind::Hardlink);
        if has_link && needs_pax(&e.link, 100) {
            pax_record(&mut pax, b"linkpath", &e.link);
        }
        if e.uid > MAX_OCTAL_7 {
            pax_record(&mut pax, b"uid", e.uid.to_string().as_bytes());
        }
        if e.gid > MAX_OCTAL_7 {
            pax_record(&mut pax, b"gid", e.gid.to_string().as_bytes());
        }
        let octal_mtime = u64::try_from(e.mtime).ok().filter(|&m| m <= MAX_OCTAL_11);
        if e.mtime_nsec != 0 || octal_mtime.is_none() {
            pax_record(
                &mut pax,
                b"mtime",
                pax_time(e.mtime, e.mtime_nsec).as_bytes(),
            );
        }
        for (key, t) in [(&b"atime"[..], e.atime), (&b"ctime"[..], e.ctime)] {
            if let Some((s, ns)) = t {
                pax_record(&mut pax, key, pax_time(s, ns).as_bytes());
            }
        }
        if size > MAX_OCTAL_11 {
            pax_record(&mut pax, b"size", size.to_string().as_bytes());
        }
        for (k, v) in &e.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }

        let header_offset = self.stream_position();
        if !pax.is_empty() {
            let mut h = tar::Header::new_ustar();
            fill_header(
                &mut h,
                PAX_NAME,
                b'x',
                0o644,
                0,
                0,
                0,
                pax.len() as u64,
                b"",
                (0, 0),
            );
            self.put(h.as_bytes())?;
            self.put(&pax)?;
            self.put_zeros(pad(pax.len() as u64))?;
        }
        let type_flag = match e.kind {
            EntryKind::File => b'0',
            EntryKind::Hardlink => b'1',
            EntryKind::Symlink => b'2',
            EntryKind::Char => b'3',
            EntryKind::Block => b'4',
            EntryKind::Dir => b'5',
            EntryKind::Fifo => b'6',
        };
        let devs = if matches!(e.kind, EntryKind::Char | EntryKind::Block) {
            if u64::from(e.dev_major) > MAX_OCTAL_7 || u64::from(e.dev_minor) > MAX_OCTAL_7 {
                return Err(bad("device number too large for a tar header"));
            }
            (e.dev_major, e.dev_minor)
        } else {
            (0, 0)
        };
        let mut h = tar::Header::new_ustar();
        fill_header(
            &mut h,
            &name,
            type_flag,
            e.mode & 0o7777,
            e.uid,
            e.gid,
            octal_mtime.unwrap_or(0),
            size,
            if has_link { &e.link } else { b"" },
            devs,
        );
        self.put(h.as_bytes())?;
        let data_offset = self.stream_position();
        if e.kind == EntryKind::File {
            let src = e.data.take();
            match src {
                Some(mut r) => self.put_reader(&mut r, size, &e.path)?,
                None if size == 0 => {}
                None => return Err(bad("regular file without a data source")),
            }
            self.put_zeros(pad(size))?;
        }
        let kind = match e.kind {
            EntryKind::File => MemberKind::File,
            EntryKind::Dir => MemberKind::Dir,
            EntryKind::Symlink => MemberKind::Symlink,
            EntryKind::Hardlink => MemberKind::Hardlink,
            EntryKind::Char => MemberKind::Char,
            EntryKind::Block => MemberKind::Block,
            EntryKind::Fifo => MemberKind::Fifo,
        };
        self.tree.add(Member {
            path: name,
            link: if has_link { e.link } else { Vec::new() },
            kind,
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            atime: e.atime,
            ctime: e.ctime,
            size,
            data: Data::Contiguous(data_offset),
            dev_major: devs.0,
            dev_minor: devs.1,
            xattrs: e.xattrs,
            header_offset,
        });
        self.entries += 1;
        Ok(())
    }

    /// Appends bytes to the uncompressed stream.
    fn put(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = (self.chunk_len - self.fill).min(data.len());
            self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == self.chunk_len {
                self.flush_chunk()?;
            }
        }
        Ok(())
    }

    fn put_zeros(&mut self, mut n: u64) -> Result<()> {
        const Z: [u8; BLOCK] = [0; BLOCK];
        while n > 0 {
            let k = n.min(BLOCK as u64) as usize;
            self.put(&Z[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Copies exactly `size` bytes of `r` into the stream (straight into the chunk
    /// buffer); fewer or more is an error naming `path`.
    fn put_reader(&mut self, r: &mut dyn Read, size: u64, path: &[u8]) -> Result<()> {
        let name = || String::from_utf8_lossy(path).into_owned();
        let mut left = size;
        while left > 0 {
            let room =
                (self.chunk_len - self.fill).min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match r.read(&mut self.buf[self.fill..self.fill + room]) {
                Ok(0) => {
                    return Err(Error::io(
                        "reading",
                        name(),
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "file shrank while being archived ({} of {size} bytes)",
                                size - left
                            ),
                        ),
                    ))
                }
                Ok(n) => n.min(room),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("reading", name(), e)),
            };
            self.fill += n;
            left -= n as u64;
            if let Some(bar) = &self.bar {
                bar.inc(n as u64);
            }
            if self.fill == self.chunk_len {
                self.flush_chunk()?;
            }
        }
        let mut one = [0u8; 1];
        loop {
            match r.read(&mut one) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(Error::io(
                        "reading",
                        name(),
                        io::Error::other(format!(
                            "file grew while being archived (more than {size} bytes)"
                        )),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading", name(), e)),
            }
        }
    }

    /// Hands the current (non-empty) chunk to the compressor, or writes it (plain).
    fn flush_chunk(&mut self) -> Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| vec![0u8; self.chunk_len]);
        let mut chunk = std::mem::replace(&mut self.buf, fresh);
        chunk.truncate(self.fill);
        let start = self.chunk_start;
        self.chunk_start += self.fill as u64;
        self.fill = 0;
        match self.opts.compression {
            OutputCompression::None => {
                self.emit(&chunk)?;
                chunk.resize(self.chunk_len, 0);
                self.spare.push(chunk);
            }
            comp => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.starts.insert(seq, start);
                let tx = self.tx.clone();
                rayon::spawn(move || {
                    let out = compress_chunk(&chunk, comp);
                    let _ = tx.send((seq, chunk, out));
                });
                self.in_flight += 1;
                while self.in_flight >= self.max_in_flight {
                    self.wait_one()?;
                }
            }
        }
        Ok(())
    }

    /// Waits for one compressed chunk and writes whatever is now in order.
    fn wait_one(&mut self) -> Result<()> {
        let (seq, input, out) = self
            .rx
            .recv()
            .map_err(|_| Error::Internal("compression worker vanished".into()))?;
        self.in_flight -= 1;
        self.reorder.insert(seq, (input, out));
        while let Some((input, out)) = self.reorder.remove(&self.next_write) {
            let seq = self.next_write;
            self.next_write += 1;
            let out = out.map_err(|e| self.io_err(e))?;
            let start = self.starts.remove(&seq).unwrap_or(0);
            self.record_point(start, &input);
            self.emit(&out)?;
            let mut input = input;
            input.resize(self.chunk_len, 0);
            if self.spare.len() < 2 {
                self.spare.push(input);
            }
        }
        Ok(())
    }

    /// Records the seek point of a chunk starting at `uncompressed` with bytes `chunk`.
    fn record_point(&mut self, uncompressed: u64, chunk: &[u8]) {
        match self.opts.compression {
            OutputCompression::None => {}
            OutputCompression::Gzip { .. } => self.gz_points.push(GzipCheckpoint {
                uncompressed,
                compressed: self.written,
                bits: 0,
                member_start: true,
                window: Default::default(),
                crcs: crate::archive::gzip::span_crcs(chunk),
            }),
            OutputCompression::Zstd { .. } => self.zs_points.push(ZstdCheckpoint {
                uncompressed,
                compressed: self.written,
            }),
        }
    }

    /// Writes file bytes (and hashes them).
    fn emit(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.upload {
            Some(up) => up
                .write(bytes)
                .map_err(|e| Error::io("writing", &self.final_path, e))?,
            None => self
                .tmp
                .as_file_mut()
                .write_all(bytes)
                .map_err(|e| Error::io("writing", self.tmp.path(), e))?,
        }
        self.sha.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn drain(&mut self) -> Result<()> {
        while self.in_flight > 0 {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Writes the end-of-archive marker, the index and the footer, syncs, and moves
    /// the file to its final name. Dropping the writer instead discards everything.
    pub fn finish(mut self) -> Result<SnapshotSummary> {
        if self.failed {
            return Err(Error::Internal(
                "snapshot writer used after a failure".into(),
            ));
        }
        // End of archive: two zero blocks.
        self.put_zeros(2 * BLOCK as u64)?;
        let stream_size = self.stream_position();
        self.flush_chunk()?;
        self.drain()?;
        let comp = self.opts.compression.kind();
        let table = match self.opts.compression {
            OutputCompression::None => SeekTable::Plain,
            OutputCompression::Gzip { .. } => SeekTable::Gzip(GzipSeekTable {
                checkpoints: std::mem::take(&mut self.gz_points),
                uncompressed_size: stream_size,
            }),
            OutputCompression::Zstd { .. } => {
                let points = std::mem::take(&mut self.zs_points);
                SeekTable::Zstd(ZstdSeekTable {
                    frame_count: points.len() as u64,
                    checkpoints: points,
                    uncompressed_size: stream_size,
                })
            }
        };
        let tree = std::mem::replace(&mut self.tree, TreeBuilder::new(Path::new("snapshot"), 0));
        let mut index = tree.finish()?;
        if index.skipped > 0 {
            return Err(Error::Usage(format!(
                "{} snapshot entries could not be placed in the tree (see the warnings)",
                index.skipped
            )));
        }
        index.stream_size = stream_size;
        index.span_bytes = self.opts.chunk_bytes;
        index.table = Arc::new(table);
        let blob = index_format::encode(&index);
        drop(index);

        // The index: padded to a block, in its own member / frame.
        let mut padded = blob.clone();
        padded.resize(blob.len() + pad(blob.len() as u64) as usize, 0);
        let compressed_offset = self.written;
        let wrapped = match self.opts.compression {
            OutputCompression::None => padded,
            c => compress_chunk(&padded, c).map_err(|e| self.io_err(e))?,
        };
        let compressed_len = match comp {
            Compression::None => blob.len() as u64,
            _ => wrapped.len() as u64,
        };
        self.emit(&wrapped)?;
        let footer = Footer {
            compression: comp,
            index_offset: stream_size,
            index_len: blob.len() as u64,
            compressed_offset,
            compressed_len,
            index_crc: crc32fast::hash(&blob),
        };
        self.emit(&wrap_footer(&footer.encode(), comp))?;

        if self.upload.is_none() {
            let file = self.tmp.as_file();
            file.sync_all().map_err(|e| self.io_err(e))?;
        }
        let sha256 = hex(&std::mem::take(&mut self.sha).finalize());
        let path = self.final_path.clone();
        let SnapshotWriter {
            tmp,
            bar,
            entries,
            written,
            started,
            upload,
            ..
        } = self;
        if let Some(up) = upload {
            // The object appears under its key only now, whole.
            if let Some(bar) = &bar {
                bar.set_message("completing the upload");
            }
            up.finish()?;
        } else {
            tmp.persist(&path)
                .map_err(|e| Error::io("cannot rename the snapshot to", &path, e.error))?;
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("cannot sync directory", dir, e))?;
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok(SnapshotSummary {
            path,
            sha256,
            entries,
            bytes: written,
            stream_bytes: stream_size,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// A path made of normal components separated by single slashes (or empty).
fn clean_rel(p: &[u8]) -> bool {
    p.is_empty()
        || (!p.contains(&0)
            && p.split(|&b| b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b".."))
}

fn pad(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

/// Appends one PAX record `"<len> <key>=<value>\n"` (len counts itself).
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while len != base + len.to_string().len() {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// PAX time `[-]SECS.NNNNNNNNN` for (secs, nsec) with nsec in 0..1e9.
fn pax_time(secs: i64, nsec: u32) -> String {
    if secs < 0 && nsec > 0 {
        // -1.5 s is (-2, 500000000).
        let whole = -(i128::from(secs) + 1);
        format!("-{whole}.{:09}", 1_000_000_000 - nsec)
    } else {
        format!("{secs}.{nsec:09}")
    }
}

/// Writes `v` as zero-padded octal filling `field` but its last byte (a NUL).
/// Values that do not fit are written as 0 (a PAX record carries them).
fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    let s = if s.len() > digits {
        "0".repeat(digits)
    } else {
        s
    };
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

#[allow(clippy::too_many_arguments)]
fn fill_header(
    h: &mut tar::Header,
    name: &[u8],
    type_flag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: &[u8],
    devs: (u32, u32),
) {
    if let Some(u) = h.as_ustar_mut() {
        let n = name.len().min(100);
        u.name[..n].copy_from_slice(&name[..n]);
        octal(&mut u.mode, u64::from(mode));
        octal(&mut u.uid, uid);
        octal(&mut u.gid, gid);
        octal(&mut u.size, size);
        octal(&mut u.mtime, mtime);
        u.typeflag[0] = type_flag;
        let l = link.len().min(100);
        u.linkname[..l].copy_from_slice(&link[..l]);
        octal(&mut u.dev_major, u64::from(devs.0));
        octal(&mut u.dev_minor, u64::from(devs.1));
    }
    h.set_cksum();
}

thread_local! {
    static DEFLATE: std::cell::RefCell<Option<(u32, flate2::Compress)>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses one chunk into a self-contained gzip member or zstd frame.
fn compress_chunk(data: &[u8], comp: OutputCompression) -> io::Result<Vec<u8>> {
    match comp {
        OutputCompression::None => Ok(data.to_vec()),
        OutputCompression::Gzip { level } => DEFLATE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                *slot = Some((
                    level,
                    flate2::Compress::new(flate2::Compression::new(level), false),
                ));
            }
            let (_, c) = slot.as_mut().expect("just set");
            c.reset();
            gzip_member(c, data)
        }),
        OutputCompression::Zstd { level } => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                let mut c = zstd::bulk::Compressor::new(level)?;
                c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))?;
                *slot = Some((level, c));
            }
            let (_, c) = slot.as_mut().expect("just set");
            c.compress(data)
        }),
    }
}

/// One gzip member: fixed header (mtime 0, no name, OS 255), raw deflate, CRC, size.
fn gzip_member(c: &mut flate2::Compress, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 1024);
    out.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xff]);
    loop {
        let consumed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
        let input = data.get(consumed..).unwrap_or(&[]);
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity() / 4 + 4096);
        }
        match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => break,
            Ok(_) => {}
            Err(e) => return Err(io::Error::other(e)),
        }
    }
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
