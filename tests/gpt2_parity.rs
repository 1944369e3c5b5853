//! GPT-2 parity with Hugging Face transformers (tiny random config, f32, CPU).
//! Tolerance: 1e-4 max abs on logits.
mod common;

use clipcap::model::gpt2::{Gpt2, Gpt2Config, Gpt2Model};
use clipcap::model::weights;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn reference() -> (tempfile::TempDir, BTreeMap<String, Tensor>) {
    let dir = tempfile::tempdir().unwrap();
    common::run_python(&[
        "scripts/ref/gpt2_reference.py",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let io = weights::read_safetensors(&dir.path().join("io.safetensors")).unwrap();
    (dir, io)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from((a - b).abs().max()).unwrap()
}

fn check(what: &str, a: &Tensor, b: &Tensor) {
    let d = max_diff(a, b);
    println!("{what}: max abs diff {d:.3e}");
    assert!(d < TOL, "{what}: max abs diff {d} >= {TOL}");
}

fn load(dir: &Path) -> Gpt2Model {
    Gpt2Model::load_hf(dir, Device::Cpu).unwrap()
}

#[test]
fn full_sequence_matches_hf() {
    let (dir, io) = reference();
    let m = load(dir.path());
    let _g = tch::no_grad_guard();
    let h = m.gpt.forward_full(&io["embeds"], None);
    check("embeds logits", &m.gpt.logits(&h), &io["logits_embeds"]);
    let h = m.gpt.forward_full(&m.gpt.embed(&io["ids"]), None);
    check("ids logits", &m.gpt.logits(&h), &io["logits_ids"]);
}

#[test]
fn cached_steps_match_hf() {
    let (dir, io) = reference();
    let m = load(dir.path());
    let _g = tch::no_grad_guard();
    let embeds = &io["embeds"];
    let want = &io["logits_embeds"];
    let t = embeds.size()[1];
    // Small capacity so the cache has to grow while decoding.
    let mut cache = m.gpt.new_cache(2, 4);
    let h = m.gpt.forward(&embeds.narrow(1, 0, 3), None, &mut cache);
    check("prefill", &m.gpt.logits(&h), &want.narrow(1, 0, 3));
    for i in 3..t {
        let h = m.gpt.forward(&embeds.narrow(1, i, 1), None, &mut cache);
        check(
            &format!("step {i}"),
            &m.gpt.logits(&h),
            &want.narrow(1, i, 1),
        );
    }
    assert_eq!(cache.len(), t);
}

#[test]
fn left_padded_batch_matches_hf() {
    let (dir, io) = reference();
    let m = load(dir.path());
    let _g = tch::no_grad_guard();
    let mask = io["padded_mask"].to_kind(Kind::Bool);
    let h = m.gpt.forward_full(&io["padded_embeds"], Some(&mask));
    let got = m.gpt.logits(&h);
    let keep = mask.unsqueeze(-1);
    let zero = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    check(
        "left-padded batch (valid positions)",
        &got.where_self(&keep, &zero),
        &io["logits_padded"].where_self(&keep, &zero),
    );
    // Decoding on top of a padded prefill: rows are then gathered (beam reorder) and joined.
    let mut cache = m.gpt.new_cache(3, 9);
    let t = 9;
    let _ = m.gpt.forward(
        &io["padded_embeds"].narrow(1, 0, t - 1),
        Some(&mask.narrow(1, 0, t - 1)),
        &mut cache,
    );
    let h = m
        .gpt
        .forward(&io["padded_embeds"].narrow(1, t - 1, 1), None, &mut cache);
    check(
        "padded prefill + cached step",
        &m.gpt.logits(&h),
        &io["logits_padded"].narrow(1, t - 1, 1),
    );
}

#[test]
fn rows_can_be_gathered_dropped_and_joined() {
    let (dir, io) = reference();
    let m = load(dir.path());
    let _g = tch::no_grad_guard();
    let embeds = &io["embeds"];
    let want = &io["logits_embeds"];
    // Row 1 prefilled with 6 tokens, then reordered to [1, 0, 1] and row 0 dropped again.
    let mut cache = m.gpt.new_cache(2, 6);
    let _ = m.gpt.forward(&embeds.narrow(1, 0, 6), None, &mut cache);
    cache.select_rows(&Tensor::from_slice(&[1i64, 0, 1]));
    let step = embeds
        .narrow(1, 6, 1)
        .index_select(0, &Tensor::from_slice(&[1i64, 0, 1]));
    let h = m.gpt.forward(&step, None, &mut cache);
    let expect = want
        .narrow(1, 6, 1)
        .index_select(0, &Tensor::from_slice(&[1i64, 0, 1]));
    check("gathered rows", &m.gpt.logits(&h), &expect);
    cache.select_rows(&Tensor::from_slice(&[0i64]));
    // A newcomer (row 0 of the batch, 3 tokens so far) joins the running row 1 (7 tokens).
    let mut newcomer = m.gpt.new_cache(1, 3);
    let _ = m
        .gpt
        .forward(&embeds.narrow(0, 0, 1).narrow(1, 0, 3), None, &mut newcomer);
    cache.append_rows(newcomer);
    let step = Tensor::cat(
        &[
            embeds.narrow(0, 1, 1).narrow(1, 7, 1),
            embeds.narrow(0, 0, 1).narrow(1, 3, 1),
        ],
        0,
    );
    let h = m.gpt.forward(&step, None, &mut cache);
    let expect = Tensor::cat(
        &[
            want.narrow(0, 1, 1).narrow(1, 7, 1),
            want.narrow(0, 0, 1).narrow(1, 3, 1),
        ],
        0,
    );
    check("joined rows", &m.gpt.logits(&h), &expect);
}

#[test]
fn loads_clipcap_style_names_with_buffers_and_tied_head() {
    let (dir, io) = reference();
    let cfg = Gpt2Config::from_file(&dir.path().join("config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let gpt = Gpt2::new(vs.root() / "gpt", &cfg).unwrap();
    weights::load_gpt2_safetensors(
        &mut vs,
        &dir.path().join("clipcap_style.safetensors"),
        "gpt.",
        "gpt.",
    )
    .unwrap();
    let _g = tch::no_grad_guard();
    let h = gpt.forward_full(&io["embeds"], None);
    check("clipcap-style load", &gpt.logits(&h), &io["logits_embeds"]);
}

#[test]
fn wrong_shapes_name_the_file_and_tensor() {
    let (dir, _io) = reference();
    let mut cfg = Gpt2Config::from_file(&dir.path().join("config.json")).unwrap();
    cfg.n_embd = 64;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let _gpt = Gpt2::new(vs.root() / "gpt", &cfg).unwrap();
    let file = dir.path().join("model.safetensors");
    let err = weights::load_gpt2_safetensors(&mut vs, &file, "", "gpt.")
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("gpt.transformer."), "{err}");
    assert!(err.contains("shape"), "{err}");
}
