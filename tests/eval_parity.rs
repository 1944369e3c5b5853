//! Parity of `clipcap::eval` with pycocoevalcap 1.2 (the reference implementation, run from
//! the project venv by scripts/ref_coco_metrics.py on a generated caption set).
//!
//! Checks: the PTB tokenization of every reference and candidate (and of a separate stress
//! corpus) equals pycocoevalcap's, and our emulation of the CoreNLP jar's raw output equals
//! the jar's; BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR when `java` runs) agree within 1e-3
//! overall and per image.

mod common;

use clipcap::eval::{self, ptb};
use serde_json::Value;
use std::process::Command;

const TOL: f64 = 1e-3;

fn java_works() -> bool {
    Command::new("java")
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Reports the largest |ours - theirs| and asserts it is within `TOL`.
fn check(name: &str, pairs: &[(String, f64, f64)], failures: &mut Vec<String>) {
    let worst = pairs
        .iter()
        .map(|(k, a, b)| (k, a, b, (a - b).abs()))
        .max_by(|x, y| x.3.total_cmp(&y.3));
    if let Some((k, a, b, d)) = worst {
        println!(
            "{name:<18} n={:<4} max|diff|={d:.3e}  (at {k}: ours {a:.9}, pycocoevalcap {b:.9})",
            pairs.len()
        );
        if d > TOL || d.is_nan() {
            failures.push(format!("{name}: |diff| {d:e} at {k}"));
        }
    }
}

fn joined(caps: &[&str]) -> String {
    caps.iter()
        .map(|c| c.replace('\n', " "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn eval_matches_pycocoevalcap() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let meteor = java_works();
    let mut args = vec![
        "scripts/ref_coco_metrics.py",
        "--out",
        out,
        "--seed",
        "1234",
    ];
    if meteor {
        args.push("--meteor");
    }
    common::run_python(&args);

    let refs = eval::load_coco_refs(dir.path().join("refs.json")).unwrap();
    let cands = eval::load_coco_results(dir.path().join("cands.json")).unwrap();
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ref_scores.json")).unwrap())
            .unwrap();
    assert!(cands.len() >= 200, "the generated set is too small");
    assert!(cands.values().any(|c| c.is_empty()), "no empty candidate");
    assert_eq!(
        reference["n_images"].as_u64().unwrap() as usize,
        cands.len()
    );

    let mut failures = Vec::new();

    // --- tokenization ---------------------------------------------------------------
    let (gts, res) = eval::tokenize_for_eval(&refs, &cands).unwrap();
    let mut mismatches = Vec::new();
    let mut n_strings = 0;
    for (id, toks) in &gts {
        let theirs: Vec<&str> = reference["tokenized"]["gts"][id]
            .as_array()
            .unwrap_or_else(|| panic!("no reference tokenization for {id}"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(theirs.len(), toks.len(), "reference count of {id}");
        for ((ours, theirs), raw) in toks.iter().zip(&theirs).zip(&refs[id]) {
            n_strings += 1;
            if ours != theirs {
                mismatches.push(format!("{raw:?}: ours {ours:?} jar {theirs:?}"));
            }
        }
    }
    for (id, ours) in &res {
        n_strings += 1;
        let theirs = reference["tokenized"]["res"][id].as_str().unwrap();
        if ours != theirs {
            mismatches.push(format!("{:?}: ours {ours:?} jar {theirs:?}", cands[id]));
        }
    }
    let stress = &reference["stress"];
    let stress_caps: Vec<&str> = stress["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let stress_ours = ptb::tokenize_captions(&stress_caps);
    for ((cap, ours), theirs) in stress_caps
        .iter()
        .zip(&stress_ours)
        .zip(stress["tokenized"].as_array().unwrap())
    {
        n_strings += 1;
        if ours.as_deref() != theirs.as_str() {
            mismatches.push(format!("{cap:?}: ours {ours:?} jar {theirs:?}"));
        }
    }
    println!(
        "PTB tokenization: {} mismatches over {n_strings} strings",
        mismatches.len()
    );
    for m in mismatches.iter().take(20) {
        println!("  {m}");
    }
    if !mismatches.is_empty() {
        failures.push(format!("{} tokenization mismatches", mismatches.len()));
    }

    // raw jar output (before pycocoevalcap's punctuation filter)
    let gts_caps: Vec<&str> = refs
        .iter()
        .filter(|(id, _)| cands.contains_key(*id))
        .flat_map(|(_, r)| r.iter().map(String::as_str))
        .collect();
    let res_caps: Vec<&str> = cands.values().map(String::as_str).collect();
    for (name, text, jar) in [
        ("gts", joined(&gts_caps), &reference["jar_stdout"]["gts"]),
        ("res", joined(&res_caps), &reference["jar_stdout"]["res"]),
        ("stress", joined(&stress_caps), &stress["jar_stdout"]),
    ] {
        let ours = ptb::jar_output(&text);
        let jar = jar.as_str().unwrap();
        let diff: Vec<(usize, (&str, &str))> = ours
            .split('\n')
            .zip(jar.split('\n'))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .collect();
        println!(
            "jar stdout ({name}): {} lines, {} differ",
            jar.split('\n').count(),
            diff.len()
        );
        for (i, (a, b)) in diff.iter().take(5) {
            println!("  line {i}: ours {a:?} jar {b:?}");
        }
        if ours != jar {
            failures.push(format!("jar stdout ({name}) differs"));
        }
    }

    // --- metrics --------------------------------------------------------------------
    let s = eval::score(&refs, &cands, meteor).unwrap();
    let overall = &reference["overall"];
    let per = &reference["per_image"];
    let ov = |k: &str| overall[k].as_f64().unwrap();
    for (k, ours) in [
        ("Bleu_1", s.bleu[0]),
        ("Bleu_2", s.bleu[1]),
        ("Bleu_3", s.bleu[2]),
        ("Bleu_4", s.bleu[3]),
        ("ROUGE_L", s.rouge_l),
        ("CIDEr", s.cider),
    ] {
        check(k, &[("overall".into(), ours, ov(k))], &mut failures);
    }
    let per_pairs = |m: &str, ours: &dyn Fn(&str) -> f64| -> Vec<(String, f64, f64)> {
        cands
            .keys()
            .map(|id| (id.clone(), ours(id), per[id][m].as_f64().unwrap()))
            .collect()
    };
    check(
        "CIDEr per image",
        &per_pairs("CIDEr", &|id| s.per_image_cider[id]),
        &mut failures,
    );
    check(
        "ROUGE_L per image",
        &per_pairs("ROUGE_L", &|id| s.per_image_rouge_l[id]),
        &mut failures,
    );
    for n in 0..4 {
        check(
            &format!("Bleu_{} per image", n + 1),
            &per_pairs(&format!("Bleu_{}", n + 1), &|id| s.per_image_bleu[id][n]),
            &mut failures,
        );
    }
    if meteor {
        match s.meteor {
            Some(m) => {
                check(
                    "METEOR",
                    &[("overall".into(), m, ov("METEOR"))],
                    &mut failures,
                );
                check(
                    "METEOR per image",
                    &per_pairs("METEOR", &|id| s.per_image_meteor[id]),
                    &mut failures,
                );
            }
            None => failures.push(format!("METEOR did not run: {:?}", s.meteor_note)),
        }
    } else {
        println!("java not available: METEOR not compared");
        assert!(s.meteor.is_none() && s.meteor_note.is_some());
    }
    println!("{}", s.table());
    assert!(failures.is_empty(), "parity failures: {failures:#?}");
}
