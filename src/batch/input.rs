//! What `clipcap batch` reads: a folder of images, a JSON-lines file (`{"custom_id"?,
//! "image"}` or OpenAI's batch requests), or JSON lines on stdin; and which shard a line is in.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// File names taken from a folder as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// The image files under `dir`, recursively, sorted. Folders are followed only when they are
/// real ones, so a symlink loop cannot recurse.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)
            .with_context(|| format!("reading folder {}", dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| (e.path(), e.file_type().is_ok_and(|t| t.is_dir())))
            .collect();
        entries.sort();
        for (p, is_dir) in entries {
            if is_dir {
                walk(&p, out)?;
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = vec![];
    walk(dir, &mut out)?;
    Ok(out)
}

/// What one input line asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// An image file, captioned with the command's options.
    Image(PathBuf),
    /// An OpenAI chat-completions body (its options over the command's).
    Chat(Value),
}

/// One input line (or one image of a folder).
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// 1-based line number (position, for a folder).
    pub line: usize,
    pub custom_id: Option<String>,
    /// The request, or why the line is not one.
    pub request: Result<Request, String>,
}

impl Item {
    /// The key the output remembers this line by (see `output::line_key`).
    pub fn key(&self) -> String {
        match &self.custom_id {
            Some(id) => id.clone(),
            None => line_key(self.line),
        }
    }

    /// The shard this line belongs to: by a stable hash of its `custom_id` (so that a line
    /// stays in its shard when lines are added or reordered), by line number without one.
    pub fn shard(&self, num_shards: usize) -> usize {
        if num_shards <= 1 {
            return 0;
        }
        let n = num_shards as u64;
        match &self.custom_id {
            Some(id) => {
                use sha2::Digest;
                let h = sha2::Sha256::digest(id.as_bytes());
                (u64::from_be_bytes(h[..8].try_into().unwrap()) % n) as usize
            }
            None => ((self.line as u64) % n) as usize,
        }
    }
}

/// The key of a line that has no `custom_id` (it cannot clash with one: ids are text a user
/// wrote, and this starts with a control character).
pub fn line_key(line: usize) -> String {
    format!("\u{1}line:{line}")
}

/// Where lines come from.
#[derive(Clone, Debug)]
pub enum Source {
    Folder(PathBuf),
    Lines(PathBuf),
    Stdin,
}

impl Source {
    /// The source `path` names (`-` is stdin). A missing path is an error.
    pub fn open(path: &Path) -> Result<Source> {
        if path.as_os_str() == "-" {
            return Ok(Source::Stdin);
        }
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading input {}", path.display()))?;
        Ok(if meta.is_dir() {
            Source::Folder(path.to_path_buf())
        } else {
            Source::Lines(path.to_path_buf())
        })
    }

    /// The folder relative image paths are taken from.
    pub fn base_dir(&self) -> PathBuf {
        let p = match self {
            Source::Folder(d) => d.clone(),
            Source::Lines(f) => f.parent().map(Path::to_path_buf).unwrap_or_default(),
            Source::Stdin => PathBuf::new(),
        };
        if p.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            p
        }
    }

    /// Can be read twice (a first pass counts the work; stdin is read once).
    pub fn rereadable(&self) -> bool {
        !matches!(self, Source::Stdin)
    }

    /// Every item, in order. Reading errors after the start end the iteration with `Err`.
    pub fn items(&self) -> Result<Box<dyn Iterator<Item = Result<Item>> + Send>> {
        let base = self.base_dir();
        match self {
            Source::Folder(dir) => {
                let files = image_files(dir)?;
                let dir = dir.clone();
                Ok(Box::new(files.into_iter().enumerate().map(
                    move |(i, p)| {
                        let rel = p.strip_prefix(&dir).unwrap_or(&p);
                        let id = rel
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy())
                            .collect::<Vec<_>>()
                            .join("/");
                        Ok(Item {
                            line: i + 1,
                            custom_id: Some(id),
                            request: Ok(Request::Image(p)),
                        })
                    },
                )))
            }
            Source::Lines(file) => {
                let f = std::fs::File::open(file)
                    .with_context(|| format!("opening input {}", file.display()))?;
                Ok(Box::new(lines(std::io::BufReader::new(f), base)))
            }
            Source::Stdin => Ok(Box::new(lines(
                std::io::BufReader::new(std::io::stdin()),
                base,
            ))),
        }
    }
}

fn lines(
    reader: impl BufRead + Send + 'static,
    base: PathBuf,
) -> impl Iterator<Item = Result<Item>> + Send {
    reader
        .split(b'\n')
        .enumerate()
        .filter_map(move |(i, line)| match line {
            Err(e) => Some(Err(anyhow::Error::new(e).context("reading the input"))),
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let text = text.trim();
                (!text.is_empty()).then(|| Ok(parse_line(i + 1, text, &base)))
            }
        })
}

/// One JSON line as an item (never an error: a bad line is an item that says why).
pub fn parse_line(line: usize, text: &str, base: &Path) -> Item {
    let bad = |custom_id: Option<String>, why: String| Item {
        line,
        custom_id,
        request: Err(why),
    };
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return bad(None, format!("line {line} is not JSON: {e}")),
    };
    let Value::Object(map) = v else {
        return bad(None, format!("line {line} is not a JSON object"));
    };
    let custom_id = match map.get("custom_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return bad(None, "custom_id must be a string".into()),
    };
    let openai = ["method", "url", "body"]
        .iter()
        .any(|k| map.contains_key(*k));
    if openai {
        let Some(id) = custom_id else {
            return bad(None, "an OpenAI batch request needs a custom_id".into());
        };
        let id = Some(id);
        if let Some(m) = map.get("method") {
            if m.as_str().map(str::to_ascii_uppercase).as_deref() != Some("POST") {
                return bad(id, "method must be \"POST\"".into());
            }
        }
        match map.get("url").and_then(Value::as_str) {
            Some("/v1/chat/completions") => {}
            _ => {
                return bad(
                    id,
                    "url must be \"/v1/chat/completions\" (the one endpoint a batch runs)".into(),
                )
            }
        }
        return match map.get("body") {
            Some(body @ Value::Object(_)) => Item {
                line,
                custom_id: id,
                request: Ok(Request::Chat(body.clone())),
            },
            _ => bad(id, "body must be a chat-completions request object".into()),
        };
    }
    match map.get("image") {
        Some(Value::String(p)) if !p.is_empty() => Item {
            line,
            custom_id: custom_id.or_else(|| Some(p.clone())),
            request: Ok(Request::Image(base.join(p))),
        },
        _ => bad(
            custom_id,
            "a line needs \"image\" (a path) or an OpenAI batch request (custom_id, method, url, body)"
                .into(),
        ),
    }
}

/// Which shard this process runs: `--shard-index`/`--num-shards`, else Kubernetes' Indexed
/// Job index (`JOB_COMPLETION_INDEX`, with `CLIPCAP_NUM_SHARDS` or `--num-shards` for the
/// count, which Kubernetes does not export), else a Slurm array's task (`SLURM_ARRAY_TASK_ID`
/// from `SLURM_ARRAY_TASK_MIN`, counted by `SLURM_ARRAY_TASK_COUNT`).
pub fn shard(
    index: Option<usize>,
    count: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(usize, usize)> {
    let num = |name: &str| -> Result<Option<usize>> {
        match env(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .with_context(|| format!("{name}={v:?} is not a number")),
        }
    };
    let slurm_min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let (index, from) = match index {
        Some(i) => (i, "--shard-index"),
        None => match num("JOB_COMPLETION_INDEX")? {
            Some(i) => (i, "JOB_COMPLETION_INDEX"),
            None => match num("SLURM_ARRAY_TASK_ID")? {
                Some(i) if i >= slurm_min => (i - slurm_min, "SLURM_ARRAY_TASK_ID"),
                Some(i) => {
                    bail!("SLURM_ARRAY_TASK_ID={i} is below SLURM_ARRAY_TASK_MIN={slurm_min}")
                }
                None => (0, ""),
            },
        },
    };
    let count = match count {
        Some(c) => Some(c),
        None => match num("CLIPCAP_NUM_SHARDS")? {
            Some(c) => Some(c),
            None if from == "SLURM_ARRAY_TASK_ID" => match num("SLURM_ARRAY_TASK_COUNT")? {
                Some(c) => Some(c),
                None => num("SLURM_ARRAY_TASK_MAX")?.map(|max| max + 1 - slurm_min),
            },
            None => None,
        },
    };
    let count = match (count, from) {
        (Some(c), _) => c,
        (None, "") => 1,
        (None, from) => bail!(
            "the shard index comes from {from}, but the number of shards is unknown: pass --num-shards (or set CLIPCAP_NUM_SHARDS)"
        ),
    };
    if count == 0 {
        bail!("--num-shards must be at least 1");
    }
    if index >= count {
        bail!("shard index {index} is not below the number of shards ({count})");
    }
    Ok((index, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_of_each_form_become_items_and_bad_ones_say_why() {
        let base = Path::new("/data");
        let item = parse_line(1, r#"{"image": "a/b.png"}"#, base);
        assert_eq!(item.custom_id.as_deref(), Some("a/b.png"));
        assert_eq!(item.request, Ok(Request::Image("/data/a/b.png".into())));
        let item = parse_line(2, r#"{"custom_id": "x", "image": "/abs.jpg"}"#, base);
        assert_eq!(item.key(), "x");
        assert_eq!(item.request, Ok(Request::Image("/abs.jpg".into())));
        let body = json!({"model": "m", "messages": []});
        let line = json!({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body});
        let item = parse_line(3, &line.to_string(), base);
        assert_eq!(item.request, Ok(Request::Chat(body)));
        for (text, id, why) in [
            ("not json", None, "not JSON"),
            ("[1]", None, "not a JSON object"),
            (
                r#"{"custom_id": 5, "image": "a"}"#,
                None,
                "custom_id must be a string",
            ),
            (
                r#"{"method": "POST", "url": "/v1/chat/completions", "body": {}}"#,
                None,
                "needs a custom_id",
            ),
            (
                r#"{"custom_id": "q", "method": "GET", "url": "/v1/chat/completions", "body": {}}"#,
                Some("q"),
                "method",
            ),
            (
                r#"{"custom_id": "q", "method": "POST", "url": "/v1/embeddings", "body": {}}"#,
                Some("q"),
                "url must be",
            ),
            (
                r#"{"custom_id": "q", "url": "/v1/chat/completions", "body": 3}"#,
                Some("q"),
                "body must be",
            ),
            (r#"{"custom_id": "q"}"#, Some("q"), "needs \"image\""),
        ] {
            let item = parse_line(7, text, base);
            assert_eq!(item.custom_id.as_deref(), id, "{text}");
            let err = item.request.unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        // Without a custom_id a bad line is remembered by its line number.
        assert_eq!(parse_line(7, "nope", base).key(), line_key(7));
    }

    #[test]
    fn shards_are_disjoint_cover_everything_and_stay_put() {
        let items: Vec<Item> = (0..300)
            .map(|i| Item {
                line: i + 1,
                custom_id: (i % 7 != 0).then(|| format!("img-{i}")),
                request: Err(String::new()),
            })
            .collect();
        let mut counts = [0usize; 3];
        for it in &items {
            let s = it.shard(3);
            counts[s] += 1;
            // The same id is in the same shard wherever its line is.
            let moved = Item {
                line: it.line + 1000,
                ..it.clone()
            };
            if it.custom_id.is_some() {
                assert_eq!(moved.shard(3), s);
            }
            assert_eq!(it.shard(1), 0);
        }
        assert_eq!(counts.iter().sum::<usize>(), 300);
        assert!(counts.iter().all(|&c| c > 70), "{counts:?}");
        // A known value: the hash is part of the output format's contract across versions.
        let fixed = Item {
            line: 1,
            custom_id: Some("image-0001.jpg".into()),
            request: Err(String::new()),
        };
        assert_eq!(fixed.shard(1000), {
            use sha2::Digest;
            let h = sha2::Sha256::digest(b"image-0001.jpg");
            (u64::from_be_bytes(h[..8].try_into().unwrap()) % 1000) as usize
        });
    }

    #[test]
    fn the_shard_comes_from_flags_kubernetes_or_slurm() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(shard(None, None, &env(&[])).unwrap(), (0, 1));
        assert_eq!(shard(Some(2), Some(3), &env(&[])).unwrap(), (2, 3));
        assert_eq!(
            shard(None, Some(4), &env(&[("JOB_COMPLETION_INDEX", "3")])).unwrap(),
            (3, 4)
        );
        assert_eq!(
            shard(
                None,
                None,
                &env(&[("JOB_COMPLETION_INDEX", "1"), ("CLIPCAP_NUM_SHARDS", "2")])
            )
            .unwrap(),
            (1, 2)
        );
        let e = shard(None, None, &env(&[("JOB_COMPLETION_INDEX", "1")])).unwrap_err();
        assert!(e.to_string().contains("--num-shards"), "{e}");
        // `--array=1-8`: tasks 1..8 are shards 0..7.
        assert_eq!(
            shard(
                None,
                None,
                &env(&[
                    ("SLURM_ARRAY_TASK_ID", "8"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "8")
                ])
            )
            .unwrap(),
            (7, 8)
        );
        assert_eq!(
            shard(
                None,
                None,
                &env(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_MAX", "3")])
            )
            .unwrap(),
            (2, 4)
        );
        assert!(shard(Some(3), Some(3), &env(&[])).is_err());
        assert!(shard(None, Some(0), &env(&[])).is_err());
        assert!(shard(None, None, &env(&[("JOB_COMPLETION_INDEX", "x")])).is_err());
    }
}
