//! scripts/ray_caption.py on a real local Ray runtime (`ray.init(num_cpus=2)`, two actors,
//! each piping blocks through its own `clipcap batch --input - --output -`): its output lines
//! equal a single `clipcap batch` run's, id for id, and a rerun has nothing left to do.
use crate::common;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn captions(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["response"]["status_code"], 200, "{v}");
        let text = v["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let id = v["custom_id"].as_str().unwrap().to_string();
        assert!(out.insert(id, text).is_none(), "duplicate id: {v}");
    }
    out
}

#[test]
fn ray_data_captions_equal_a_single_batch_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    common::make_bundle(&model, &["--size", "tiny", "--seed", "8"]);
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(imgs.join("deeper")).unwrap();
    for i in 0..10u8 {
        let name = if i % 3 == 0 {
            format!("deeper/{i}.png")
        } else {
            format!("{i}.png")
        };
        std::fs::write(imgs.join(name), common::png(20 + 5 * i as u32, 30, i * 17)).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_clipcap");
    let single = tmp.path().join("single.jsonl");
    let out = std::process::Command::new(bin)
        .args([
            "batch",
            "--device",
            "cpu",
            "--quiet",
            "--max-tokens",
            "10",
            "--model",
        ])
        .arg(&model)
        .arg("--input")
        .arg(&imgs)
        .arg("--output")
        .arg(&single)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ray_out = tmp.path().join("ray.jsonl");
    let run = || {
        let r = std::process::Command::new(common::python())
            .arg(common::repo().join("scripts/ray_caption.py"))
            .arg("--model")
            .arg(&model)
            .arg("--input")
            .arg(&imgs)
            .arg("--output")
            .arg(&ray_out)
            .args(["--workers", "2", "--block-lines", "3", "--clipcap", bin])
            .args(["--", "--device", "cpu", "--max-tokens", "10"])
            // Ray's session files under the test's folder, not the shared /tmp/ray.
            .env("RAY_TMPDIR", tmp.path())
            .output()
            .expect("the project python (scripts/venv.sh installs ray[data])");
        let log = String::from_utf8_lossy(&r.stderr).into_owned();
        assert!(r.status.success(), "ray_caption.py failed:\n{log}");
        log
    };
    let log = run();
    assert!(log.contains("wrote 10 lines"), "{log}");
    let single = captions(&single);
    assert_eq!(single.len(), 10);
    assert!(single.contains_key("deeper/0.png"));
    assert_eq!(captions(&ray_out), single);
    // Resumed: every id is there, so nothing is sent again.
    let log = run();
    assert!(log.contains("10 lines, 10 already in"), "{log}");
    assert_eq!(captions(&ray_out).len(), 10);
}
