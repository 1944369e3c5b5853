//! AdamW and ClipCap's learning-rate schedule, with state we can checkpoint.
//!
//! tch's built-in optimizers keep their moments inside libtorch where they cannot be saved,
//! so resuming would restart Adam from zero. This AdamW follows `torch.optim.AdamW` exactly and
//! keeps its moments as named tensors.
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The original's `transformers.AdamW(lr=2e-5)`: eps 1e-6, no weight decay.
    fn default() -> Self {
        AdamWConfig {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Parameters by name (shallow clones of the VarStore's variables).
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: i64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: Vec<(String, Tensor)>) -> Self {
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        AdamW {
            cfg,
            params,
            m,
            v,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Global L2 norm of all gradients (one host read).
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .filter_map(|(_, p)| {
                let g = p.grad();
                g.defined().then(|| g.to_kind(Kind::Float).norm().square())
            })
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        f64::try_from(Tensor::stack(&norms, 0).sum(Kind::Float).sqrt()).unwrap_or(f64::NAN)
    }

    /// Scales all gradients so their global norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if norm.is_finite() && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for (_, p) in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(scale);
                }
            }
        }
        norm
    }

    /// Multiplies every gradient by `s` (loss-scale undo for fp16).
    pub fn scale_grads(&mut self, s: f64) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(s);
            }
        }
    }

    /// One AdamW update with learning rate `lr` (torch.optim.AdamW, amsgrad off).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2, eps, wd) = (
            self.cfg.beta1,
            self.cfg.beta2,
            self.cfg.eps,
            self.cfg.weight_decay,
        );
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(self.m[i].kind());
                if wd != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = self.m[i].g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = self.v[i]
                    .g_mul_scalar_(b2)
                    .g_add_(&(g.square() * (1.0 - b2)));
                let denom = (self.v[i].sqrt() / bc2.sqrt()) + eps;
                let update = (&self.m[i] / denom) * (lr / bc1);
                let _ = p.g_sub_(&update.to_kind(p.kind()));
            }
        });
    }

    /// Moments as named tensors (`adam.m.<param>`, `adam.v.<param>`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("adam.m.{name}"), self.m[i].shallow_clone()));
            out.push((format!("adam.v.{name}"), self.v[i].shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`state_tensors`].
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: i64,
    ) -> anyhow::Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("adam.m.", &mut self.m[i]), ("adam.v.", &mut self.v[i])] {
                let key = format!("{prefix}{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("checkpoint lacks {key}"))?;
                if t.size() != p.size() {
                    anyhow::bail!(
                        "checkpoint {key} has shape {:?}, expected {:?}",
                        t.size(),
                        p.size()
                    );
                }
                *slot = t.to_device(p.device()).to_kind(slot.kind());
            }
        }
        self.step = step;
        Ok(())
    }
}

/// `get_linear_schedule_with_warmup`: the factor for optimizer step `step` (0-based, the
/// value LambdaLR uses for the update made at that step).
pub fn lr_factor(step: i64, warmup: i64, total: i64) -> f64 {
    if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0)
    }
}
