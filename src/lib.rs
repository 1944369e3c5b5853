//! clipcap: ClipCap image captioning (CLIP prefix + GPT-2) served and trained with libtorch.
//!
//! The house, top to bottom (a module uses only modules on its own line or below):
//!
//! ```text
//! cli                       the `clipcap` command line: parses flags, calls the layers below
//! batch                     offline captioning of datasets through the OpenAI door's formats
//! serve  train  eval        the HTTP server · feature extraction, training, jobs · COCO metrics
//! engine                    the one façade every door calls: models, scheduler, worker thread
//! generate  model           decoding strategies over a KV cache · CLIP, mapper, GPT-2, bundles
//! preprocess  options       image bytes → pixels exactly as PIL · decoding options, one type
//! config device cuda fsutil settings · device/dtype names · CUDA memory, streams · atomic writes
//! parallel synth            order-keeping thread pool · the synthetic captioning set
//! ```
//!
//! - `engine` ([`engine::Engine`]) owns the inference worker; `serve`'s handlers, `cli`'s
//!   `caption`, `eval` and `bench-decode`, and `train`'s jobs (through a narrow installer)
//!   call it. None of those touches tch for inference.
//! - Errors stay typed per layer and are mapped once at the door (`serve/error.rs`).
//! - `tests/layering.rs` checks the rule: no module imports a module above it.
// A bundle lives on the one thread that runs it (tch tensors are Send, not Sync); `Arc` only
// shares it cheaply between that thread's decoders, never across threads.
#![allow(clippy::arc_with_non_send_sync)]

pub mod batch;
pub mod cli;
pub mod config;
pub mod cuda;
pub mod device;
pub mod engine;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod model;
pub mod options;
pub mod parallel;
pub mod preprocess;
pub mod serve;
pub mod synth;
pub mod train;
