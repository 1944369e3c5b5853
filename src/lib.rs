//! clipcap: ClipCap image captioning (CLIP prefix + GPT-2) served and trained with libtorch.
//!
//! `model/` holds the networks and bundles, `generate` the decoding strategies, `serve/` the
//! HTTP server, `train/` feature extraction and training, `eval/` the COCO caption metrics.
pub mod cli;
pub mod config;
pub mod device;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod serve;
pub mod synth;
pub mod train;
