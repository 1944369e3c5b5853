//! int8 weights (`--dtype int8`, `model::int8`): products against an f64 reference within a
//! hard per-element bound; a row's result bit for bit the same alone or in any batch; GPT-2
//! steps and captions through the engine that agree with f32 (the trained bundle's captions
//! are compared in `tests/train.rs`).
use clipcap::model::int8::Int8Matrix;
use tch::{Device, Kind, Tensor};

/// `|Δ_ij| ≤ Σ_k |x_jk|·δw_i + Σ_k |w_ik|·δx_j + in·δw_i·δx_j`, with the weight's rounding
/// `δw_i = max_k |w_ik| / 254` (half a step of 127 levels per row) and the activation's
/// `δx_j = max_k |x_jk| / 127` (half a step of 7-bit levels over [−max, max]), plus f32's
/// own rounding (relative 1e-5).
fn bound(x: &Tensor, w: &Tensor, y_ref: &Tensor) -> Tensor {
    let dw = w.abs().amax([1], false) / 254.0; // [out]
    let dx = x.abs().amax([1], true) / 127.0; // [rows, 1]
    let n = w.size()[1] as f64;
    let sx = x.abs().sum_dim_intlist(&[1i64][..], true, Kind::Double); // [rows, 1]
    let sw = w.abs().sum_dim_intlist(&[1i64][..], false, Kind::Double); // [out]
    &sx * &dw.unsqueeze(0)
        + &dx * sw.unsqueeze(0)
        + (&dx * dw.unsqueeze(0)) * n
        + y_ref.abs() * 1e-5
        + 1e-9
}

#[test]
fn int8_products_stay_within_their_rounding_bound_of_f64() {
    tch::manual_seed(11);
    let opts = (Kind::Double, Device::Cpu);
    for (out, inp, rows) in [(2304, 768, 5), (768, 3072, 17), (4000, 768, 1)] {
        let w = Tensor::randn([out, inp], opts) * 0.02;
        let bias = Tensor::randn([out], opts) * 0.1;
        let q = Int8Matrix::new(&w.to_kind(Kind::Float)).unwrap();
        let gaussian = Tensor::randn([rows, inp], opts);
        // With outliers, as GPT-2's activations have: the row's scale follows its largest value.
        let outliers = &gaussian + Tensor::randn([rows, inp], opts).pow_tensor_scalar(7) * 0.01;
        for (name, x, max_rel) in [("gaussian", &gaussian, 0.03), ("outliers", &outliers, 1.0)] {
            let y = q
                .linear(&x.to_kind(Kind::Float), Some(&bias.to_kind(Kind::Float)))
                .to_kind(Kind::Double);
            let prod = x.matmul(&w.tr());
            let y_ref = &prod + &bias;
            let err = (&y - &y_ref).abs();
            let worst = (&err / bound(x, &w, &prod)).max().double_value(&[]);
            let rel = ((&y - &y_ref).norm() / prod.norm()).double_value(&[]);
            println!("[{out}x{inp}] x {rows} {name} rows: worst error {worst:.3} of its bound, relative error {rel:.4}");
            assert!(
                worst <= 1.0,
                "an element is off by more than its bound ({worst})"
            );
            assert!(rel < max_rel, "relative error {rel}");
            assert_eq!(y.size(), [rows, out]);
        }
        assert_eq!(q.weight_bytes(), (out * inp) as u64);
    }
}

#[test]
fn a_rows_result_is_the_same_alone_or_in_any_batch() {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([512, 256], opts) * 0.05;
    let bias = Tensor::randn([512], opts);
    let q = Int8Matrix::new(&w).unwrap();
    // Rows of very different magnitudes: a shared activation scale would change the small ones.
    let x = Tensor::randn([9, 256], opts)
        * Tensor::from_slice(&[1e-3f32, 1., 50., 0.2, 7., 1e3, 0.01, 3., 0.]).reshape([9, 1]);
    let batched = q.linear(&x, Some(&bias));
    for i in 0..9 {
        let alone = q.linear(&x.narrow(0, i, 1), Some(&bias));
        assert!(
            batched.narrow(0, i, 1).equal(&alone),
            "row {i} differs alone vs batched"
        );
    }
    let reordered = q.linear(&x.flip([0]), Some(&bias)).flip([0]);
    assert!(batched.equal(&reordered));
    // 3-D input, as GPT-2's blocks pass it.
    let x3 = x.reshape([3, 3, 256]);
    assert!(q.linear(&x3, Some(&bias)).reshape([9, 512]).equal(&batched));
}

#[test]
fn an_int8_bundle_decodes_and_reports_its_smaller_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let out = std::process::Command::new(std::env::var("CLIPCAP_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/clipcap/venv-torch-2.11.0/bin/python",
            std::env::var("HOME").unwrap()
        )
    }))
    .args([
        "scripts/make_test_bundle.py",
        "--size",
        "tiny",
        "--seed",
        "4",
        "--out",
    ])
    .arg(&model)
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decode = |dtype: &str| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
            .args([
                "bench-decode",
                "--images",
                "3",
                "--batch",
                "1,3",
                "--max-tokens",
                "12",
                "--dtype",
                dtype,
                "--model",
            ])
            .arg(&model)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let f32 = decode("f32");
    let int8 = decode("int8");
    assert_eq!(int8["dtype"], "int8");
    let (bf, bi) = (
        f32["weight_bytes_per_step"].as_u64().unwrap(),
        int8["weight_bytes_per_step"].as_u64().unwrap(),
    );
    assert_eq!(bf, 4 * bi, "int8 reads a quarter of f32's weight bytes");
    assert!(int8["steps"].as_u64().unwrap() >= 1);
}
