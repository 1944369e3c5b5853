//! Why the engine could not caption. Each door maps these to its own protocol, in one place
//! (HTTP: `serve/error.rs`); nothing here knows about status codes.
use crate::options::OptionError;
use crate::preprocess::ImageError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// More requests are waiting than `queue_capacity` allows.
    #[error("the inference queue is full; retry shortly")]
    QueueFull,
    /// The worker thread has stopped (shutdown, or it died).
    #[error("the inference worker has stopped")]
    Stopped,
    /// The engine was told to give up on its work (shutdown after the grace period).
    #[error("the server shut down before the captions were ready; retry elsewhere")]
    Aborted,
    /// Nothing is loaded yet (start-up) or every model was unloaded.
    #[error("no model is loaded yet")]
    NoModel,
    #[error("unknown model {name:?}; served: {}", served.join(", "))]
    UnknownModel { name: String, served: Vec<String> },
    /// The model was swapped or unloaded between validation and its turn.
    #[error("{0}")]
    ModelChanged(String),
    #[error("{0}")]
    Deadline(String),
    /// The caller went away; nobody reads this one.
    #[error("the request was cancelled")]
    Cancelled,
    /// A request without a single image.
    #[error("no image to caption")]
    NoImages,
    /// A failure inside the model code (its detail is logged, never shown to clients).
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("image {index}: {error}")]
    Image { index: usize, error: ImageError },
    /// A caller-provided embedding of the wrong width (e.g. a dataset prepared with another
    /// encoder).
    #[error("embedding {index} has {got} values; the model takes {want}")]
    Embedding {
        index: usize,
        got: usize,
        want: usize,
    },
    #[error("{0}")]
    InvalidOption(OptionError),
    /// The device ran out of memory for this request (the others went on); retry.
    #[error("the device ran out of memory for this request; retry, or ask for fewer images, beams or tokens ({0})")]
    OutOfMemory(String),
    /// A request whose KV cache alone exceeds the budget (`kv_cache_bytes`).
    #[error("this request needs {need} bytes of KV cache (images x rows per image x (prefix + prompt + max_tokens) positions); the server allows {budget}: ask for fewer images, beams or tokens")]
    KvBudget { need: u64, budget: u64 },
    #[error("cannot load bundle {}: {reason}", dir.display())]
    Load { dir: PathBuf, reason: String },
    #[error("no model named {0:?}")]
    NotLoaded(String),
}
