//! deploy/kubernetes is valid: every built-in object against Kubernetes' schemas (strict, two
//! versions, with the `kubernetes-validate` package the venv installs), and the references no
//! schema checks (selectors, secrets, claims, probes, clipcap's flags, settings, metrics and
//! exit codes). The checker is shown to fail on manifests broken on purpose.
use crate::common;

use std::path::Path;

fn validate(dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(common::python())
        .arg(common::repo().join("tests/deploy/validate_manifests.py"))
        .arg(dir)
        .arg(env!("CARGO_BIN_EXE_clipcap"))
        .args(["--k8s", "1.33", "--k8s", "1.37"])
        .output()
        .expect("the project python (scripts/venv.sh installs kubernetes-validate)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_kubernetes_manifests_are_valid_and_consistent() {
    let dir = common::repo().join("deploy/kubernetes");
    let (ok, text) = validate(&dir);
    assert!(ok, "{text}");
    for object in [
        "Deployment/clipcap-serve valid",
        "Deployment/clipcap-trainer valid",
        "Service/clipcap valid",
        "HorizontalPodAutoscaler/clipcap-serve valid",
        "Job/clipcap-batch valid",
        "Secret/clipcap-admin valid",
        "PersistentVolumeClaim/clipcap-models valid",
        "references, flags, settings and metrics check out",
    ] {
        assert!(text.contains(object), "{object:?} missing:\n{text}");
    }
}

#[test]
fn broken_manifests_are_caught() {
    let src = common::repo().join("deploy/kubernetes");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let edit = |file: &str, from: &str, to: &str| {
        let p = tmp.path().join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{from:?} not in {file}");
        std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    };
    edit("serve.yaml", "readinessProbe:", "readinesProbe:");
    edit("serve.yaml", "\"--poll-interval\"", "\"--poll-intervall\"");
    edit("batch-job.yaml", "- \"8\"", "- \"7\"");
    edit("trainer.yaml", "key: admin-token", "key: admin-tokn");
    edit(
        "autoscale.yaml",
        "name: clipcap_requests_waiting",
        "name: clipcap_requests_queued",
    );
    edit(
        "keda-scaledobject.yaml",
        "name: clipcap-serve\n  minReplicaCount",
        "name: clipcap-server\n  minReplicaCount",
    );
    let (ok, text) = validate(tmp.path());
    assert!(!ok, "the broken manifests passed:\n{text}");
    for problem in [
        "'readinesProbe' was unexpected",
        "has no flag --poll-intervall",
        "--num-shards must equal completions (8)",
        "reads clipcap-admin/admin-tokn",
        "exports no metric clipcap_requests_queued",
        "scales clipcap-server, which is no Deployment",
    ] {
        assert!(text.contains(problem), "{problem:?} not reported:\n{text}");
    }
}
