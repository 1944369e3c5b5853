//! The device check's dry run: `scripts/gpu-check.sh` end to end on the CPU
//! (`GPU_CHECK_DEVICE=cpu`: a tiny bundle, bf16 as the half type, small sizes), so that the
//! script a lent GPU runs once is known to work and to return its summary.
mod common;

#[test]
fn the_device_check_runs_end_to_end_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g");
    std::fs::create_dir_all(g.join("images")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_clipcap"), g.join("clipcap")).unwrap();
    for i in 0..4u8 {
        std::fs::write(
            g.join("images").join(format!("{i}.png")),
            common::png(64 + 8 * i as u32, 48, i),
        )
        .unwrap();
    }
    let out = dir.path().join("out");
    let run = std::process::Command::new("bash")
        .arg(common::repo().join("scripts/gpu-check.sh"))
        .arg(&g)
        .arg(&out)
        .env("GPU_CHECK_DEVICE", "cpu")
        .env("GPU_CHECK_WORK", dir.path().join("work"))
        .env("CLIPCAP_PYTHON", common::python())
        .current_dir(common::repo())
        .output()
        .unwrap();
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap_or_default();
    assert!(
        run.status.success(),
        "gpu-check failed:\n{summary}\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    for part in [
        "| cpu f32 | 12/12 |",
        "| cpu f32, batch 1 vs 12 | 12/12 |",
        "| cpu sampling, seed 3 twice | same |",
        "| openai-clip-cpu-bf16 | ok |",
        "| burst (concurrency 16) |",
        "| batch | bf16 beam 1 | bf16 beam 5 |",
        "- amp fp16: epoch losses",
        "gpu-check status 0",
    ] {
        assert!(summary.contains(part), "{part:?} missing from:\n{summary}");
    }
    // Only the summary and short files come back: work files stay outside OUTDIR.
    for entry in std::fs::read_dir(&out).unwrap() {
        let len = entry.unwrap().metadata().unwrap().len();
        assert!(len < 64 * 1024, "a large file in OUTDIR ({len} bytes)");
    }
}
