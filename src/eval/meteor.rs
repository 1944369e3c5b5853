//! METEOR 1.5 through the official jar, driven as pycocoevalcap's `Meteor` does:
//! `java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm` run in the jar's directory, one
//! `SCORE ||| ref 1 ||| ... ||| ref n ||| hypothesis` line per image (whose reply is the
//! image's statistics), then one `EVAL ||| stats 1 ||| ... ||| stats N` line whose reply is the
//! per-image scores followed by the corpus score.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const JAR: &str = "meteor-1.5.jar";

/// pycocoevalcap's default venv location for this project (see `scripts/venv.sh`).
fn venv_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("CLIPCAP_PYTHON") {
        if let Some(v) = Path::new(&p).parent().and_then(Path::parent) {
            out.push(v.to_path_buf());
        }
    }
    if let Ok(v) = std::env::var("CLIPCAP_VENV") {
        out.push(PathBuf::from(v));
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Ok(c) = cache {
        out.push(c.join("clipcap/venv-torch-2.11.0"));
    }
    out
}

/// A file of the installed pycocoevalcap package (`rel` below `pycocoevalcap/`), searched in
/// the project venv's site-packages.
pub(crate) fn find_pycocoevalcap_file(rel: &str) -> Option<PathBuf> {
    for venv in venv_dirs() {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(venv.join(lib)) else {
                continue;
            };
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs {
                let p = d.join("site-packages/pycocoevalcap").join(rel);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// The METEOR jar: `CLIPCAP_METEOR_JAR`, else the one shipped in the venv's pycocoevalcap.
pub fn find_jar() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CLIPCAP_METEOR_JAR") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("CLIPCAP_METEOR_JAR={} is not a file", p.display());
    }
    find_pycocoevalcap_file(&format!("meteor/{JAR}")).ok_or_else(|| {
        anyhow!(
            "{JAR} not found (set CLIPCAP_METEOR_JAR or install pycocoevalcap in the venv, \
             scripts/venv.sh)"
        )
    })
}

fn java() -> PathBuf {
    match std::env::var("JAVA_HOME") {
        Ok(h) if Path::new(&h).join("bin/java").is_file() => Path::new(&h).join("bin/java"),
        _ => PathBuf::from("java"),
    }
}

/// Corpus METEOR and per-item scores for tokenized `(hypothesis, references)` pairs.
pub fn meteor(items: &[(&str, Vec<&str>)]) -> Result<(f64, Vec<f64>)> {
    let jar = find_jar()?;
    let dir = jar
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.join("data/paraphrase-en.gz").is_file() {
        bail!(
            "{} lacks data/paraphrase-en.gz beside it (METEOR needs its paraphrase table)",
            jar.display()
        );
    }
    let mut child = Command::new(java())
        .args(["-jar", "-Xmx2G"])
        .arg(&jar)
        .args(["-", "-", "-stdio", "-l", "en", "-norm"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start java (is a JRE installed and on PATH?)")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    // drain stderr so that the child never blocks on it; keep its tail for error messages
    let err_thread = std::thread::spawn(move || {
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        tail.join("\n")
    });
    let mut out = BufReader::new(stdout);
    let result = (|| -> Result<(f64, Vec<f64>)> {
        let mut read_line = |what: &str| -> Result<String> {
            let mut l = String::new();
            if out.read_line(&mut l)? == 0 {
                bail!("METEOR closed its output while {what} was expected");
            }
            Ok(l.trim().to_string())
        };
        let mut eval_line = String::from("EVAL");
        for (hyp, refs) in items {
            let hyp = hyp.replace("|||", "").replace("  ", " ");
            let line = format!("SCORE ||| {} ||| {}\n", refs.join(" ||| "), hyp);
            stdin.write_all(line.as_bytes())?;
            stdin.flush()?;
            let stat = read_line("a SCORE reply")?;
            eval_line.push_str(" ||| ");
            eval_line.push_str(&stat);
        }
        eval_line.push('\n');
        stdin.write_all(eval_line.as_bytes())?;
        stdin.flush()?;
        let mut per = Vec::with_capacity(items.len());
        for _ in 0..items.len() {
            let l = read_line("a per-image score")?;
            per.push(
                l.parse::<f64>()
                    .with_context(|| format!("METEOR replied {l:?}"))?,
            );
        }
        let l = read_line("the corpus score")?;
        let score = l
            .parse::<f64>()
            .with_context(|| format!("METEOR replied {l:?}"))?;
        Ok((score, per))
    })();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    let err_tail = err_thread.join().unwrap_or_default();
    result.map_err(|e| {
        if err_tail.is_empty() {
            e
        } else {
            e.context(format!("METEOR stderr: {err_tail}"))
        }
    })
}
