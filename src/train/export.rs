//! The bundle a finished training writes: its manifest (with the run's provenance), the trained
//! weights and the base bundle's encoder and tokenizer, put in place by one folder rename.
use crate::model::bundle::{self, BundleFiles, CaptionNet, ImageSpec, Manifest};
use crate::model::gpt2::Gpt2Config;
use crate::model::mapper::MapperConfig;
use crate::train::spec::TrainSpec;
use crate::train::trainer::LossPoint;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The trained bundle's manifest: the base bundle's image, generation and (without `eos`) stop
/// settings, the trained shapes, and where the weights came from.
pub(super) fn manifest(
    spec: &TrainSpec,
    base: &Path,
    base_manifest: &Manifest,
    mapper_cfg: MapperConfig,
    gpt2_cfg: Gpt2Config,
    history: &[LossPoint],
    val_history: &[LossPoint],
) -> Result<Manifest> {
    let name = spec
        .name
        .clone()
        .or_else(|| {
            spec.out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "trained".into());
    let mut provenance = BTreeMap::new();
    provenance.insert(
        "trained_by".into(),
        serde_json::json!(format!("clipcap {}", env!("CARGO_PKG_VERSION"))),
    );
    provenance.insert("dataset".into(), serde_json::json!(spec.data));
    provenance.insert("base".into(), serde_json::json!(base));
    provenance.insert("spec".into(), serde_json::to_value(spec)?);
    provenance.insert(
        "final_loss".into(),
        serde_json::json!(history.last().map(|p| p.loss)),
    );
    provenance.insert(
        "val_loss".into(),
        serde_json::json!(val_history.last().map(|p| p.loss)),
    );
    Ok(Manifest {
        format: bundle::FORMAT.into(),
        version: bundle::FORMAT_VERSION,
        name,
        mapper: mapper_cfg,
        gpt2: gpt2_cfg,
        image: ImageSpec {
            ..base_manifest.image.clone()
        },
        // The base's int8 encoder comes along (the encoder is not trained).
        files: BundleFiles {
            encoder_int8: base_manifest
                .files
                .encoder_int8
                .as_ref()
                .map(|_| "clip_image.int8.pt".into()),
            ..BundleFiles::default()
        },
        stop_tokens: if spec.params.eos {
            vec!["<|endoftext|>".into()]
        } else {
            base_manifest.stop_tokens.clone()
        },
        generation: base_manifest.generation.clone(),
        provenance,
    })
}

/// Writes the bundle into a temporary folder beside `out`, then renames it into place.
pub(super) fn write_bundle(
    out: &Path,
    manifest: &Manifest,
    net: &CaptionNet,
    base: &Path,
    base_manifest: &Manifest,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    // Built in a temporary folder beside `out` (removed if anything fails, so a full disk
    // stays no fuller), then renamed into place; an old bundle is moved aside first and put
    // back if the swap fails.
    let tmp = crate::fsutil::temp_path(out);
    let built = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        let files = &manifest.files;
        std::fs::copy(
            base.join(&base_manifest.files.encoder),
            tmp.join(&files.encoder),
        )
        .context("copying the encoder")?;
        std::fs::copy(
            base.join(&base_manifest.files.tokenizer),
            tmp.join(&files.tokenizer),
        )
        .context("copying the tokenizer")?;
        if let (Some(from), Some(to)) = (&base_manifest.files.encoder_int8, &files.encoder_int8) {
            std::fs::copy(base.join(from), tmp.join(to)).context("copying the int8 encoder")?;
        }
        for f in [&files.encoder, &files.tokenizer]
            .into_iter()
            .chain(files.encoder_int8.as_ref())
        {
            std::fs::File::open(tmp.join(f))?.sync_all()?;
        }
        net.save_weights(&tmp.join(&files.weights))?;
        manifest.write(&tmp)
    })();
    let swapped = built.and_then(|()| crate::fsutil::replace_dir(&tmp, out));
    if swapped.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    swapped
}
