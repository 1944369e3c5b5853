//! Loading named tensors from safetensors files into a `VarStore`, with errors that name the
//! file and the tensor.
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Tensor};

/// Reads every tensor of a safetensors file (on the CPU).
pub fn read_safetensors(file: &Path) -> Result<BTreeMap<String, Tensor>> {
    let list = Tensor::read_safetensors(file)
        .with_context(|| format!("reading safetensors {}", file.display()))?;
    Ok(list.into_iter().collect())
}

/// The rows of 2-D tensor `name` in a safetensors file, as f32 vectors.
pub fn read_rows(file: &Path, name: &str) -> Result<Vec<Vec<f32>>> {
    let t = read_safetensors(file)?
        .remove(name)
        .with_context(|| format!("{}: no tensor {name:?}", file.display()))?;
    Ok(tensor_rows(&t))
}

/// `n` rows of `dim` standard-normal values from libtorch's generator seeded with `seed`
/// (the same values `torch.manual_seed(seed); torch.randn(n, dim)` gives).
pub fn random_rows(n: usize, dim: usize, seed: i64) -> Vec<Vec<f32>> {
    tch::manual_seed(seed);
    tensor_rows(&Tensor::randn(
        [n as i64, dim as i64],
        (tch::Kind::Float, tch::Device::Cpu),
    ))
}

/// A `[N, D]` tensor as `N` f32 vectors.
pub fn tensor_rows(t: &Tensor) -> Vec<Vec<f32>> {
    let t = t
        .to_kind(tch::Kind::Float)
        .to_device(tch::Device::Cpu)
        .contiguous();
    let size = t.size();
    let width = size.get(1).copied().unwrap_or(0).max(0) as usize;
    let flat = Vec::<f32>::try_from(t.view([-1])).unwrap_or_default();
    if width == 0 {
        return vec![vec![]; size.first().copied().unwrap_or(0).max(0) as usize];
    }
    flat.chunks(width).map(|c| c.to_vec()).collect()
}

/// Maps a GPT-2 tensor name as found in a file to our variable name, or `None` for tensors
/// that carry no weights (HF's per-layer `attn.bias`/`attn.masked_bias` causal-mask buffers).
/// Accepts `GPT2LMHeadModel` names with or without `transformer.`, after `file_prefix`
/// (e.g. ClipCap's `gpt.`).
pub fn gpt2_var_name(name: &str, file_prefix: &str, var_prefix: &str) -> Option<String> {
    let rest = name.strip_prefix(file_prefix)?;
    let rest = rest.strip_prefix("transformer.").unwrap_or(rest);
    if rest.ends_with(".attn.bias") || rest.ends_with(".attn.masked_bias") {
        return None;
    }
    if rest == "lm_head.weight" {
        return Some(format!("{var_prefix}lm_head.weight"));
    }
    Some(format!("{var_prefix}transformer.{rest}"))
}

/// Copies `tensors` (already keyed by variable name) into the variables of `vs` whose names
/// start with `var_prefix`. Every such variable must be given, with its exact shape; a tensor
/// for a variable we do not have is an error too (a wrong architecture must not load quietly).
pub fn copy_into(
    vs: &VarStore,
    var_prefix: &str,
    tensors: &BTreeMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    let vars = vs.variables();
    let mut missing = vec![];
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars.iter().filter(|(n, _)| n.starts_with(var_prefix)) {
            let Some(src) = tensors.get(name) else {
                missing.push(name.clone());
                continue;
            };
            if src.size() != var.size() {
                bail!(
                    "{}: tensor {name} has shape {:?}, the model expects {:?}",
                    file.display(),
                    src.size(),
                    var.size()
                );
            }
            let mut var = var.shallow_clone();
            var.f_copy_(src)
                .with_context(|| format!("{}: copying tensor {name}", file.display()))?;
        }
        Ok(())
    })?;
    if !missing.is_empty() {
        missing.sort();
        bail!(
            "{}: {} tensor(s) missing, e.g. {}",
            file.display(),
            missing.len(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let unknown: Vec<_> = tensors
        .keys()
        .filter(|n| n.starts_with(var_prefix) && !vars.contains_key(*n))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        bail!(
            "{}: unexpected tensor(s) {} (wrong architecture or config?)",
            file.display(),
            unknown
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Loads GPT-2 weights from `file` into the variables under `var_prefix`, renaming as
/// [`gpt2_var_name`] does. An `lm_head.weight` must equal `wte` (the head is tied).
pub fn load_gpt2_safetensors(
    vs: &mut VarStore,
    file: &Path,
    file_prefix: &str,
    var_prefix: &str,
) -> Result<()> {
    let mut named = BTreeMap::new();
    for (name, t) in read_safetensors(file)? {
        if let Some(v) = gpt2_var_name(&name, file_prefix, var_prefix) {
            named.insert(v, t);
        }
    }
    untie_check(&mut named, var_prefix, file)?;
    copy_into(vs, var_prefix, &named, file)
}

/// Removes `lm_head.weight` after checking it is the tied copy of `wte`.
pub fn untie_check(
    named: &mut BTreeMap<String, Tensor>,
    var_prefix: &str,
    file: &Path,
) -> Result<()> {
    if let Some(head) = named.remove(&format!("{var_prefix}lm_head.weight")) {
        let wte = named
            .get(&format!("{var_prefix}transformer.wte.weight"))
            .with_context(|| format!("{}: lm_head.weight without wte.weight", file.display()))?;
        if head.size() != wte.size() || !head.equal(wte) {
            bail!(
                "{}: lm_head.weight differs from wte.weight; untied heads are not supported",
                file.display()
            );
        }
    }
    Ok(())
}
