pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
#[derive(Clone, Debug)] pub struct PreprocessConfig { pub size: u32, pub mean: [f32;3], pub std: [f32;3], pub max_pixels: u64 }
#[derive(Debug, thiserror::Error)] pub enum ImageError { #[error("x")] Empty }
pub fn preprocess_bytes(_b: &[u8], _c: &PreprocessConfig) -> Result<Vec<f32>, ImageError> { Err(ImageError::Empty) }
