//! `src/eval/ptb_tables.rs` is generated: scripts/make_ptb_tables.py measures the JFlex classes
//! `[:letter:]`, `[:digit:]` and `[:uppercase:]` of pycocoevalcap's CoreNLP 3.4.1 jar, and its
//! output must equal the committed file byte for byte.
//!
//! Needs a JDK (`java` and `javac`) and the project venv's pycocoevalcap. Without them the
//! script exits with an error naming what is missing and this test fails with that message;
//! it deliberately does not skip (CI installs Java).

mod common;

#[test]
fn ptb_tables_match_the_jar() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ptb_tables.rs");
    // Panics with the script's stderr (e.g. "`java` not found on PATH") if it fails.
    common::run_python(&["scripts/make_ptb_tables.py", "--out", out.to_str().unwrap()]);
    let generated = std::fs::read_to_string(&out).unwrap();
    let committed = std::fs::read_to_string(common::repo().join("src/eval/ptb_tables.rs")).unwrap();
    if generated != committed {
        let first = generated
            .lines()
            .zip(committed.lines())
            .position(|(g, c)| g != c)
            .map(|i| format!("first difference at line {}", i + 1))
            .unwrap_or_else(|| "the files differ in length or trailing text".to_string());
        panic!(
            "src/eval/ptb_tables.rs differs from what scripts/make_ptb_tables.py measures in the \
             jar ({first}); regenerate it with \
             `python scripts/make_ptb_tables.py --out src/eval/ptb_tables.rs` and review the diff"
        );
    }
}
