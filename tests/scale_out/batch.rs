//! `clipcap batch` end to end: the real binary on real files with a tiny real bundle. Its
//! captions equal `POST /caption`'s for each input form; shards are disjoint and cover the
//! input; a run killed with SIGKILL resumes with every id exactly once; bad lines become
//! error lines, and the exit code tells fatal failures from retryable ones.
use crate::common;

use base64::Engine as _;
use common::Server;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_clipcap");
/// Short captions keep every run fast; the server is asked for the same.
const MAX_TOKENS: &str = "12";

static BUNDLE: OnceLock<tempfile::TempDir> = OnceLock::new();

/// The bundle, in a folder named `m` (the batch serves it under that name).
fn bundle() -> PathBuf {
    BUNDLE
        .get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            common::make_bundle(&d.path().join("m"), &["--size", "tiny", "--seed", "5"]);
            d
        })
        .path()
        .join("m")
}

/// Nine images of different sizes: six at the top, three in `sub/`.
fn images(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let mut out = vec![];
    for i in 0..9u8 {
        let rel = if i < 6 {
            format!("img{i}.png")
        } else {
            format!("sub/img{i}.png")
        };
        let p = dir.join(&rel);
        std::fs::write(
            &p,
            common::png(24 + 7 * i as u32, 40 - 2 * i as u32, i * 29),
        )
        .unwrap();
        out.push((rel, p));
    }
    out
}

fn batch(args: &[&str], env: &[(&str, &str)]) -> Output {
    let model = bundle();
    let mut with_model = vec!["--model", model.to_str().unwrap()];
    with_model.extend_from_slice(args);
    batch_with(&with_model, env)
}

/// `clipcap batch` of `input` into `output` with the short captions every test asks for.
fn batch_io(input: &str, output: &str) -> Output {
    batch(
        &[
            "--input",
            input,
            "--output",
            output,
            "--max-tokens",
            MAX_TOKENS,
        ],
        &[],
    )
}

/// `clipcap batch` with the arguments as given (the model among them).
fn batch_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.arg("batch")
        .args(["--device", "cpu", "--quiet"])
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "clipcap batch failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// custom_id → the caption of a 200 line (panics on other lines).
fn captions(lines: &[Value]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for l in lines {
        assert_eq!(l["response"]["status_code"], 200, "{l}");
        assert!(l["error"].is_null(), "{l}");
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"), "{l}");
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        let id = l["custom_id"].as_str().unwrap().to_string();
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(out.insert(id, text.to_string()).is_none(), "duplicate {l}");
    }
    out
}

fn data_uri(path: &Path) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
    )
}

fn chat_line(id: &str, url: &str, extra: Value) -> String {
    let mut body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 12,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        .to_string()
}

#[test]
fn folder_jsonl_and_openai_batch_inputs_caption_as_post_caption_does() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = images(&tmp.path().join("imgs"));
    // The server's captions, one request per image.
    let model = bundle();
    let s = Server::start(&["--model", &format!("m={}", model.display())], &[]);
    let client = reqwest::blocking::Client::new();
    let mut want = BTreeMap::new();
    for (rel, p) in &imgs {
        let v: Value = client
            .post(format!("{}/caption?max_tokens={MAX_TOKENS}", s.url))
            .header("content-type", "image/png")
            .body(std::fs::read(p).unwrap())
            .send()
            .unwrap()
            .json()
            .unwrap();
        want.insert(
            rel.clone(),
            v["results"][0]["caption"].as_str().unwrap().to_string(),
        );
    }
    drop(s);
    let distinct: BTreeSet<&String> = want.values().collect();
    assert!(
        distinct.len() > 1,
        "the images should not all get one caption: {want:?}"
    );

    // A folder: ids are paths relative to it.
    let out = tmp.path().join("folder.jsonl");
    let r = batch_io(
        tmp.path().join("imgs").to_str().unwrap(),
        out.to_str().unwrap(),
    );
    ok(&r);
    assert_eq!(captions(&lines(&out)), want);
    let summary: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(summary["captioned"], 9);
    assert!(summary["cpu"].is_string() && summary["threads"].as_u64().unwrap() >= 1);

    // Plain JSON lines, paths relative to the file, an id given or taken from the path.
    let jsonl = tmp.path().join("plain.jsonl");
    let mut text = String::new();
    for (i, (rel, _)) in imgs.iter().enumerate() {
        let line = if i % 2 == 0 {
            json!({"image": format!("imgs/{rel}")})
        } else {
            json!({"custom_id": rel, "image": format!("imgs/{rel}")})
        };
        text.push_str(&format!("{line}\n\n"));
    }
    std::fs::write(&jsonl, text).unwrap();
    let out = tmp.path().join("plain-out.jsonl");
    ok(&batch_io(jsonl.to_str().unwrap(), out.to_str().unwrap()));
    let got: BTreeMap<String, String> = captions(&lines(&out))
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("imgs/").to_string(), v))
        .collect();
    assert_eq!(got, want);

    // OpenAI's batch format: data URIs, relative and absolute local paths, file:// URLs.
    let openai = tmp.path().join("openai.jsonl");
    let mut text = String::new();
    for (i, (rel, p)) in imgs.iter().enumerate() {
        let url = match i % 4 {
            0 => data_uri(p),
            1 => format!("imgs/{rel}"),
            2 => p.display().to_string(),
            _ => format!("file://{}", p.display()),
        };
        text.push_str(&chat_line(rel, &url, json!({})));
        text.push('\n');
    }
    std::fs::write(&openai, text).unwrap();
    let out = tmp.path().join("openai-out.jsonl");
    ok(&batch(
        &[
            "--input",
            openai.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    ));
    let got = lines(&out);
    assert_eq!(captions(&got), want);
    for l in &got {
        let body = &l["response"]["body"];
        assert_eq!(body["model"], "m");
        assert!(
            body["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
            "{l}"
        );
    }

    // The same lines on stdin, answers on stdout (how Spark's pipe and Ray call it).
    let mut child = Command::new(BIN)
        .args([
            "batch",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--quiet",
            "--input",
            "-",
            "--output",
            "-",
        ])
        .current_dir(tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&std::fs::read(&openai).unwrap()).unwrap();
    }
    let piped = child.wait_with_output().unwrap();
    ok(&piped);
    let got: Vec<Value> = String::from_utf8(piped.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(captions(&got), want);
}

#[test]
fn three_shards_are_disjoint_and_their_union_is_the_whole_run() {
    let tmp = tempfile::tempdir().unwrap();
    images(&tmp.path().join("imgs"));
    let input = tmp.path().join("imgs");
    let whole = tmp.path().join("whole.jsonl");
    let common_args = [
        "--input",
        input.to_str().unwrap(),
        "--max-tokens",
        MAX_TOKENS,
    ];
    let mut args = common_args.to_vec();
    args.extend(["--output", whole.to_str().unwrap()]);
    ok(&batch(&args, &[]));
    let whole = captions(&lines(&whole));
    let pattern = tmp.path().join("shard-{shard}.jsonl");
    let mut union = BTreeMap::new();
    for i in 0..3 {
        let mut args = common_args.to_vec();
        args.extend(["--output", pattern.to_str().unwrap()]);
        // Shard 1 takes its index as a Kubernetes Indexed Job gives it; the others by flag.
        let index = i.to_string();
        let out = if i == 1 {
            batch(
                &args,
                &[("JOB_COMPLETION_INDEX", "1"), ("CLIPCAP_NUM_SHARDS", "3")],
            )
        } else {
            args.extend(["--shard-index", &index, "--num-shards", "3"]);
            batch(&args, &[])
        };
        ok(&out);
        let part = captions(&lines(&tmp.path().join(format!("shard-{i}.jsonl"))));
        assert!(!part.is_empty(), "shard {i} is empty (9 ids over 3 shards)");
        for (k, v) in part {
            assert!(union.insert(k.clone(), v).is_none(), "{k} is in two shards");
        }
    }
    assert_eq!(union, whole);
}

#[test]
fn a_run_killed_mid_way_resumes_and_writes_every_id_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = images(&tmp.path().join("imgs"));
    let input = tmp.path().join("imgs");
    let out = tmp.path().join("out.jsonl");
    let model = bundle();
    let base = [
        "batch",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-tokens",
        MAX_TOKENS,
    ];
    // The first run stops at a gate after 3 lines, with more in flight, and is killed there.
    let mut child = Command::new(BIN)
        .args(base)
        .args(["--max-in-flight", "3", "--hold-after", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    {
        use std::io::BufRead;
        let mut held = false;
        for line in std::io::BufReader::new(stderr).lines() {
            if line.unwrap().contains("holding after 3 lines") {
                held = true;
                break;
            }
        }
        assert!(held, "the run ended without reaching its gate");
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first = lines(&out);
    assert_eq!(first.len(), 3);
    // A line cut off mid-write (as a kill during a write, or a crash, may leave).
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        f.write_all(b"{\"id\": \"batch_req_cut\", \"custom_id\": \"img0")
            .unwrap();
    }
    let r = Command::new(BIN).args(base).output().unwrap();
    ok(&r);
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("dropped 1 cut or broken line"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let all = lines(&out);
    let got = captions(&all);
    let ids: BTreeSet<String> = imgs.iter().map(|(rel, _)| rel.clone()).collect();
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert_eq!(all.len(), 9);
    // The first run's lines are kept as they were.
    assert_eq!(&all[..3], &first[..]);
    let summary: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(
        (
            summary["already_done"].as_u64(),
            summary["captioned"].as_u64()
        ),
        (Some(3), Some(6))
    );
    // A third run has nothing to do.
    let r = Command::new(BIN).args(base).output().unwrap();
    ok(&r);
    assert_eq!(lines(&out).len(), 9);
}

#[test]
fn bad_lines_become_error_lines_and_exit_codes_tell_fatal_from_retryable() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = images(&tmp.path().join("imgs"));
    std::fs::write(
        tmp.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let good = imgs[0].1.display().to_string();
    let input = tmp.path().join("in.jsonl");
    // (custom_id the line gets, the line, the status or the error code expected)
    let cases: Vec<(Option<&str>, String, Value)> = vec![
        (
            Some("good"),
            json!({"custom_id": "good", "image": good}).to_string(),
            json!(200),
        ),
        (
            Some("missing"),
            json!({"custom_id": "missing", "image": "nope.png"}).to_string(),
            json!(400),
        ),
        (
            Some("broken"),
            json!({"custom_id": "broken", "image": "broken.png"}).to_string(),
            json!(422),
        ),
        (None, "{not json".into(), json!("invalid_request_line")),
        (
            None,
            json!({"method": "POST", "url": "/v1/chat/completions", "body": {}}).to_string(),
            json!("invalid_request_line"),
        ),
        (
            Some("url"),
            json!({"custom_id": "url", "method": "POST", "url": "/v1/completions", "body": {}})
                .to_string(),
            json!("invalid_request_line"),
        ),
        (
            Some("stream"),
            chat_line("stream", &good, json!({"stream": true})),
            json!(400),
        ),
        (
            Some("model"),
            chat_line("model", &good, json!({"model": "other"})),
            json!(404),
        ),
        (
            Some("option"),
            chat_line("option", &good, json!({"beam_size": 99})),
            json!(422),
        ),
        (
            Some("remote"),
            chat_line("remote", "http://example.com/a.png", json!({})),
            json!(400),
        ),
        (
            Some("chat-ok"),
            chat_line("chat-ok", &good, json!({"strategy": "greedy"})),
            json!(200),
        ),
        (
            Some("good"),
            json!({"custom_id": "good", "image": good}).to_string(),
            json!("invalid_request_line"),
        ),
    ];
    let text: String = cases.iter().map(|(_, l, _)| format!("{l}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let out = tmp.path().join("out.jsonl");
    let r = batch_io(input.to_str().unwrap(), out.to_str().unwrap());
    ok(&r);
    let got = lines(&out);
    assert_eq!(got.len(), cases.len(), "one line per input line");
    // Lines come in completion order: match each case to a line by its id (or input line).
    let mut left = got.clone();
    for (i, (id, line, want)) in cases.iter().enumerate() {
        let pos = left
            .iter()
            .position(|l| match id {
                Some(id) if want == &json!("invalid_request_line") && *id == "good" => {
                    l["custom_id"] == *id && l["error"]["code"] == "invalid_request_line"
                }
                Some(id) => l["custom_id"] == *id && (l["error"].is_null() || want.is_string()),
                None => l["error"]["line"] == i + 1,
            })
            .unwrap_or_else(|| panic!("no output line for input line {}: {line}\n{got:#?}", i + 1));
        let l = left.remove(pos);
        match want {
            Value::Number(status) => {
                assert_eq!(
                    l["response"]["status_code"],
                    Value::Number(status.clone()),
                    "line {}: {l}",
                    i + 1
                );
                if status.as_u64() != Some(200) {
                    let e = &l["response"]["body"]["error"];
                    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{l}");
                    assert!(e["type"].is_string() && e["code"].is_string(), "{l}");
                }
            }
            code => {
                assert!(l["response"].is_null(), "{l}");
                assert_eq!(l["error"]["code"], *code, "line {}: {l}", i + 1);
            }
        }
    }
    let summary: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(
        (
            summary["captioned"].as_u64(),
            summary["error_lines"].as_u64()
        ),
        (Some(2), Some(10))
    );

    // Fatal: a bad model, a missing input, a bad shard. Exit 2, nothing written.
    let out2 = tmp.path().join("out2.jsonl");
    let model = bundle();
    let model = model.to_str().unwrap();
    for (args, why) in [
        (
            vec![
                "--model",
                tmp.path().to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
            ],
            "cannot load bundle",
        ),
        (
            vec!["--model", model, "--input", "/nonexistent/in.jsonl"],
            "reading input",
        ),
        (
            vec![
                "--model",
                model,
                "--input",
                input.to_str().unwrap(),
                "--shard-index",
                "3",
                "--num-shards",
                "3",
            ],
            "shard index 3",
        ),
    ] {
        let mut a = args.clone();
        a.extend(["--output", out2.to_str().unwrap()]);
        let r = batch_with(&a, &[]);
        assert_eq!(
            r.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(
            String::from_utf8_lossy(&r.stderr).contains(why),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(!out2.exists() || lines(&out2).is_empty());
    }

    // Retryable: the output cannot be written (a full disk, as RLIMIT_FSIZE makes it). Exit 75;
    // the rerun on a writable disk finishes the job with every id once.
    let folder_out = tmp.path().join("folder.jsonl");
    let r = Command::new("bash")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 2; exec \"$0\" \"$@\"",
            BIN,
            "batch",
            "--model",
            bundle().to_str().unwrap(),
            "--device",
            "cpu",
            "--quiet",
            "--input",
            tmp.path().join("imgs").to_str().unwrap(),
            "--output",
            folder_out.to_str().unwrap(),
            "--max-tokens",
            MAX_TOKENS,
        ])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("retryable"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let partial = std::fs::read_to_string(&folder_out)
        .unwrap()
        .lines()
        .count();
    assert!(
        partial < 9,
        "the limit should stop the run early ({partial} lines)"
    );
    ok(&batch_io(
        tmp.path().join("imgs").to_str().unwrap(),
        folder_out.to_str().unwrap(),
    ));
    assert_eq!(captions(&lines(&folder_out)).len(), 9);
}
