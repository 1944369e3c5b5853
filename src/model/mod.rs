//! The networks: CLIP's image tower (TorchScript), the prefix mappers, GPT-2, and the bundle
//! that ties them together.
pub mod attention;
pub mod bundle;
pub mod clip;
pub mod clip_compare;
pub mod gpt2;
pub mod int8;
pub mod kv_cache;
pub mod mapper;
pub mod packed;
pub mod row_sample;
pub mod row_topk;
pub mod weights;
