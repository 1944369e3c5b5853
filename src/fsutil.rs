//! Durable file writes: nothing half-written is ever visible under the final name.
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A unique temporary name beside `path` (same filesystem, so rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// Flushes `tmp` to disk and renames it over `path`, then syncs the directory.
pub fn rename_durable(tmp: &Path, path: &Path) -> Result<()> {
    if let Ok(f) = std::fs::File::open(tmp) {
        let _ = f.sync_all();
    }
    std::fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Replaces `path` with what `write` puts at the temporary path it is given (a file or a
/// folder), then renames it into place durably. On any failure the temporary is removed: a
/// full disk is left no fuller, and nothing half-written stays behind.
pub fn replace_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| rename_durable(&tmp, path));
    if result.is_err() {
        remove_any(&tmp);
    }
    result
}

/// Puts the finished folder `tmp` in place of `out`. An old `out` is moved aside first and put
/// back if the swap fails; its aside name is not a temporary's, so a crash between the two
/// renames leaves it for the operator, never swept away. Readers may find `out` missing for
/// that instant (a repository poller waits for a second look before it unloads).
pub fn replace_dir(tmp: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return rename_durable(tmp, out);
    }
    let old = out.with_file_name(format!(
        ".{}.old-{}",
        out.file_name().unwrap_or_default().to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
    if let Err(e) = rename_durable(tmp, out) {
        let _ = std::fs::rename(&old, out);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// [`replace_with`] for a folder that may already exist: `write` fills the temporary folder,
/// which [`replace_dir`] then puts in place.
pub fn replace_with_dir(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| replace_dir(&tmp, path));
    if result.is_err() {
        remove_any(&tmp);
    }
    result
}

fn remove_any(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// Writes `bytes` to `path` atomically (temp file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with(path, |tmp| {
        let mut f =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(())
    })
}

/// The SHA-256 of a file's contents, in hex (how datasets name the encoder that made them).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// The process id a temporary's name carries (`.NAME.tmp-PID-UUID`).
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(".tmp-")?;
    let (pid, uuid) = tail.split_once('-')?;
    (uuid.len() == 32).then_some(())?;
    pid.parse().ok()
}

/// Removes the temporaries under `dir` (down to `depth` folder levels) whose writing process
/// is gone, e.g. after a `kill -9` or a full disk; returns how many it removed. A running
/// process's temporaries (another `clipcap` writing there) are left alone.
pub fn sweep_temps(dir: &Path, depth: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = temp_owner(&name) {
            let alive =
                pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
            if !alive {
                remove_any(&path);
                removed += 1;
            }
        } else if depth > 0 && entry.file_type().is_ok_and(|t| t.is_dir()) {
            removed += sweep_temps(&path, depth - 1);
        }
    }
    removed
}

/// Writes `bytes` to `path` atomically (temp file + rename) without fsync: readers never see a
/// half-written file, but a crash may lose it. For bulk output that can be regenerated (the
/// synth images), where an fsync per file would cost more than producing it.
pub fn write_atomic_nosync(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = std::fs::write(&tmp, bytes)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if result.is_err() {
        // Leave no temporary behind (the caller may retry into the same directory).
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_replace_leaves_no_temp_and_sweeping_removes_a_dead_writers_temps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let err = replace_with(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("No space left on device")
        })
        .unwrap_err();
        assert!(err.to_string().contains("No space"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A temp file and a temp folder of a process that no longer exists (pid far above
        // pid_max), one of this process, and an ordinary dot-file.
        let sub = dir.path().join("job").join("ckpt");
        std::fs::create_dir_all(&sub).unwrap();
        let dead = format!(".ckpt.safetensors.tmp-4999999-{}", "a".repeat(32));
        std::fs::write(sub.join(&dead), b"x").unwrap();
        std::fs::create_dir(
            dir.path()
                .join(format!(".out.tmp-4999999-{}", "b".repeat(32))),
        )
        .unwrap();
        let mine = temp_path(&sub.join("other"));
        std::fs::write(&mine, b"y").unwrap();
        std::fs::write(sub.join(".keep"), b"z").unwrap();
        assert_eq!(
            sweep_temps(dir.path(), 1),
            1,
            "depth 1 reaches job/, not job/ckpt/"
        );
        assert_eq!(sweep_temps(dir.path(), 3), 1);
        let left: Vec<String> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&".keep".to_string()) && mine.exists());
    }

    #[test]
    fn write_atomic_nosync_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic_nosync(&path, b"first").unwrap();
        write_atomic_nosync(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A missing directory fails without leaving anything behind.
        assert!(write_atomic_nosync(&dir.path().join("no/such/b.bin"), b"x").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
