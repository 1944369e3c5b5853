//! What `clipcap batch` writes: OpenAI's batch output lines, appended whole to a file that a
//! rerun resumes from (or to stdout).
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A line's key: its `custom_id`, or for a line that had none, its input line number (kept
/// in `error.line`).
pub fn line_key(v: &Value) -> Option<String> {
    match v.get("custom_id") {
        Some(Value::String(id)) => Some(id.clone()),
        _ => v
            .pointer("/error/line")
            .and_then(Value::as_u64)
            .map(|l| super::input::line_key(l as usize)),
    }
}

/// What an earlier run of this output already finished.
#[derive(Debug, Default)]
pub struct Done {
    pub keys: HashSet<String>,
    /// Lines kept as they were.
    pub kept: usize,
    /// Lines dropped: cut off by a kill (no newline), not JSON, or without a key.
    pub dropped: usize,
}

/// Reads the lines `path` already holds. When any is not a whole output line (a run killed
/// mid-write, or a line edited by hand), the file is rewritten atomically with the whole
/// ones only, so that the rerun appends to a file every reader can parse.
pub fn resume(path: &Path) -> Result<Done> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Done::default()),
        Err(e) => return Err(e).with_context(|| format!("reading output {}", path.display())),
    };
    let mut done = Done::default();
    let mut whole = Vec::with_capacity(bytes.len());
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let (line, terminated) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let l = &rest[..i];
                rest = &rest[i + 1..];
                (l, true)
            }
            None => {
                let l = rest;
                rest = &[];
                (l, false)
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let key = serde_json::from_slice::<Value>(line)
            .ok()
            .as_ref()
            .and_then(line_key);
        match key {
            Some(k) if terminated => {
                done.keys.insert(k);
                done.kept += 1;
                whole.extend_from_slice(line);
                whole.push(b'\n');
            }
            _ => done.dropped += 1,
        }
    }
    if done.dropped > 0 {
        crate::fsutil::write_atomic(path, &whole)
            .with_context(|| format!("repairing output {}", path.display()))?;
    }
    Ok(done)
}

/// How often appended lines are forced to disk.
const SYNC_LINES: usize = 64;
const SYNC_EVERY: Duration = Duration::from_secs(2);

/// Appends whole lines: each is one `write` (a kill leaves at most a cut last line, which
/// [`resume`] drops), synced every [`SYNC_LINES`] lines or [`SYNC_EVERY`].
pub struct Writer {
    sink: Sink,
    unsynced: usize,
    last_sync: Instant,
    pub written: usize,
}

enum Sink {
    File(std::fs::File, PathBuf),
    Stdout(std::io::Stdout),
}

impl Writer {
    /// Appends to `path` (created if missing).
    pub fn append(path: &Path) -> Result<Writer> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening output {}", path.display()))?;
        Ok(Self::new(Sink::File(f, path.to_path_buf())))
    }

    pub fn stdout() -> Writer {
        Self::new(Sink::Stdout(std::io::stdout()))
    }

    fn new(sink: Sink) -> Writer {
        Writer {
            sink,
            unsynced: 0,
            last_sync: Instant::now(),
            written: 0,
        }
    }

    pub fn write(&mut self, line: &Value) -> Result<()> {
        let mut text = serde_json::to_vec(line)?;
        text.push(b'\n');
        match &mut self.sink {
            Sink::File(f, p) => f
                .write_all(&text)
                .with_context(|| format!("writing output {}", p.display()))?,
            Sink::Stdout(s) => {
                // A reader that pipes lines (Spark, Ray) sees each as soon as it is done.
                let mut s = s.lock();
                s.write_all(&text)?;
                s.flush()?;
            }
        }
        self.written += 1;
        self.unsynced += 1;
        if self.unsynced >= SYNC_LINES || self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> Result<()> {
        if let Sink::File(f, p) = &self.sink {
            f.sync_data()
                .with_context(|| format!("syncing output {}", p.display()))?;
        }
        self.unsynced = 0;
        self.last_sync = Instant::now();
        Ok(())
    }
}

fn ids() -> (String, String) {
    let u = uuid::Uuid::new_v4().simple().to_string();
    (format!("batch_req_{u}"), format!("req_{u}"))
}

/// A request that was answered (200 with the completion, or a 4xx with OpenAI's error body).
pub fn response_line(custom_id: &str, status: u16, body: Value) -> Value {
    let (id, request_id) = ids();
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    })
}

/// A line that is no request at all (not JSON, no custom_id, a wrong url): no response, an
/// error naming the input line.
pub fn invalid_line(custom_id: Option<&str>, line: usize, message: &str) -> Value {
    let (id, _) = ids();
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": null,
        "error": {"code": "invalid_request_line", "message": message, "line": line},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_or_broken_line_is_dropped_and_the_file_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut w = Writer::append(&path).unwrap();
        w.write(&response_line("a", 200, json!({"x": 1}))).unwrap();
        w.write(&invalid_line(None, 4, "not JSON")).unwrap();
        w.write(&response_line("b", 422, json!({"error": {}})))
            .unwrap();
        w.sync().unwrap();
        drop(w);
        let clean = std::fs::read(&path).unwrap();
        // A hand-edited line and a line a kill cut off.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"no\": \"key\"}\n{\"id\": \"batch_req_x\", \"custom_")
            .unwrap();
        drop(f);
        let done = resume(&path).unwrap();
        assert_eq!((done.kept, done.dropped), (3, 2));
        let want: HashSet<String> = [
            "a".to_string(),
            "b".into(),
            crate::batch::input::line_key(4),
        ]
        .into_iter()
        .collect();
        assert_eq!(done.keys, want);
        assert_eq!(std::fs::read(&path).unwrap(), clean);
        // Nothing to repair: the file is left alone.
        let again = resume(&path).unwrap();
        assert_eq!((again.kept, again.dropped), (3, 0));
        assert!(resume(&dir.path().join("missing.jsonl"))
            .unwrap()
            .keys
            .is_empty());
        // No temporaries are left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
