//! Hook output: one size-capped log file per script, and the tail of a run kept
//! for the status.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

use super::MAX_LINE_CHARS;

/// How much of a run's output is read back to find its last lines.
pub(super) const TAIL_READ_MAX: u64 = 64 * 1024;

/// An open log file and where this run's output starts in it.
pub(super) struct RunLog {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) start: u64,
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
    let start = file.metadata()?.len();
    Ok(RunLog {
        file,
        path: path.to_owned(),
        start,
    })
}

/// The last `max_lines` lines written to `file` after `start` (this run's
/// output), each cut at [`MAX_LINE_CHARS`].
pub(super) fn read_tail(file: &File, start: u64, max_lines: usize) -> io::Result<Vec<String>> {
    if max_lines == 0 {
        return Ok(Vec::new());
    }
    let end = file.metadata()?.len();
    if end <= start {
        return Ok(Vec::new());
    }
    let from = start.max(end - TAIL_READ_MAX.min(end));
    let len = usize::try_from(end - from).unwrap_or(0);
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match file.read_at(rest, from + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.split('\n').collect();
    if from > start && !lines.is_empty() {
        // Started mid-line.
        lines.remove(0);
    }
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let skip = lines.len().saturating_sub(max_lines);
    Ok(lines
        .into_iter()
        .skip(skip)
        .map(|l| clip(l.trim_end_matches('\r')))
        .collect())
}

/// Cuts a line at [`MAX_LINE_CHARS`] characters.
pub(super) fn clip(line: &str) -> String {
    match line.char_indices().nth(MAX_LINE_CHARS) {
        Some((at, _)) => format!("{}…", line.get(..at).unwrap_or(line)),
        None => line.to_owned(),
    }
}
