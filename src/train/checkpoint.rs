//! Training checkpoints: the network's weights, the optimizer's state and where the run stands,
//! in one safetensors file written atomically, so that a resumed run continues exactly.
use crate::model::bundle::CaptionNet;
use crate::train::amp::LossScaler;
use crate::train::optim::AdamW;
use crate::train::spec::TrainSpec;
use crate::train::trainer::LossPoint;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Saved with every checkpoint: where to continue.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct CheckpointState {
    pub(super) spec: TrainSpec,
    /// Epoch in progress (0-based) and batches of it already done.
    pub(super) epoch: usize,
    pub(super) batch_in_epoch: usize,
    pub(super) global_step: i64,
    pub(super) history: Vec<LossPoint>,
    pub(super) val_history: Vec<LossPoint>,
    /// fp16's loss scale (checkpoints from before it was saved start from the default).
    #[serde(default)]
    pub(super) scaler: LossScaler,
}

/// Where a run starts: the checkpoint file it saves to, and its state.
pub(super) struct Start {
    pub(super) path: PathBuf,
    pub(super) state: CheckpointState,
    /// The state (and `net`'s and `opt`'s) came from a checkpoint.
    pub(super) resumed: bool,
    /// What the resume changed (more epochs), for the run's warnings.
    pub(super) notes: Vec<String>,
}

/// The fields of two specs that differ, as `name (old → new)`, flattened (params inline).
fn spec_diff(old: &TrainSpec, new: &TrainSpec) -> Vec<(String, String)> {
    let (a, b) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    );
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec![];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| {
                v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into())
            };
            (
                k.clone(),
                format!("{k} ({} → {})", show(a.get(k)), show(b.get(k))),
            )
        })
        .collect()
}

/// Creates `ckpt_dir`; with `resume` and a checkpoint there, loads it into `net` and `opt` and
/// continues from its state (which must have been made with the same `spec`), else starts at 0.
pub(super) fn start(
    spec: &TrainSpec,
    ckpt_dir: &Path,
    resume: bool,
    net: &mut CaptionNet,
    opt: &mut AdamW,
) -> Result<Start> {
    let mut state = CheckpointState {
        spec: spec.clone(),
        epoch: 0,
        batch_in_epoch: 0,
        global_step: 0,
        history: vec![],
        val_history: vec![],
        scaler: LossScaler::default(),
    };
    std::fs::create_dir_all(ckpt_dir)?;
    let ckpt = ckpt_dir.join(CHECKPOINT);
    let resumed = resume && ckpt.exists();
    let mut notes = vec![];
    if resumed {
        state = load(&ckpt, net, opt)?;
        let diff = spec_diff(&state.spec, spec);
        // Only the number of epochs may change: a finished run can be extended (or a long
        // one cut short, not below where it stands).
        let others: Vec<&str> = diff
            .iter()
            .filter(|(k, _)| k != "epochs")
            .map(|(_, d)| d.as_str())
            .collect();
        if !others.is_empty() {
            bail!(
                "the checkpoint in {} was made with another spec: {}; only epochs may change on --resume",
                ckpt_dir.display(),
                others.join(", ")
            );
        }
        if spec.params.epochs != state.spec.params.epochs {
            if spec.params.epochs < state.epoch {
                bail!(
                    "the checkpoint in {} has finished {} epochs; --epochs {} would end before it",
                    ckpt_dir.display(),
                    state.epoch,
                    spec.params.epochs
                );
            }
            notes.push(format!(
                "resuming with {} epochs instead of {}: the learning-rate schedule is stretched to the new length",
                spec.params.epochs, state.spec.params.epochs
            ));
            state.spec.params.epochs = spec.params.epochs;
        }
    }
    Ok(Start {
        path: ckpt,
        state,
        resumed,
        notes,
    })
}

/// Writes the checkpoint to a temporary file beside `path`, then renames it into place.
pub(super) fn save(
    path: &Path,
    net: &CaptionNet,
    opt: &AdamW,
    state: &CheckpointState,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = net
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("net.{n}"), t.to_device(Device::Cpu)))
        .collect();
    named.extend(
        opt.state_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu))),
    );
    let json = serde_json::to_vec(state)?;
    named.push(("state_json".into(), Tensor::from_slice(&json)));
    crate::fsutil::replace_with(path, |tmp| {
        Tensor::write_safetensors(&named, tmp)
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// Loads a checkpoint's weights into `net` and its optimizer state into `opt`.
fn load(path: &Path, net: &mut CaptionNet, opt: &mut AdamW) -> Result<CheckpointState> {
    let tensors = crate::model::weights::read_safetensors(path)?;
    let json: Vec<u8> = Vec::try_from(
        tensors
            .get("state_json")
            .with_context(|| format!("{}: no state", path.display()))?,
    )?;
    let state: CheckpointState = serde_json::from_slice(&json)?;
    let named: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("net.")
                .map(|n| (n.to_string(), v.shallow_clone()))
        })
        .collect();
    crate::model::weights::copy_into(&net.vs, "", &named, path)?;
    opt.load_state(&tensors, state.global_step)?;
    Ok(state)
}
