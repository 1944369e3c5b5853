//! The requests a benchmark level sends, drawn from a seed: which kind, which images, and (open
//! loop) when. Pure, so that a schedule is reproducible and testable without a server.
//!
//! Kinds and images come from one generator and arrival gaps from another, both seeded from
//! the same seed: the same seed at another rate sends the same requests, only spaced
//! differently, so load levels differ in load alone.
use super::spec::Mix;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Duration;

/// One request of a schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// When it is due, from the level's start (zero in closed loop: as soon as a client is free).
    pub at: Duration,
    /// Index into the mix's kinds.
    pub kind: usize,
    /// Indices into the kind's image pool, one per image of the request.
    pub images: Vec<usize>,
}

/// `count` requests of `mix`; `rate` (requests/s) spaces them as a Poisson process (exponential
/// gaps, first at 0), `None` leaves them all due at once. `pools[k]` is kind `k`'s image count.
pub fn plan(
    mix: &Mix,
    pools: &[usize],
    rate: Option<f64>,
    count: usize,
    seed: u64,
) -> Vec<Planned> {
    let mut what = StdRng::seed_from_u64(seed);
    // A second stream for the gaps (a fixed odd constant keeps it apart from the first).
    let mut when = StdRng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
    let total: f64 = mix.kinds.iter().map(|k| k.weight).sum();
    let mut t = 0.0f64;
    (0..count)
        .map(|i| {
            let mut u = what.random::<f64>() * total;
            let mut kind = mix.kinds.len() - 1;
            for (k, spec) in mix.kinds.iter().enumerate() {
                if u < spec.weight {
                    kind = k;
                    break;
                }
                u -= spec.weight;
            }
            let (lo, hi) = mix.kinds[kind].images;
            let n = what.random_range(lo..=hi);
            let pool = pools[kind].max(1);
            let images = (0..n).map(|_| what.random_range(0..pool)).collect();
            if let (Some(r), true) = (rate, i > 0) {
                // 1 - u is in (0, 1]: never ln(0).
                t += -(1.0 - when.random::<f64>()).ln() / r;
            }
            Planned {
                at: Duration::from_secs_f64(t),
                kind,
                images,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::bench::spec::Mix;
    use std::path::Path;

    fn mix() -> Mix {
        Mix::parse(
            "[[kind]]\nname = \"a\"\nweight = 3\nimages = [1, 4]\n\
             [[kind]]\nname = \"b\"\nweight = 1\n",
            Path::new("."),
        )
        .unwrap()
    }

    #[test]
    fn a_schedule_is_reproducible_from_its_seed() {
        let m = mix();
        let a = plan(&m, &[8, 8], Some(5.0), 200, 7);
        assert_eq!(a, plan(&m, &[8, 8], Some(5.0), 200, 7));
        assert_ne!(a, plan(&m, &[8, 8], Some(5.0), 200, 8));
        // Another rate: the same requests, other times.
        let b = plan(&m, &[8, 8], Some(50.0), 200, 7);
        let what = |p: &[Planned]| {
            p.iter()
                .map(|r| (r.kind, r.images.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(what(&a), what(&b));
        assert_ne!(a[1].at, b[1].at);
        // Scaled exactly: the gaps are the same draws divided by the rate.
        let ratio = a[199].at.as_secs_f64() / b[199].at.as_secs_f64();
        assert!((ratio - 10.0).abs() < 1e-6, "{ratio}");
    }

    #[test]
    fn arrivals_are_poisson_at_the_rate_and_kinds_follow_their_weights() {
        let m = mix();
        let n = 20_000;
        let p = plan(&m, &[8, 8], Some(4.0), n, 1);
        assert_eq!(p[0].at, Duration::ZERO);
        assert!(p.windows(2).all(|w| w[0].at <= w[1].at));
        // Mean gap 1/rate: its standard error is 0.25/sqrt(n) = 0.0018 s; allow 4 of them.
        let mean = p[n - 1].at.as_secs_f64() / (n - 1) as f64;
        assert!((mean - 0.25).abs() < 0.0072, "mean gap {mean}");
        // Exponential gaps: their standard deviation equals their mean (within 5%).
        let gaps: Vec<f64> = p
            .windows(2)
            .map(|w| (w[1].at - w[0].at).as_secs_f64())
            .collect();
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!(
            (var.sqrt() / mean - 1.0).abs() < 0.05,
            "sd/mean {}",
            var.sqrt() / mean
        );
        // Weights 3:1, so 75% are "a" (standard error 0.3%).
        let a = p.iter().filter(|r| r.kind == 0).count() as f64 / n as f64;
        assert!((a - 0.75).abs() < 0.012, "{a}");
        // "a" draws 1-4 images uniformly, "b" always one, from pools of 8.
        let counts: Vec<usize> = (1..=4)
            .map(|k| {
                p.iter()
                    .filter(|r| r.kind == 0 && r.images.len() == k)
                    .count()
            })
            .collect();
        assert!(counts.iter().all(|&c| c > 3000), "{counts:?}");
        assert!(p
            .iter()
            .filter(|r| r.kind == 1)
            .all(|r| r.images.len() == 1));
        assert!(p.iter().flat_map(|r| &r.images).all(|&i| i < 8));
    }

    #[test]
    fn a_closed_loop_schedule_has_everything_due_at_once() {
        let p = plan(&mix(), &[2, 2], None, 50, 3);
        assert!(p.iter().all(|r| r.at == Duration::ZERO));
        assert_eq!(p.len(), 50);
    }
}
