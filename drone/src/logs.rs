//! Backend logs on a drone: where each backend's output is kept, how much of it and for how
//! long, and reading it back (the last lines, then following new output).
//!
//! **Files.** A backend's output lives in `<dir>/<backend>.log` and `<backend>.log.1`, the
//! half before it: the writer moves the current file to `.1` when it reaches half of
//! `max_bytes` (replacing the older `.1`), so a backend keeps between half of `max_bytes` and
//! all of it, always its newest output. The process runtime writes its children's output here
//! while they run ([`LogWriter`]); the Docker runtime reads a running container's logs from
//! the engine and archives them here when the container ends ([`LogFiles::archive`]), so the
//! logs of ended backends read the same whatever ran them.
//!
//! **Retention.** [`LogFiles::sweep`] (on a period: [`LogFiles::run_janitor`]) removes the
//! files of backends that are not being written and were last written more than `retention`
//! ago: the logs of an ended backend stay readable for the retention period after its end.
//!
//! **Reading.** [`LogFiles::read`] sends the last lines of both files, in order, as chunks for
//! the wire ([`Chunker`]); a follow then waits for the writer's signal (or polls, as a safety
//! net) and sends what is appended, moving to the new file when the writer rotates, until the
//! writer is gone and everything is sent. Files are read and written in small blocks inline
//! rather than on the blocking pool: they are local, and each call is a few microseconds.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use hangar_core::BackendId;
use hangar_core::drone::{LOG_CHUNK_MAX, LogsFailure};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The default bound on one backend's kept output (`--log-max-bytes`).
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// The default time an ended backend's logs are kept (`--log-retention`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The smallest `max_bytes` accepted: below this a rotation would follow every line.
pub const MIN_MAX_BYTES: u64 = 4096;

/// How often a follow looks at its file when no write was signalled: the writer signals every
/// write, so this only bounds how late a missed signal is noticed.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Bytes read from a file per call.
const BLOCK: usize = 64 * 1024;

/// Where the chunks of one log request go (the agent forwards them to the scheduler).
pub type LogSink = mpsc::Sender<String>;

/// Configuration of a drone's [`LogFiles`].
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Where the files live (`<data dir>/logs`).
    pub dir: PathBuf,
    /// The drone's name, for messages.
    pub drone: String,
    /// The most output kept per backend, in bytes (see the module docs).
    pub max_bytes: u64,
    /// How long the logs of an ended backend are kept.
    pub retention: Duration,
}

impl LogConfig {
    /// A configuration with the default bound and retention.
    pub fn new(dir: impl Into<PathBuf>, drone: impl Into<String>) -> Self {
        LogConfig {
            dir: dir.into(),
            drone: drone.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// Why a log request failed.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error(
        "no logs for backend {backend} on drone {drone}: it never ran there, or it ended more than {retention} ago (the drone's --log-retention)"
    )]
    NotFound {
        backend: BackendId,
        drone: String,
        retention: String,
    },
    #[error("this drone's {runtime} runtime keeps no backend logs")]
    NotKept { runtime: &'static str },
    #[error("cannot read the logs of backend {backend}: {source}")]
    Read {
        backend: BackendId,
        #[source]
        source: io::Error,
    },
    #[error("docker cannot read the logs of backend {backend}: {source}")]
    Docker {
        backend: BackendId,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot read the logs of backend {backend}: {reason}")]
    Unavailable { backend: BackendId, reason: String },
}

impl LogsError {
    /// The failure as it crosses the session.
    pub fn to_wire(&self) -> LogsFailure {
        let message = self.to_string();
        match self {
            LogsError::NotFound { .. } | LogsError::NotKept { .. } => {
                LogsFailure::NotFound { message }
            }
            LogsError::Read { .. } | LogsError::Docker { .. } | LogsError::Unavailable { .. } => {
                LogsFailure::Failed { message }
            }
        }
    }
}

/// A backend whose output is being written: followers wait on `written` (the bytes written so
/// far); the writer's end (its sender dropped) means the backend's output has ended.
#[derive(Debug)]
struct Live {
    /// Tells this writer from a later one of the same backend.
    writer: u64,
    written: watch::Receiver<u64>,
}

/// A drone's backend log files. See the module docs.
#[derive(Debug)]
pub struct LogFiles {
    config: LogConfig,
    /// The backends being written now. A std mutex, held for map operations only.
    live: Mutex<HashMap<BackendId, Live>>,
    next_writer: AtomicU64,
}

impl LogFiles {
    pub fn new(config: LogConfig) -> Self {
        LogFiles {
            config,
            live: Mutex::new(HashMap::new()),
            next_writer: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The current file of `backend`.
    pub fn path(&self, backend: &BackendId) -> PathBuf {
        self.config.dir.join(format!("{backend}.log"))
    }

    /// The half before the current file.
    fn previous_path(&self, backend: &BackendId) -> PathBuf {
        self.config.dir.join(format!("{backend}.log.1"))
    }

    /// Opens `backend`'s log to append the output of a run that starts now (after an earlier
    /// run's, if any), and counts it as written until the writer is dropped.
    pub fn writer(self: &std::sync::Arc<Self>, backend: &BackendId) -> io::Result<LogWriter> {
        std::fs::create_dir_all(&self.config.dir)?;
        let path = self.path(backend);
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let (written, rx) = watch::channel(0);
        let writer = self.next_writer.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).insert(
            backend.clone(),
            Live {
                writer,
                written: rx,
            },
        );
        Ok(LogWriter {
            files: self.clone(),
            backend: backend.clone(),
            writer,
            path,
            file,
            size,
            written,
        })
    }

    /// Keeps `output` (a finished backend's whole output, oldest first) as `backend`'s log:
    /// its newest `max_bytes`, from a line's start when it has to be cut. Written to a
    /// temporary file first, so a reader sees the old log or the new one, never half of it.
    pub fn archive(&self, backend: &BackendId, output: &[u8]) -> io::Result<()> {
        let kept = newest(output, self.config.max_bytes);
        std::fs::create_dir_all(&self.config.dir)?;
        let tmp = self.config.dir.join(format!("{backend}.log.tmp"));
        {
            let mut file = File::create(&tmp)?;
            file.write_all(kept)?;
            file.sync_data()?;
        }
        std::fs::rename(&tmp, self.path(backend))?;
        match std::fs::remove_file(self.previous_path(backend)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether any file of `backend`'s is kept.
    pub fn has(&self, backend: &BackendId) -> bool {
        self.path(backend).exists() || self.previous_path(backend).exists()
    }

    /// The error for a backend of which nothing is kept.
    pub fn not_found(&self, backend: &BackendId) -> LogsError {
        LogsError::NotFound {
            backend: backend.clone(),
            drone: self.config.drone.clone(),
            retention: human(self.config.retention),
        }
    }

    /// Sends `backend`'s kept output to `out`: its last `tail` lines (all with `None`), then
    /// with `follow` what is written from now on until the writer is gone (the backend ended)
    /// and all of it is sent, or `cancel` fires. A receiver that goes away ends it quietly.
    pub async fn read(
        &self,
        backend: &BackendId,
        tail: Option<u64>,
        follow: bool,
        out: &LogSink,
        cancel: &CancellationToken,
    ) -> Result<(), LogsError> {
        let err = |source| LogsError::Read {
            backend: backend.clone(),
            source,
        };
        // Whether it is written now is judged before the files are opened, so that a writer
        // that ends meanwhile has written everything the files will show.
        let live = lock(&self.live)
            .get(backend)
            .map(|live| live.written.clone());
        let current = self.path(backend);
        // The current file first: a rotation between the two opens then shows as the same
        // file twice (dropped below), never as a file missed.
        let cur = open_existing(&current).map_err(err)?;
        let mut prev = open_existing(&self.previous_path(backend)).map_err(err)?;
        if let (Some(c), Some(p)) = (&cur, &prev)
            && inode(c).map_err(err)? == inode(p).map_err(err)?
        {
            prev = None;
        }
        if cur.is_none() && prev.is_none() && live.is_none() {
            return Err(self.not_found(backend));
        }
        let has_cur = cur.is_some();
        let mut segments: Vec<File> = prev.into_iter().chain(cur).collect();
        let (first, offset) = match tail {
            Some(n) => tail_start(&mut segments, n).map_err(err)?,
            None => (0, 0),
        };
        let mut sender = Sender::new(out);
        let mut buf = vec![0u8; BLOCK];
        for (i, file) in segments.iter_mut().enumerate().skip(first) {
            let from = if i == first { offset } else { 0 };
            file.seek(SeekFrom::Start(from)).map_err(err)?;
            if !sender.drain(file, &mut buf).await.map_err(err)? {
                return Ok(());
            }
        }
        if !sender.open().await {
            return Ok(());
        }
        // The file a follow reads on: the current one, at its end after the tail.
        let mut cur = if has_cur { segments.pop() } else { None };
        if !follow {
            sender.finish().await;
            return Ok(());
        }
        let mut live = live;
        loop {
            // Judged before draining: once the writer is gone, one more drain reads all.
            let ended = live.as_ref().is_none_or(|rx| rx.has_changed().is_err());
            if let Some(file) = cur.as_mut()
                && !sender.drain(file, &mut buf).await.map_err(err)?
            {
                return Ok(());
            }
            // Rotated (or created): what is left of the old file was drained just now.
            if let Ok(meta) = std::fs::metadata(&current) {
                let same = match &cur {
                    Some(file) => inode(file).map_err(err)? == meta.ino(),
                    None => false,
                };
                if !same {
                    if let Some(file) = open_existing(&current).map_err(err)? {
                        cur = Some(file);
                    }
                    continue;
                }
            }
            if ended {
                sender.finish().await;
                return Ok(());
            }
            let signalled = async {
                match live.as_mut() {
                    Some(rx) => {
                        let _ = rx.changed().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => {
                    sender.finish().await;
                    return Ok(());
                }
                () = signalled => {}
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }

    /// Removes the files of backends not being written whose last write is more than the
    /// retention period before `now`, and leftover temporary files; returns how many.
    pub fn sweep(&self, now: SystemTime) -> io::Result<usize> {
        let live: HashSet<String> = lock(&self.live).keys().map(|b| b.to_string()).collect();
        let entries = match std::fs::read_dir(&self.config.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(backend) = [".log", ".log.1", ".log.tmp"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
            else {
                continue;
            };
            if live.contains(backend) {
                continue;
            }
            let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            if now.duration_since(modified).unwrap_or_default() >= self.config.retention {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    /// Sweeps now and then on a period (a tenth of the retention, between 1 s and a minute)
    /// until `cancel` fires.
    pub async fn run_janitor(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let every =
            (self.config.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            match self.sweep(SystemTime::now()) {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "removed backend logs past their retention"),
                Err(error) => {
                    tracing::warn!(dir = %self.config.dir.display(), %error, "cannot sweep backend logs")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// Appends one run's output to a backend's log, rotating it at half the bound. Dropping it
/// tells followers that the output has ended.
pub struct LogWriter {
    files: std::sync::Arc<LogFiles>,
    backend: BackendId,
    writer: u64,
    path: PathBuf,
    file: File,
    /// The current file's length.
    size: u64,
    written: watch::Sender<u64>,
}

impl LogWriter {
    /// Appends `data` (whole lines, preferably: see [`LineBuffer`]).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size >= self.files.config.max_bytes / 2 {
            std::fs::rename(&self.path, self.files.previous_path(&self.backend))?;
            self.file = open_append(&self.path)?;
            self.size = 0;
        }
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        self.written.send_modify(|n| *n += data.len() as u64);
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let mut live = lock(&self.files.live);
        if live
            .get(&self.backend)
            .is_some_and(|l| l.writer == self.writer)
        {
            live.remove(&self.backend);
        }
        // `written` is dropped after this: followers then see the end.
    }
}

/// Collects one stream's bytes (a child's stdout or stderr) into whole lines, so that two
/// streams written to one file interleave by line, not mid-line.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Adds `data`; returns what is ready to write: everything up to the last line's end, or
    /// all of it once a line grows past [`LOG_CHUNK_MAX`].
    pub fn push(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        self.pending.extend_from_slice(data);
        let cut = match self.pending.iter().rposition(|b| *b == b'\n') {
            Some(end) => end + 1,
            None if self.pending.len() >= LOG_CHUNK_MAX => self.pending.len(),
            None => return None,
        };
        let rest = self.pending.split_off(cut);
        Some(std::mem::replace(&mut self.pending, rest))
    }

    /// What is left (a last line without its end).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

/// Cuts output into chunks for the wire: at most [`LOG_CHUNK_MAX`] bytes, ending at a line's
/// end (a longer line is cut at a character boundary), converted to text (invalid UTF-8
/// replaced). A last line without its end waits for the end or for [`Chunker::finish`].
#[derive(Default)]
pub struct Chunker {
    pending: Vec<u8>,
}

impl Chunker {
    /// Adds `data`; returns the chunks that are complete.
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(data);
        let mut chunks = Vec::new();
        loop {
            let window = &self.pending[..self.pending.len().min(LOG_CHUNK_MAX)];
            let cut = match window.iter().rposition(|b| *b == b'\n') {
                Some(end) => end + 1,
                None if self.pending.len() >= LOG_CHUNK_MAX => char_boundary(window),
                None => break,
            };
            let rest = self.pending.split_off(cut);
            let chunk = std::mem::replace(&mut self.pending, rest);
            chunks.push(String::from_utf8_lossy(&chunk).into_owned());
        }
        chunks
    }

    /// What is left, if anything.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.pending);
        Some(String::from_utf8_lossy(&rest).into_owned())
    }
}

/// The longest prefix of `bytes` that does not end inside a UTF-8 sequence (all of it when
/// the last sequence is complete or not valid UTF-8 anyway, which the lossy conversion
/// replaces).
fn char_boundary(bytes: &[u8]) -> usize {
    let len = bytes.len();
    let is_continuation = |b: u8| b & 0b1100_0000 == 0b1000_0000;
    // The start of the last sequence: at most three continuation bytes follow a lead byte.
    let mut start = len.saturating_sub(1);
    while start > 0 && start + 3 >= len && is_continuation(bytes[start]) {
        start -= 1;
    }
    let needed = match bytes.get(start) {
        Some(0xF0..=0xF7) => 4,
        Some(0xE0..=0xEF) => 3,
        Some(0xC0..=0xDF) => 2,
        _ => 1,
    };
    if start > 0 && start + needed > len {
        start
    } else {
        len
    }
}

/// Sends chunks to a [`LogSink`], remembering whether anything was sent.
struct Sender<'a> {
    out: &'a LogSink,
    chunker: Chunker,
    sent: bool,
}

impl<'a> Sender<'a> {
    fn new(out: &'a LogSink) -> Self {
        Sender {
            out,
            chunker: Chunker::default(),
            sent: false,
        }
    }

    async fn send(&mut self, chunk: String) -> bool {
        self.sent = true;
        self.out.send(chunk).await.is_ok()
    }

    /// Reads `file` to its end, sending what is complete; false once the receiver is gone.
    async fn drain(&mut self, file: &mut File, buf: &mut [u8]) -> io::Result<bool> {
        loop {
            let n = match file.read(buf) {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for chunk in self.chunker.push(&buf[..n]) {
                if !self.send(chunk).await {
                    return Ok(false);
                }
            }
        }
    }

    /// Sends the opening (empty) chunk unless something was sent already.
    async fn open(&mut self) -> bool {
        self.sent || self.send(String::new()).await
    }

    /// Sends what is left.
    async fn finish(&mut self) {
        if let Some(rest) = self.chunker.finish() {
            let _ = self.send(rest).await;
        }
    }
}

/// Where the last `n` lines of `segments` (one stream, oldest first) begin: the segment and
/// the offset in it. A line ends at `\n`; a last line without one counts too.
fn tail_start(segments: &mut [File], n: u64) -> io::Result<(usize, u64)> {
    if n == 0 {
        let Some(last) = segments.len().checked_sub(1) else {
            return Ok((0, 0));
        };
        return Ok((last, segments[last].metadata()?.len()));
    }
    let mut found = 0u64;
    // The stream's very last byte ends the last line; it does not start one after it.
    let mut at_end = true;
    let mut buf = vec![0u8; BLOCK];
    for i in (0..segments.len()).rev() {
        let file = &mut segments[i];
        let mut end = file.metadata()?.len();
        while end > 0 {
            let start = end.saturating_sub(BLOCK as u64);
            let block = &mut buf[..(end - start) as usize];
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(block)?;
            for j in (0..block.len()).rev() {
                if std::mem::take(&mut at_end) {
                    continue;
                }
                if block[j] == b'\n' {
                    found += 1;
                    if found == n {
                        return Ok((i, start + j as u64 + 1));
                    }
                }
            }
            end = start;
        }
    }
    Ok((0, 0))
}

/// The newest `max` bytes of `output`, from a line's start when it had to be cut (unless no
/// line starts in them).
fn newest(output: &[u8], max: u64) -> &[u8] {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let start = output.len().saturating_sub(max);
    if start == 0 {
        return output;
    }
    let kept = &output[start..];
    match kept.iter().position(|b| *b == b'\n') {
        Some(end) if end + 1 < kept.len() => &kept[end + 1..],
        _ => kept,
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn inode(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.ino())
}

/// A duration as the flags take it: `24h`, `30m`, `90s`, `500ms`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_millis() != 0 || secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Locks a mutex, recovering from poisoning: no code path panics while holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
#[path = "logs_tests.rs"]
mod tests;
