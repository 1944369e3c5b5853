//! Exploration: what one decode step costs by strategy, rows and cohorts, and what churn
//! (one image leaving and one joining per step) adds.
//!   target/debug/examples/step_cost models/demo [name-prefix] [rounds]
use clipcap::generate::Decoder;
use clipcap::model::bundle::Bundle;
use clipcap::options::{GenOptions, Strategy};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

// Decoder::new takes an Arc; the example runs on one thread.
#[allow(clippy::arc_with_non_send_sync)]
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let b = Arc::new(Bundle::load(std::path::Path::new(&dir), Device::Cpu, Kind::Float).unwrap());
    let d = b.manifest.mapper.prefix_dim;
    let _g = tch::no_grad_guard();
    let beam = GenOptions {
        max_tokens: 40,
        ..Default::default()
    };
    let greedy = GenOptions {
        strategy: Strategy::Greedy,
        max_tokens: 40,
        ..Default::default()
    };
    let topp = GenOptions {
        strategy: Strategy::Sample,
        temperature: 0.9,
        top_p: 0.95,
        max_tokens: 40,
        seed: Some(1),
        ..Default::default()
    };
    let hot = GenOptions {
        strategy: Strategy::Sample,
        temperature: 2.0,
        max_tokens: 40,
        seed: Some(1),
        ..Default::default()
    };
    let cases: Vec<(&str, &GenOptions, i64, i64)> = vec![
        ("beam5 1x1", &beam, 1, 1),
        ("beam5 1x8", &beam, 1, 8),
        ("beam5 8x1", &beam, 8, 1),
        ("greedy 1x1", &greedy, 1, 1),
        ("greedy 1x40", &greedy, 1, 40),
        ("greedy 8x5", &greedy, 8, 5),
        ("topp 1x1", &topp, 1, 1),
        ("topp 1x40", &topp, 1, 40),
        ("hot 1x1", &hot, 1, 1),
        ("hot 1x40", &hot, 1, 40),
    ];
    let only = std::env::args().nth(2);
    let rounds: usize = std::env::args().nth(3).map_or(2, |r| r.parse().unwrap());
    for round in 0..rounds {
        for (name, o, cohorts, per) in &cases {
            if only.as_deref().is_some_and(|f| !name.starts_with(f)) {
                continue;
            }
            let mut dec = Decoder::new(b.clone());
            let mut id = 0;
            for _ in 0..*cohorts {
                let clip = Tensor::randn([*per, d], (Kind::Float, Device::Cpu));
                dec.add(&clip, o, (id..id + *per as u64).collect()).unwrap();
                id += *per as u64;
            }
            dec.step().unwrap();
            dec.step().unwrap();
            let rows0 = dec.rows();
            let t = Instant::now();
            let steps = 6;
            for _ in 0..steps {
                dec.step().unwrap();
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
            if round == rounds - 1 {
                println!(
                    "{name:14} rows {rows0:3} -> {:3}  {ms:7.3} ms/step  {:6.3} ms/row",
                    dec.rows(),
                    ms / rows0 as f64
                );
            }
        }
    }
    // Churn: a running batch where one image leaves and one joins at every step (as under
    // continuous batching), against the same batch without churn.
    if only
        .as_deref()
        .is_none_or(|f| "churn".starts_with(f) || f.starts_with("churn"))
    {
        for round in 0..rounds {
            for churn in [false, true] {
                tch::manual_seed(7);
                let mut dec = Decoder::new(b.clone());
                let running = 48;
                let clip = Tensor::randn([running, d], (Kind::Float, Device::Cpu));
                let mut long = beam.clone();
                long.max_tokens = 60;
                dec.add(&clip, &long, (0..running as u64).collect())
                    .unwrap();
                for _ in 0..2 {
                    dec.step().unwrap();
                }
                let mut next = running as u64;
                let mut oldest = 0u64;
                let steps = 6;
                let mut add_ms = 0.0;
                let t = Instant::now();
                for _ in 0..steps {
                    if churn {
                        dec.cancel(oldest);
                        oldest += 1;
                        let a = Instant::now();
                        let clip = Tensor::randn([1, d], (Kind::Float, Device::Cpu));
                        dec.add(&clip, &long, vec![next]).unwrap();
                        add_ms += a.elapsed().as_secs_f64() * 1e3;
                        next += 1;
                    }
                    dec.step().unwrap();
                }
                let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
                if round == rounds - 1 {
                    let name = if churn { "churn 48 b5" } else { "steady 48 b5" };
                    println!(
                        "{name:14} rows {:3}  {ms:7.3} ms/step  (prefill {:6.3} ms of it)",
                        dec.rows(),
                        add_ms / steps as f64
                    );
                }
            }
        }
    }
}
