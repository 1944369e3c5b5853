//! Parity of the committed GPT-2 tokenizer (`models/gpt2/tokenizer.json`, built by
//! `scripts/make_tokenizer.py`) with tiktoken's GPT-2 encoding over the same ranks.
//!
//! `scripts/ref_tokenizer.py` generates a deterministic corpus of >= 2,000 varied strings and
//! encodes each with tiktoken twice:
//! * `ids` = `encode(s, allowed_special="all")`. `Tokenizer::encode` always splits added tokens
//!   out of the input, so a literal `<|endoftext|>` in the text becomes the special token 50256;
//!   this is the documented behaviour of the crate's tokenizer and must match exactly.
//! * `ordinary_ids` = `encode_ordinary(s)`: `<|endoftext|>` is plain text. Reproduced here by
//!   running the pre-tokenizer and the BPE model directly (no added-token extraction).
//!
//! Every string must match exactly, and decoding must give back the original string.
mod common;

use serde_json::Value;
use tokenizers::{Model, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

const TOKENIZER: &str = "models/gpt2/tokenizer.json";
const EOT: &str = "<|endoftext|>";
const EOT_ID: u32 = 50256;

fn load() -> Tokenizer {
    Tokenizer::from_file(common::repo().join(TOKENIZER)).expect("cannot load the GPT-2 tokenizer")
}

/// tiktoken's `encode_ordinary`: pre-tokenize and BPE, with no added-token (special) matching.
fn encode_ordinary(tok: &Tokenizer, text: &str) -> Vec<u32> {
    let mut pre = PreTokenizedString::from(text);
    tok.get_pre_tokenizer()
        .expect("pre-tokenizer")
        .pre_tokenize(&mut pre)
        .unwrap();
    pre.tokenize(|n| tok.get_model().tokenize(n.get())).unwrap();
    pre.into_encoding(None, 0, OffsetType::Byte)
        .unwrap()
        .get_ids()
        .to_vec()
}

fn id_lists(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|ids| {
            ids.as_array()
                .unwrap()
                .iter()
                .map(|i| u32::try_from(i.as_u64().unwrap()).unwrap())
                .collect()
        })
        .collect()
}

fn short(s: &str) -> String {
    let d = format!("{s:?}");
    if d.chars().count() <= 120 {
        return d;
    }
    d.chars().take(120).chain(std::iter::once('…')).collect()
}

#[test]
fn gpt2_tokenizer_matches_tiktoken() {
    let t0 = std::time::Instant::now();
    let reference: Value =
        serde_json::from_str(&common::run_python(&["scripts/ref_tokenizer.py"])).unwrap();
    let strings: Vec<String> = reference["strings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let ids = id_lists(&reference["ids"]);
    let ordinary = id_lists(&reference["ordinary_ids"]);
    assert!(strings.len() >= 2000, "corpus too small: {}", strings.len());
    assert_eq!(strings.len(), ids.len());
    assert_eq!(strings.len(), ordinary.len());
    let t_ref = t0.elapsed();

    let tok = load();
    assert_eq!(tok.get_vocab_size(true), 50257);
    assert_eq!(tok.token_to_id(EOT), Some(EOT_ID));
    assert_eq!(tok.id_to_token(EOT_ID).as_deref(), Some(EOT));

    let n = strings.len();
    let (mut enc_ok, mut ord_ok, mut dec_ok) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    let mut with_eot = 0usize;
    for (i, s) in strings.iter().enumerate() {
        let got = tok.encode(s.as_str(), false).unwrap().get_ids().to_vec();
        if got == ids[i] {
            enc_ok += 1;
        } else {
            failures.push(format!(
                "encode #{i} {}: got {:?}, tiktoken {:?}",
                short(s),
                got,
                ids[i]
            ));
        }
        let got_ord = encode_ordinary(&tok, s);
        if got_ord == ordinary[i] {
            ord_ok += 1;
        } else {
            failures.push(format!(
                "ordinary #{i} {}: got {:?}, tiktoken {:?}",
                short(s),
                got_ord,
                ordinary[i]
            ));
        }
        let back = tok.decode(&got, false).unwrap();
        let back_ord = tok.decode(&got_ord, false).unwrap();
        if back == *s && back_ord == *s {
            dec_ok += 1;
        } else {
            failures.push(format!(
                "decode #{i} {}: got {} / {}",
                short(s),
                short(&back),
                short(&back_ord)
            ));
        }
        if s.contains(EOT) {
            with_eot += 1;
            assert!(got.contains(&EOT_ID), "#{i}: {EOT} not encoded as special");
            assert!(
                !got_ord.contains(&EOT_ID),
                "#{i}: {EOT} special in ordinary"
            );
        } else {
            assert!(!got.contains(&EOT_ID), "#{i}: spurious {EOT_ID}");
        }
    }
    println!(
        "tokenizer parity: encode {enc_ok}/{n}, encode_ordinary {ord_ok}/{n}, decode round trip \
         {dec_ok}/{n} ({with_eot} strings contain {EOT}); reference {:.1?}, total {:.1?}",
        t_ref,
        t0.elapsed()
    );
    assert!(with_eot > 0, "corpus lacks {EOT}");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn special_token_handling() {
    let tok = load();
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    assert_eq!(ids(EOT), vec![EOT_ID]);
    assert_eq!(ids("Hello world"), vec![15496, 995]);
    let mixed = ids("a cat<|endoftext|>");
    assert_eq!(mixed.last(), Some(&EOT_ID));
    assert_eq!(&mixed[..mixed.len() - 1], ids("a cat").as_slice());
    // As plain text it is "<", "|", "end", "of", "text", "|", ">".
    assert_eq!(encode_ordinary(&tok, EOT).len(), 7);
    assert_eq!(tok.decode(&[EOT_ID], false).unwrap(), EOT);
    assert_eq!(tok.decode(&[EOT_ID], true).unwrap(), "");
}

#[test]
fn make_tokenizer_reproduces_committed_file() {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tokenizer.json");
    let printed =
        common::run_python(&["scripts/make_tokenizer.py", "--out", out.to_str().unwrap()]);
    let committed = std::fs::read(common::repo().join(TOKENIZER)).unwrap();
    let fresh = std::fs::read(&out).unwrap();
    println!(
        "make_tokenizer: {} ({:.1?})",
        printed.split_whitespace().next().unwrap_or(""),
        t0.elapsed()
    );
    assert!(
        committed == fresh,
        "{TOKENIZER} differs from scripts/make_tokenizer.py output ({} vs {} bytes); regenerate it",
        committed.len(),
        fresh.len()
    );
}
