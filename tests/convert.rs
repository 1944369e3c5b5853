//! scripts/convert_clipcap.py on checkpoints in the exact format of ClipCap's train.py (cuda:0
//! storages, attn.bias buffers, lm_head sharing wte), MLP and transformer mappers: the bundle
//! loads and captions exactly as the original model does.
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
mod common;

use clipcap::generate::{caption_embeddings, GenOptions, Strategy};
use clipcap::model::bundle::Bundle;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind};

#[derive(Deserialize)]
struct Expected {
    beam: Vec<i64>,
    greedy: Vec<i64>,
}

fn check(mapping: &str, prefix_length: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    common::run_python(&[
        "scripts/ref/make_original_checkpoint.py",
        "--out",
        d,
        "--mapping",
        mapping,
        "--prefix-length",
        prefix_length,
    ]);
    // A plain torch.load of such a file fails on a CPU-only host: the converter must map it.
    let out = Path::new(d).join("bundle");
    common::run_python(&[
        "scripts/convert_clipcap.py",
        "--checkpoint",
        &format!("{d}/original.pt"),
        "--clip",
        &format!("{d}/clip.pt"),
        "--out",
        out.to_str().unwrap(),
        "--mapping",
        mapping,
        "--n-head",
        "4",
    ]);
    let bundle = Arc::new(Bundle::load(&out, Device::Cpu, Kind::Float).unwrap());
    assert_eq!(
        bundle.manifest.mapper.prefix_length.to_string(),
        prefix_length
    );
    assert_eq!(bundle.encoder.dim, 32, "encode_image probed for the width");
    let clip =
        clipcap::model::weights::read_safetensors(&Path::new(d).join("embeddings.safetensors"))
            .unwrap()["clip"]
            .shallow_clone();
    let want: Vec<Expected> =
        serde_json::from_str(&std::fs::read_to_string(Path::new(d).join("expected.json")).unwrap())
            .unwrap();
    let beam = GenOptions {
        max_tokens: 40,
        ..Default::default()
    };
    let greedy = GenOptions {
        strategy: Strategy::Greedy,
        max_tokens: 40,
        ..Default::default()
    };
    let got_b = caption_embeddings(bundle.clone(), &clip, &beam).unwrap();
    let got_g = caption_embeddings(bundle.clone(), &clip, &greedy).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(got_b[i][0].tokens, w.beam, "image {i}: beam");
        assert_eq!(got_g[i][0].tokens, w.greedy, "image {i}: greedy");
    }
}

#[test]
fn converts_mlp_checkpoint() {
    check("mlp", "10");
}

#[test]
fn converts_single_linear_mlp_checkpoint() {
    check("mlp", "12");
}

#[test]
fn converts_transformer_checkpoint() {
    check("transformer", "10");
}
