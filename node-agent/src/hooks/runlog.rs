//! Hook output: one size-capped log file per script, and the tail of a run kept
//! for the status.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;

use super::MAX_LINE_BYTES;

/// An open log file.
pub(super) struct RunLog {
    pub(super) file: File,
}

/// Opens (creating) a script's log file for appending, rotating it to
/// `.log.1` first when the header would take it past the cap, and writes the
/// header. Symlinks are not followed.
pub(super) fn open_log(path: &Path, cap: u64, header: &str) -> io::Result<RunLog> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
    }
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.len() > 0
        && meta.len().saturating_add(header.len() as u64) > cap
    {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        fs::rename(path, PathBuf::from(old))?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    file.write_all(header.as_bytes())?;
    Ok(RunLog { file })
}

/// Bytes of a run's latest output kept in memory for its tail.
pub(super) const TAIL_KEEP_BYTES: usize = 64 * 1024;

/// A run's output as the agent reads it from the script's stdout and
/// stderr pipes: written to the script's log up to the cap, the rest read
/// and discarded (so the script never blocks on a full pipe and the disk
/// never fills), the latest [`TAIL_KEEP_BYTES`] kept for the tail. Output
/// of daemons the script started (they inherit its pipes) goes the same
/// way, counted against the same run's cap, for as long as they write.
pub(super) struct Capture {
    log: Option<File>,
    cap: u64,
    logged: u64,
    discarded: u64,
    tail: VecDeque<u8>,
    /// The tail lost bytes at its start (it may begin mid-line).
    tail_cut: bool,
}

/// A [`Capture`] shared by the relays of one run and the run itself.
pub(super) type SharedCapture = Arc<Mutex<Capture>>;

impl Capture {
    /// A capture writing to `log` (when there is one) at most `cap` bytes.
    pub(super) fn new(log: Option<File>, cap: u64) -> SharedCapture {
        Arc::new(Mutex::new(Capture {
            log,
            cap,
            logged: 0,
            discarded: 0,
            tail: VecDeque::new(),
            tail_cut: false,
        }))
    }

    /// Takes one chunk of output.
    pub(super) fn take(&mut self, chunk: &[u8]) {
        let room = usize::try_from(self.cap.saturating_sub(self.logged)).unwrap_or(usize::MAX);
        let (kept, dropped) = chunk.split_at(room.min(chunk.len()));
        if !kept.is_empty() {
            if let Some(f) = &mut self.log
                && f.write_all(kept).is_err()
            {
                self.log = None;
            }
            self.logged += kept.len() as u64;
        }
        self.discarded += dropped.len() as u64;
        if chunk.len() >= TAIL_KEEP_BYTES {
            self.tail_cut |= !self.tail.is_empty() || chunk.len() > TAIL_KEEP_BYTES;
            self.tail.clear();
            self.tail
                .extend(chunk.get(chunk.len() - TAIL_KEEP_BYTES..).unwrap_or(chunk));
        } else {
            self.tail.extend(chunk);
            let over = self.tail.len().saturating_sub(TAIL_KEEP_BYTES);
            if over > 0 {
                self.tail.drain(..over);
                self.tail_cut = true;
            }
        }
    }

    /// Bytes written to the log, and bytes read past the cap and dropped.
    pub(super) fn counts(&self) -> (u64, u64) {
        (self.logged, self.discarded)
    }

    /// The last `max_lines` lines of the output so far, each escaped and
    /// cut ([`clip`]).
    pub(super) fn tail_lines(&self, max_lines: usize) -> Vec<String> {
        if max_lines == 0 || self.tail.is_empty() {
            return Vec::new();
        }
        let (a, b) = self.tail.as_slices();
        let bytes = [a, b].concat();
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        if self.tail_cut && !lines.is_empty() {
            // Starts mid-line.
            lines.remove(0);
        }
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let skip = lines.len().saturating_sub(max_lines);
        lines
            .into_iter()
            .skip(skip)
            .map(|l| clip(&String::from_utf8_lossy(l.strip_suffix(b"\r").unwrap_or(l))))
            .collect()
    }
}

/// Reads `stream` to its end into `capture`.
pub(super) async fn relay<R>(mut stream: R, capture: SharedCapture)
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                let chunk = buf.get(..n).unwrap_or_default();
                capture
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(chunk);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A line as a status shows it: control characters (and the bidirectional
/// overrides that reorder what a reader sees) escaped as `\xNN` or
/// `\u{NNNN}`, then cut to at most [`MAX_LINE_BYTES`] bytes on a character
/// boundary, ending in `…` when cut.
pub(super) fn clip(line: &str) -> String {
    clip_to(line, MAX_LINE_BYTES)
}

/// [`clip`] to at most `max` bytes (at least the 3 of `…`).
pub fn clip_to(line: &str, max: usize) -> String {
    const CUT: &str = "…";
    let limit = max.max(CUT.len());
    let mut out = String::new();
    // Where to cut: the last whole piece that leaves room for the mark.
    let mut fits = 0;
    for c in line.chars() {
        let mut utf8 = [0u8; 4];
        let escaped = escape(c);
        let piece = match &escaped {
            Some(e) => e.as_str(),
            None => c.encode_utf8(&mut utf8),
        };
        if out.len() + piece.len() > limit {
            out.truncate(fits);
            out.push_str(CUT);
            return out;
        }
        out.push_str(piece);
        if out.len() + CUT.len() <= limit {
            fits = out.len();
        }
    }
    out
}

/// The escape of a character a status must not show raw, or `None`.
fn escape(c: char) -> Option<String> {
    let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if c.is_control() || bidi {
        let code = u32::from(c);
        Some(if code < 0x100 {
            format!("\\x{code:02x}")
        } else {
            format!("\\u{{{code:04x}}}")
        })
    } else {
        None
    }
}
