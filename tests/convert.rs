//! scripts/convert_clipcap.py on checkpoints in the exact format of ClipCap's train.py (cuda:0
//! storages, attn.bias buffers, lm_head sharing wte), MLP and transformer mappers: the bundle
//! loads and captions exactly as the original model does.
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
mod common;

use clipcap::generate::caption_embeddings;
use clipcap::model::bundle::Bundle;
use clipcap::options::{GenOptions, Strategy};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

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

/// scripts/export_clip.py, run against stand-ins for the `clip` and `open_clip` packages
/// (scripts/ref/fake_clip: the same calls, a tiny CLIP-shaped tower with seeded weights, fp16 as
/// OpenAI stores it): the archive it writes is fp32, loads on the CPU, exposes `encode_image`,
/// reports its width, and gives the tower's own outputs.
#[test]
fn export_clip_retraces_image_towers_to_fp32_torchscript() {
    use clipcap::model::clip::ImageEncoder;
    let dir = tempfile::tempdir().unwrap();
    let fake = common::repo().join("scripts/ref/fake_clip");
    let python = |args: &[&str]| -> String {
        let out = std::process::Command::new(common::python())
            .args(args)
            .env("PYTHONPATH", &fake)
            .current_dir(common::repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for (flag, name, model_expr) in [
        (
            "--openai",
            "ViT-Tiny",
            "clip.load('ViT-Tiny', jit=False)[0]",
        ),
        (
            "--open-clip",
            "Tiny",
            "open_clip.create_model_and_transforms('Tiny', pretrained='tag')[0]",
        ),
    ] {
        let out = dir.path().join(format!("{name}.pt"));
        let mut args = vec![
            "scripts/export_clip.py",
            flag,
            name,
            "--out",
            out.to_str().unwrap(),
        ];
        if flag == "--open-clip" {
            args.extend(["--pretrained", "tag"]);
        }
        let report: serde_json::Value =
            serde_json::from_str(python(&args).lines().last().unwrap()).unwrap();
        assert_eq!(report["embedding_dim"], 48, "{report}");
        assert_eq!(report["image_size"], 32, "{report}");
        // The tower itself, in fp32, on a seeded batch: the reference.
        let reference = dir.path().join(format!("{name}-ref.safetensors"));
        let code = format!(
            "import torch, clip, open_clip\n\
             from safetensors.torch import save_file\n\
             v = {model_expr}.visual.float().eval()\n\
             x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))\n\
             with torch.no_grad(): y = v(x)\n\
             save_file({{'x': x, 'y': y.contiguous()}}, '{}')\n",
            reference.display()
        );
        python(&["-c", &code]);
        let t = clipcap::model::weights::read_safetensors(&reference).unwrap();
        let enc = ImageEncoder::load(&out, 32, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(enc.dim, 48);
        let got = enc.encode(&t["x"]).unwrap();
        let d = f64::try_from((&got - &t["y"]).abs().max()).unwrap();
        println!("{flag}: max abs diff vs the tower {d:.2e}");
        assert!(
            d < 1e-5,
            "{flag}: exported archive differs from the tower by {d}"
        );
        // Scripted, not traced: it runs in f16 and bf16 too (a trace bakes its f32 casts and
        // `device=x.device`), close to f32.
        assert_eq!(report["method"], "script", "{report}");
        assert_eq!(report["baked_devices"], 0, "{report}");
        for kind in [Kind::BFloat16, Kind::Half] {
            let half = ImageEncoder::load(&out, 32, Device::Cpu, kind).unwrap();
            assert_eq!(half.kind, kind, "{flag}: runs in {kind:?}");
            let h = half.encode(&t["x"]).unwrap();
            let cos = Tensor::cosine_similarity(&h, &t["y"], 1, 1e-8)
                .min()
                .double_value(&[]);
            assert!(cos > 0.99, "{flag} {kind:?}: cosine to the tower {cos}");
        }
    }
    // A trace bakes the class token's zeros onto the CPU: refused unless asked for, and such
    // an archive then runs in f32 when half precision is asked of it.
    let traced = dir.path().join("traced.pt");
    let out = std::process::Command::new(common::python())
        .args([
            "scripts/export_clip.py",
            "--openai",
            "ViT-Tiny",
            "--trace",
            "--out",
        ])
        .arg(&traced)
        .env("PYTHONPATH", &fake)
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("baked device"), "{err}");
    assert!(!traced.exists());
    python(&[
        "scripts/export_clip.py",
        "--openai",
        "ViT-Tiny",
        "--trace",
        "--allow-trace",
        "--out",
        traced.to_str().unwrap(),
    ]);
    // At load, the archive's code is read for baked devices: the trace names the CPU once
    // (the class token's zeros), the scripted export none; on CUDA the trace is refused with
    // what it baked and how to re-export, before libtorch is asked to run it.
    use clipcap::model::clip::baked_devices;
    assert_eq!(
        baked_devices(&traced).unwrap(),
        vec![("cpu".to_string(), 1)]
    );
    assert!(baked_devices(&dir.path().join("ViT-Tiny.pt"))
        .unwrap()
        .is_empty());
    let refused = match ImageEncoder::load(&traced, 32, Device::Cuda(0), Kind::Half) {
        Ok(_) => panic!("a CPU-baked trace is refused on CUDA"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("device baked into the graph (cpu (1x))")
            && refused.contains("scripts/export_clip.py"),
        "{refused}"
    );
    let f32 = ImageEncoder::load(&traced, 32, Device::Cpu, Kind::Float).unwrap();
    let fallback = ImageEncoder::load(&traced, 32, Device::Cpu, Kind::BFloat16).unwrap();
    assert_eq!(
        fallback.kind,
        Kind::Float,
        "the traced archive falls back to f32"
    );
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let d = f64::try_from(
        (fallback.encode(&x).unwrap() - f32.encode(&x).unwrap())
            .abs()
            .max(),
    )
    .unwrap();
    assert!(d < 1e-6, "{d}");
}

/// `export_clip.py` on a CLIP tower (a stand-in `clip` package with CLIP's ViT structure), in
/// f32 and `--quantize int8`: both script cleanly, the int8 one reports its cosine to f32, and
/// a bundle converted with `--clip-int8` encodes with it under `--dtype int8`.
#[test]
fn export_clip_writes_an_int8_tower_that_int8_bundles_encode_with() {
    let dir = tempfile::tempdir().unwrap();
    let export = |extra: &[&str], out: &Path| -> serde_json::Value {
        let o = std::process::Command::new(common::python())
            .args(["scripts/export_clip.py", "--openai", "ViT-B/32", "--out"])
            .arg(out)
            .args(extra)
            .env("PYTHONPATH", common::repo().join("tests/stub_clip"))
            .current_dir(common::repo())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let f32_file = dir.path().join("clip.pt");
    let int8_file = dir.path().join("clip.int8.pt");
    let f = export(&[], &f32_file);
    let q = export(&["--quantize", "int8"], &int8_file);
    for s in [&f, &q] {
        assert_eq!(s["method"], "script");
        assert_eq!(s["embedding_dim"], 32);
    }
    assert!(f.get("min_cosine_to_f32").is_none());
    let cos = q["min_cosine_to_f32"].as_f64().unwrap();
    assert!(
        (0.99..1.0).contains(&cos),
        "int8 tower's cosine to f32: {cos}"
    );

    // A ClipCap checkpoint with a 32-wide prefix, converted with both towers.
    let ckpt = dir.path().join("ckpt");
    let d = ckpt.to_str().unwrap();
    common::run_python(&["scripts/ref/make_original_checkpoint.py", "--out", d]);
    let bundle = dir.path().join("bundle");
    common::run_python(&[
        "scripts/convert_clipcap.py",
        "--checkpoint",
        &format!("{d}/original.pt"),
        "--clip",
        f32_file.to_str().unwrap(),
        "--clip-int8",
        int8_file.to_str().unwrap(),
        "--n-head",
        "4",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    let px = Tensor::rand([3, 3, 224, 224], (Kind::Float, Device::Cpu));
    let _ = common::check_int8_encoder(&bundle, &px);
}
