//! clipcap: ClipCap image captioning (CLIP prefix + GPT-2) served and trained with libtorch.
//!
//! `model/` holds the networks and bundles, `generate` the decoding strategies, `serve/` the
//! HTTP server, `train/` feature extraction and training, `eval/` the COCO caption metrics.
// A bundle lives on the one thread that runs it (tch tensors are Send, not Sync); `Arc` only
// shares it cheaply between that thread's decoders, never across threads.
#![allow(clippy::arc_with_non_send_sync)]

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
