//! One optimizer step of our trainer against PyTorch (scripts/ref/train_step_reference.py):
//! same initial weights, same batch → the same loss (1e-5) and updated weights (1e-5), for full
//! fine-tuning and for --only-prefix; and the same learning-rate schedule as transformers'
//! get_linear_schedule_with_warmup. Mixed precision (bf16 autocast, run on the CPU here) against
//! the same step under torch.autocast: loss within 2e-2, weights within 2.5 × lr.
mod common;

use clipcap::model::bundle::{CaptionNet, Manifest};
use clipcap::train::amp::{with_autocast, AmpDtype};
use clipcap::train::data::Batch;
use clipcap::train::optim::{lr_factor, AdamW, AdamWConfig};
use clipcap::train::trainer::caption_loss;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// libtorch's default generator is one per process and these tests run on parallel threads: a
/// test seeds it and then draws (inputs, dropout masks), so each takes this lock first, or
/// another test's draws (e.g. a VarStore's random init) land between the seed and the draws.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn one_step(only_prefix: bool, amp: Option<AmpDtype>) {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    common::make_bundle(
        &bundle,
        &[
            "--size",
            "tiny",
            "--mapping",
            "transformer",
            "--num-layers",
            "2",
            "--seed",
            "5",
        ],
    );
    let m = Manifest::read(&bundle).unwrap();
    let mut net = CaptionNet::new(&m.gpt2, &m.mapper, Device::Cpu).unwrap();
    net.load_weights(&bundle.join("model.safetensors")).unwrap();
    // A batch of 3 captions of lengths 5, 3 and 1 (right-padded with 0).
    let tokens = Tensor::from_slice(&[
        40i64, 2068, 318, 257, 13, 64, 3797, 13, 0, 0, 50256, 0, 0, 0, 0,
    ])
    .view([3, 5]);
    let mask = Tensor::from_slice(&[1f32, 1., 1., 1., 1., 1., 1., 1., 0., 0., 1., 0., 0., 0., 0.])
        .view([3, 5]);
    tch::manual_seed(3);
    let clip = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    let batch_file = dir.path().join("batch.safetensors");
    Tensor::write_safetensors(
        &[("tokens", &tokens), ("mask", &mask), ("clip", &clip)],
        &batch_file,
    )
    .unwrap();
    let mut args = vec![
        "scripts/ref/train_step_reference.py",
        "--bundle",
        bundle.to_str().unwrap(),
        "--batch",
        batch_file.to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
    ];
    if only_prefix {
        args.push("--only-prefix");
    }
    if amp.is_some() {
        args.extend(["--amp", "bf16"]);
    }
    common::run_python(&args);

    let params: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = net
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| !(only_prefix && n.starts_with("gpt.")))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    if only_prefix {
        for (n, t) in net.vs.variables() {
            if n.starts_with("gpt.") {
                let _ = t.shallow_clone().set_requires_grad(false);
            }
        }
    }
    let before = net.vs.variables();
    let before: std::collections::BTreeMap<String, Tensor> =
        before.into_iter().map(|(k, v)| (k, v.copy())).collect();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
        params,
    );
    let batch = Batch { tokens, mask, clip };
    let f32_loss = f64::try_from(caption_loss(&net, &batch)).unwrap();
    let loss = with_autocast(Device::Cpu, amp, || caption_loss(&net, &batch));
    opt.zero_grad();
    loss.backward();
    opt.step(1e-3);

    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap())
            .unwrap();
    let want_loss = result["loss"].as_f64().unwrap();
    let got_loss = f64::try_from(&loss).unwrap();
    println!("loss: ours {got_loss:.7} torch {want_loss:.7} (ours in f32: {f32_loss:.7})");
    let (loss_tol, weight_tol) = match amp {
        None => (1e-5, 1e-5),
        // bf16 keeps 8 mantissa bits; one Adam step moves a weight by about lr, so a gradient
        // whose sign differs between the two bf16 computations can differ by 2 × lr.
        Some(_) => (2e-2, 2.5e-3),
    };
    assert!(
        (got_loss - want_loss).abs() < loss_tol,
        "loss {got_loss} vs {want_loss}"
    );
    if amp.is_some() {
        assert!(
            (got_loss - f32_loss).abs() > 1e-7,
            "autocast changed nothing: {got_loss} == {f32_loss}"
        );
    }
    let after =
        clipcap::model::weights::read_safetensors(&Path::new(dir.path()).join("after.safetensors"))
            .unwrap();
    let mut worst = (0f64, String::new());
    let mut moved = 0;
    for (name, var) in net.vs.variables() {
        let want = &after[&name];
        let d = f64::try_from((&var - want).abs().max()).unwrap();
        if d > worst.0 {
            worst = (d, name.clone());
        }
        let changed = f64::try_from((&var - &before[&name]).abs().max()).unwrap() > 0.0;
        assert_eq!(
            changed,
            !(only_prefix && name.starts_with("gpt.")),
            "{name} changed: {changed}"
        );
        moved += changed as usize;
    }
    println!(
        "updated weights: max abs diff {:.2e} ({}), {moved} tensors moved",
        worst.0, worst.1
    );
    assert!(worst.0 < weight_tol, "weights differ: {worst:?}");
    let factors = result["lr_factors"].as_array().unwrap();
    for (step, f) in factors.iter().enumerate() {
        assert!(
            (lr_factor(step as i64, 5, 20) - f.as_f64().unwrap()).abs() < 1e-12,
            "step {step}"
        );
    }
}

#[test]
fn full_finetune_step_matches_pytorch() {
    one_step(false, None);
}

#[test]
fn bf16_autocast_step_matches_pytorch_autocast() {
    one_step(false, Some(AmpDtype::Bf16));
}

#[test]
fn only_prefix_step_matches_pytorch() {
    one_step(true, None);
}

/// GPT-2's training dropout: active in caption_loss_with_dropout (the loss changes with the
/// masks, which follow torch's seed), and p = 0 is exactly the eval-mode loss.
#[test]
fn dropout_is_seeded_and_zero_dropout_is_eval_mode() {
    use clipcap::train::trainer::caption_loss_with_dropout;
    let _rng = torch_rng();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    common::make_bundle(&bundle, &["--size", "tiny", "--seed", "6"]);
    let m = Manifest::read(&bundle).unwrap();
    let mut net = CaptionNet::new(&m.gpt2, &m.mapper, Device::Cpu).unwrap();
    net.load_weights(&bundle.join("model.safetensors")).unwrap();
    let tokens = Tensor::from_slice(&[40i64, 2068, 318, 257, 13, 64, 3797, 13, 0, 0]).view([2, 5]);
    let mask = Tensor::from_slice(&[1f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.]).view([2, 5]);
    tch::manual_seed(1);
    let clip = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
    let batch = Batch { tokens, mask, clip };
    let loss = |p: f64, seed: i64| {
        tch::manual_seed(seed);
        f64::try_from(caption_loss_with_dropout(&net, &batch, p)).unwrap()
    };
    let eval = f64::try_from(caption_loss(&net, &batch)).unwrap();
    assert_eq!(loss(0.0, 1), eval);
    let (a, b, c) = (loss(0.1, 1), loss(0.1, 1), loss(0.1, 2));
    println!("eval {eval:.6}, dropout 0.1: seed 1 {a:.6} {b:.6}, seed 2 {c:.6}");
    assert_eq!(a, b, "same seed, same masks");
    assert_ne!(a, c, "another seed, other masks");
    assert_ne!(a, eval, "dropout changed nothing");
}
