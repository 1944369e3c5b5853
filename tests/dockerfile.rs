//! The Dockerfile cannot be built here (no Docker engine); it is linted with hadolint (from
//! PyPI, in the project venv) and checked against what the README and config promise.
mod common;

#[test]
fn dockerfile_lints_clean_and_matches_the_project() {
    let hadolint = common::python().with_file_name("hadolint");
    let out = std::process::Command::new(&hadolint)
        .args(["--config", ".hadolint.yaml", "Dockerfile"])
        .current_dir(common::repo())
        .output()
        .expect("hadolint (scripts/venv.sh installs it)");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(common::repo().join("Dockerfile")).unwrap();
    for must in [
        "torch==${TORCH_VERSION}",
        "ARG TORCH_VERSION=2.11.0",
        "HEALTHCHECK",
        "/ready",
        "USER 10001",
        "LIBTORCH_USE_PYTORCH=1",
        "clipcap\", \"serve",
        // Growing KV caches fragment CUDA's caching allocator less with expandable segments.
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
    ] {
        assert!(text.contains(must), "Dockerfile lacks {must:?}");
    }
    let venv = std::fs::read_to_string(common::repo().join("scripts/venv.sh")).unwrap();
    assert!(
        venv.contains("TORCH_PIN=\"2.11.0\""),
        "one torch pin for the venv and the image"
    );
}
