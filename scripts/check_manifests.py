"""Check the deployment manifests against the service and the image they deploy.

    python scripts/check_manifests.py [REPOSITORY_ROOT]

Every YAML file under deploy/ must parse; startup and readiness probes must
ask the app's readiness route and liveness probes its liveness route (looked up
in the real app's url_map, not in a list kept here); every port must be the
port the image serves on (the Dockerfile's PORT and EXPOSE, which must be the
service's default PORT that gunicorn.conf.py binds to); the Kubernetes
Service, HorizontalPodAutoscaler and PodDisruptionBudget must select the
Deployment's pods; the API key must come from a secret; and the Deployment's
pod must keep the hardening that `podman kube play` (scripts/kube_play_check.py)
cannot show: a non-root user, the runtime's seccomp profile, no service account
token, /tmp in memory with a size limit, and a grace period longer than
gunicorn's. Prints each problem and exits 1 when there is any.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from main import create_app  # noqa: E402
from service import EmbeddingService  # noqa: E402

# Cloud Run has no readiness probe (its startup probe gates traffic); Kubernetes needs all three.
REQUIRED_PROBES = {
    "cloudrun": {"startupProbe", "livenessProbe"},
    "kubernetes": {"startupProbe", "readinessProbe", "livenessProbe"},
}
# Which view each kind of probe must reach.
PROBE_ENDPOINTS = {
    "startupProbe": "health.readiness",
    "readinessProbe": "health.readiness",
    "livenessProbe": "health.liveness",
}
API_KEY_VARIABLE = "VECTOR_EMBEDDER_API_KEY"
SECCOMP_PROFILES = {"RuntimeDefault", "Localhost"}


def load_manifests(deploy_dir: Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Every YAML document under deploy_dir, with the file it came from."""
    documents, problems = [], []
    for path in sorted(deploy_dir.rglob("*.yaml")):
        try:
            loaded = [document for document in yaml.safe_load_all(path.read_text()) if document]
        except yaml.YAMLError as error:
            problems.append(f"{path}: does not parse: {error}")
            continue
        documents.extend((path, document) for document in loaded)
    if not documents:
        problems.append(f"{deploy_dir}: no manifests found")
    return documents, problems


def image_port(dockerfile: Path) -> tuple[int | None, list[str]]:
    """The port the image serves on, after checking the Dockerfile agrees with itself and with the service."""
    text = dockerfile.read_text()
    exposed = {int(port) for port in re.findall(r"^EXPOSE\s+(\d+)", text, re.MULTILINE)}
    env_ports = {int(port) for port in re.findall(r"\bPORT=(\d+)", text)}
    default_port = Settings().port
    problems = []
    if exposed != {default_port}:
        problems.append(f"{dockerfile}: EXPOSE {sorted(exposed)} is not the service's default PORT {default_port}")
    if env_ports != {default_port}:
        problems.append(f"{dockerfile}: PORT={sorted(env_ports)} is not the service's default PORT {default_port}")
    return default_port, problems


def pod_containers(document: dict) -> Iterator[dict]:
    """The containers of a Deployment's pod template or a Cloud Run service's revision template."""
    spec = document.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("containers", [])


def check_container(where: str, container: dict, port: int, url_map_adapter, required_probes: set[str]) -> list[str]:
    problems = []
    declared = container.get("ports", [])
    port_names = {entry.get("name"): entry.get("containerPort") for entry in declared}
    if [entry.get("containerPort") for entry in declared] != [port]:
        problems.append(f"{where}: containerPort {[entry.get('containerPort') for entry in declared]} "
                        f"is not the image's port {port}")
    for kind, endpoint in PROBE_ENDPOINTS.items():
        probe = container.get(kind)
        if probe is None:
            if kind in required_probes:
                problems.append(f"{where}: no {kind}")
            continue
        http_get = probe.get("httpGet", {})
        probe_port = port_names.get(http_get.get("port"), http_get.get("port"))
        if probe_port != port:
            problems.append(f"{where}: {kind} port {http_get.get('port')!r} is not the image's port {port}")
        problems.extend(_check_probe_path(where, kind, http_get.get("path"), endpoint, url_map_adapter))
    env = {entry.get("name"): entry for entry in container.get("env", [])}
    if "secretKeyRef" not in env.get(API_KEY_VARIABLE, {}).get("valueFrom", {}):
        problems.append(f"{where}: {API_KEY_VARIABLE} must come from a secret (valueFrom.secretKeyRef)")
    if not container.get("resources", {}).get("limits"):
        problems.append(f"{where}: no resource limits")
    return problems


def _check_probe_path(where: str, kind: str, path: Any, endpoint: str, url_map_adapter) -> list[str]:
    from werkzeug.exceptions import HTTPException

    try:
        found, _ = url_map_adapter.match(path, method="GET")
    except HTTPException:
        return [f"{where}: {kind} path {path!r} is not a GET route of the app"]
    if found != endpoint:
        return [f"{where}: {kind} path {path!r} reaches {found}, expected {endpoint}"]
    return []


def check_pod_hardening(deployment: dict, gunicorn_conf: Path) -> list[str]:
    """What the README promises of the pod and podman 4.3 does not honour, so the kube play check cannot see."""
    pod = deployment["spec"]["template"]["spec"]
    problems = []
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("Deployment: automountServiceAccountToken must be false (the service calls no API server)")
    graceful = re.search(r"^graceful_timeout = (\d+)", gunicorn_conf.read_text(), re.MULTILINE)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if graceful and grace <= int(graceful.group(1)):
        problems.append(f"Deployment: terminationGracePeriodSeconds {grace} does not outlast gunicorn's "
                        f"graceful_timeout {graceful.group(1)}: requests in flight would be killed")
    memory_volumes = {volume["name"]: volume["emptyDir"] for volume in pod.get("volumes", [])
                      if (volume.get("emptyDir") or {}).get("medium") == "Memory"}
    for container in pod_containers(deployment):
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        where = f"Deployment container {container.get('name')!r}"
        if context.get("runAsNonRoot") is not True or not context.get("runAsUser"):
            problems.append(f"{where}: must set runAsNonRoot: true and a non-zero runAsUser")
        if context.get("seccompProfile", {}).get("type") not in SECCOMP_PROFILES:
            problems.append(f"{where}: seccompProfile.type must be one of {sorted(SECCOMP_PROFILES)}")
        tmp = [mount["name"] for mount in container.get("volumeMounts", []) if mount.get("mountPath") == "/tmp"]
        if context.get("readOnlyRootFilesystem") and not (tmp and memory_volumes.get(tmp[0], {}).get("sizeLimit")):
            problems.append(f"{where}: a read-only root needs /tmp from an emptyDir with medium: Memory and a "
                            f"sizeLimit")
    return problems


def check_kubernetes_wiring(documents: list[tuple[Path, dict]]) -> list[str]:
    """The Service, HPA and PDB point at the Deployment and its pods."""
    by_kind = {document.get("kind"): (path, document) for path, document in documents}
    problems = []
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        if kind not in by_kind:
            problems.append(f"deploy/kubernetes: no {kind}")
    if "Deployment" not in by_kind:
        return problems
    deployment = by_kind["Deployment"][1]
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    pod_ports = {entry.get("name") for container in pod_containers(deployment) for entry in container.get("ports", [])}

    def selects_pods(selector: dict) -> bool:
        return bool(selector) and all(pod_labels.get(key) == value for key, value in selector.items())

    if not selects_pods(deployment["spec"]["selector"].get("matchLabels", {})):
        problems.append("Deployment: selector does not match its own pod labels")
    if "Service" in by_kind:
        service = by_kind["Service"][1]["spec"]
        if not selects_pods(service.get("selector", {})):
            problems.append("Service: selector does not match the Deployment's pods")
        for entry in service.get("ports", []):
            if isinstance(entry.get("targetPort"), str) and entry["targetPort"] not in pod_ports:
                problems.append(f"Service: targetPort {entry['targetPort']!r} is not a port name of the pods")
    if "PodDisruptionBudget" in by_kind:
        pdb = by_kind["PodDisruptionBudget"][1]["spec"]
        if not selects_pods(pdb.get("selector", {}).get("matchLabels", {})):
            problems.append("PodDisruptionBudget: selector does not match the Deployment's pods")
    if "HorizontalPodAutoscaler" in by_kind:
        target = by_kind["HorizontalPodAutoscaler"][1]["spec"]["scaleTargetRef"]
        if (target.get("kind"), target.get("name")) != ("Deployment", deployment["metadata"]["name"]):
            problems.append(f"HorizontalPodAutoscaler: scales {target.get('kind')} {target.get('name')!r}, "
                            f"not the Deployment {deployment['metadata']['name']!r}")
    return problems


class RoutesOnly(EmbeddingService):
    """A service that never loads a model: only the app's routes are needed."""

    def start_loading(self) -> None:
        pass


def check(root: Path) -> list[str]:
    """Every problem found in root's deploy/ manifests and Dockerfile; empty when all is well."""
    port, problems = image_port(root / "Dockerfile")
    adapter = create_app(Settings(api_keys=("manifest-check",)), RoutesOnly).url_map.bind("localhost")
    for folder, expected_kinds in (("cloudrun", {"Service"}), ("kubernetes", None)):
        documents, load_problems = load_manifests(root / "deploy" / folder)
        problems.extend(load_problems)
        for path, document in documents:
            where = f"{path.relative_to(root)} {document.get('kind')}"
            if expected_kinds is not None and document.get("kind") not in expected_kinds:
                problems.append(f"{where}: unexpected kind")
            for container in pod_containers(document):
                problems.extend(check_container(where, container, port, adapter, REQUIRED_PROBES[folder]))
        if folder == "kubernetes":
            problems.extend(check_kubernetes_wiring(documents))
            problems.extend(problem for _, document in documents if document.get("kind") == "Deployment"
                            for problem in check_pod_hardening(document, ROOT / "gunicorn.conf.py"))
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]).resolve() if len(argv) > 1 else ROOT
    problems = check(root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"Manifests in {root / 'deploy'} agree with the app's routes and the image's port")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
