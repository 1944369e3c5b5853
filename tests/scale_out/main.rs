//! Beyond one machine, in one test binary (one link instead of four): `clipcap batch`
//! (`batch`), the model repository a fleet shares (`model_repository`), the Kubernetes
//! manifests (`deploy`) and Ray Data over `clipcap batch` (`ray`).
#[path = "../common/mod.rs"]
mod common;

mod batch;
mod deploy;
mod model_repository;
mod ray;
