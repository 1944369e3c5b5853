"""Validates deploy/kubernetes: every built-in object against Kubernetes' own schemas (strict:
unknown fields fail) for each version given, and the references between objects and to
clipcap itself (flags, settings, metrics, exit codes) that no schema can check.

    python tests/deploy/validate_manifests.py DIR CLIPCAP_BIN [--k8s 1.33 --k8s 1.37]

Prints one line per document and exits non-zero with every problem found.
"""
import argparse
import pathlib
import re
import subprocess
import sys
import tomllib

import kubernetes_validate
import yaml

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("clipcap")
ap.add_argument("--k8s", action="append", default=None)
ap.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parents[2]))
a = ap.parse_args()
versions = a.k8s or ["1.33", "1.37"]
repo = pathlib.Path(a.repo)
problems = []
docs = []
for path in sorted(pathlib.Path(a.dir).glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            docs.append((path.name, doc))
if not docs:
    sys.exit(f"no manifests in {a.dir}")


def where(name, doc):
    return f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# 1. Schemas.
for name, doc in docs:
    if doc.get("apiVersion", "").startswith("keda.sh/"):
        continue  # a CRD: checked by hand below
    before = len(problems)
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where(name, doc)}: no schema for it in Kubernetes {v} ({e})")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{where(name, doc)}: Kubernetes {v}: {path}: {e.message}")
    if len(problems) == before:
        print(f"{where(name, doc)} valid against Kubernetes {', '.join(versions)}")

by_kind = {}
for name, doc in docs:
    by_kind.setdefault(doc["kind"], []).append((name, doc))


def pod_specs():
    for name, doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield name, doc, doc["spec"]["template"]


# 2. References between objects.
deployments = {d["metadata"]["name"]: (n, d) for n, d in by_kind.get("Deployment", [])}
secrets = {d["metadata"]["name"]: d for _, d in by_kind.get("Secret", [])}
claims = {d["metadata"]["name"] for _, d in by_kind.get("PersistentVolumeClaim", [])}
for name, svc in by_kind.get("Service", []):
    sel = svc["spec"]["selector"]
    matched = [
        d for _, d in deployments.values()
        if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
    ]
    if len(matched) != 1:
        problems.append(f"{where(name, svc)}: its selector matches {len(matched)} Deployments")
        continue
    ports = {p.get("name") for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    for p in svc["spec"]["ports"]:
        if isinstance(p["targetPort"], str) and p["targetPort"] not in ports:
            problems.append(f"{where(name, svc)}: targetPort {p['targetPort']} is no container port")
for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
    for name, obj in by_kind.get(kind, []):
        target = obj["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            problems.append(f"{where(name, obj)}: scales {target}, which is no Deployment here")
metrics_src = "\n".join(p.read_text() for p in (repo / "src").rglob("*.rs"))
for name, hpa in by_kind.get("HorizontalPodAutoscaler", []):
    for m in hpa["spec"]["metrics"]:
        metric = m["pods"]["metric"]["name"]
        if f'"{metric}"' not in metrics_src:
            problems.append(f"{where(name, hpa)}: clipcap exports no metric {metric}")
for name, so in by_kind.get("ScaledObject", []):
    spec = so["spec"]
    if so.get("apiVersion") != "keda.sh/v1alpha1" or not spec.get("triggers"):
        problems.append(f"{where(name, so)}: not a keda.sh/v1alpha1 ScaledObject with triggers")
    for t in spec.get("triggers", []):
        md = t.get("metadata", {})
        if t.get("type") != "prometheus" or not {"serverAddress", "query", "threshold"} <= md.keys():
            problems.append(f"{where(name, so)}: a prometheus trigger needs serverAddress, query, threshold")
        for metric in re.findall(r"clipcap_\w+", md.get("query", "")):
            if f'"{metric}"' not in metrics_src:
                problems.append(f"{where(name, so)}: clipcap exports no metric {metric}")

# 3. Pods: non-root, probes, GPUs, volumes, secrets, and clipcap's own flags and settings.
settings = set()
for section in tomllib.loads((repo / "config/default.toml").read_text()).values():
    settings |= set(section)
other_env = set(re.findall(r'"(CLIPCAP_[A-Z_]+)"', (repo / "src/config.rs").read_text()))
helps = {}


def flags_of(sub):
    if sub not in helps:
        out = subprocess.run([a.clipcap, sub, "--help"], capture_output=True, text=True, check=True).stdout
        helps[sub] = set(re.findall(r"--[a-z][a-z0-9-]*", out))
    return helps[sub]


for name, doc, tpl in pod_specs():
    spec = tpl["spec"]
    w = where(name, doc)
    if not spec.get("securityContext", {}).get("runAsNonRoot"):
        problems.append(f"{w}: the pod does not require a non-root user")
    for vol in spec.get("volumes", []):
        claim = vol.get("persistentVolumeClaim", {}).get("claimName")
        if claim and claim not in claims:
            problems.append(f"{w}: volume {vol['name']} claims {claim}, which is no PVC here")
    for c in spec["containers"]:
        if "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}):
            problems.append(f"{w}: container {c['name']} requests no GPU")
        if doc["kind"] == "Deployment":
            if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
                problems.append(f"{w}: readiness must probe /ready")
            if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
                problems.append(f"{w}: liveness must probe /health")
        words = list(c.get("command", [])) + list(c.get("args", []))
        sub = "batch" if "batch" in c.get("command", []) else "serve"  # the image's entrypoint serves
        for word in words:
            if word.startswith("--") and word.split("=")[0] not in flags_of(sub):
                problems.append(f"{w}: `clipcap {sub}` has no flag {word}")
        for e in c.get("env", []):
            n = e["name"]
            if n.startswith("CLIPCAP_") and n[8:].lower() not in settings and n not in other_env:
                problems.append(f"{w}: {n} names no clipcap setting")
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] not in secrets.get(ref["name"], {}).get("stringData", {}):
                problems.append(f"{w}: {n} reads {ref['name']}/{ref['key']}, which no Secret here has")
        if doc["kind"] == "Job":
            js = doc["spec"]
            if js.get("completionMode") != "Indexed":
                problems.append(f"{w}: shards need completionMode Indexed (JOB_COMPLETION_INDEX)")
            if "--num-shards" not in words or words[words.index("--num-shards") + 1] != str(js["completions"]):
                problems.append(f"{w}: --num-shards must equal completions ({js['completions']})")
            codes = {r["action"]: r["onExitCodes"]["values"] for r in js.get("podFailurePolicy", {}).get("rules", [])}
            if codes.get("FailJob") != [2] or codes.get("Count") != [75]:
                problems.append(f"{w}: exit 2 (fatal) must fail the Job and 75 (retryable) be retried: {codes}")

if problems:
    print("\n".join(["PROBLEMS:"] + problems))
    sys.exit(1)
print(f"{len(docs)} documents valid; references, flags, settings and metrics check out")
