"""scripts/check_manifests.py on the real manifests, and on copies broken one way at a time."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent
SCRIPT = ROOT / "scripts" / "check_manifests.py"

_spec = importlib.util.spec_from_file_location("check_manifests", SCRIPT)
check_manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_manifests)


@pytest.fixture
def copy_root(tmp_path) -> Path:
    """A copy of the Dockerfile and deploy/ to break."""
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    return tmp_path


def edit_yaml(path: Path, change) -> None:
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document))


def deployment_container(document: dict) -> dict:
    return document["spec"]["template"]["spec"]["containers"][0]


def test_the_real_manifests_agree_with_the_app_and_the_image():
    assert check_manifests.check(ROOT) == []


def test_probes_and_ports_in_the_real_manifests_are_the_ones_checked():
    # Guards the checker itself: it must see the probes it claims to check.
    documents, _ = check_manifests.load_manifests(ROOT / "deploy" / "kubernetes")
    kinds = {document["kind"] for _, document in documents}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Kustomization"}
    deployment = next(document for _, document in documents if document["kind"] == "Deployment")
    container = deployment_container(deployment)
    assert container["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_a_probe_on_a_missing_route_is_reported(copy_root):
    edit_yaml(copy_root / "deploy/kubernetes/deployment.yaml",
              lambda doc: deployment_container(doc)["livenessProbe"]["httpGet"].update(path="/healthz"))
    assert check_manifests.check(copy_root) == [
        "deploy/kubernetes/deployment.yaml Deployment: livenessProbe path '/healthz' is not a GET route of the app"]


def test_a_startup_probe_on_the_liveness_route_is_reported(copy_root):
    edit_yaml(copy_root / "deploy/cloudrun/service.yaml",
              lambda doc: deployment_container(doc)["startupProbe"]["httpGet"].update(path="/health"))
    assert check_manifests.check(copy_root) == [
        "deploy/cloudrun/service.yaml Service: startupProbe path '/health' reaches health.liveness, "
        "expected health.readiness"]


def test_a_port_the_image_does_not_serve_is_reported(copy_root):
    def change(doc):
        container = deployment_container(doc)
        container["ports"][0]["containerPort"] = 8080
        container["livenessProbe"]["httpGet"]["port"] = 8080
    edit_yaml(copy_root / "deploy/cloudrun/service.yaml", change)
    problems = check_manifests.check(copy_root)
    assert "deploy/cloudrun/service.yaml Service: containerPort [8080] is not the image's port 5001" in problems
    assert "deploy/cloudrun/service.yaml Service: livenessProbe port 8080 is not the image's port 5001" in problems


def test_a_dockerfile_serving_another_port_is_reported(copy_root):
    dockerfile = copy_root / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("EXPOSE 5001", "EXPOSE 8080"))
    assert check_manifests.check(copy_root) == [
        f"{dockerfile}: EXPOSE [8080] is not the service's default PORT 5001"]


def test_an_api_key_written_into_the_manifest_is_reported(copy_root):
    def change(doc):
        env = deployment_container(doc)["env"]
        env[:] = [entry for entry in env if entry["name"] != "VECTOR_EMBEDDER_API_KEY"]
        env.append({"name": "VECTOR_EMBEDDER_API_KEY", "value": "abc123"})
    edit_yaml(copy_root / "deploy/kubernetes/deployment.yaml", change)
    assert check_manifests.check(copy_root) == [
        "deploy/kubernetes/deployment.yaml Deployment: VECTOR_EMBEDDER_API_KEY must come from a secret "
        "(valueFrom.secretKeyRef)"]


def test_a_service_that_selects_no_pod_is_reported(copy_root):
    edit_yaml(copy_root / "deploy/kubernetes/service.yaml",
              lambda doc: doc["spec"].update(selector={"app.kubernetes.io/name": "something-else"}))
    assert check_manifests.check(copy_root) == ["Service: selector does not match the Deployment's pods"]


def test_an_unparsable_manifest_fails_the_script(copy_root):
    (copy_root / "deploy/kubernetes/pdb.yaml").write_text("spec: [unclosed\n")
    finished = subprocess.run([sys.executable, str(SCRIPT), str(copy_root)],
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 1
    assert "pdb.yaml: does not parse" in finished.stderr
    assert "deploy/kubernetes: no PodDisruptionBudget" in finished.stderr


def test_tmp_on_disk_under_a_read_only_root_is_reported(copy_root):
    # podman kube play puts /tmp on disk whatever the manifest says, so only this check sees the medium.
    edit_yaml(copy_root / "deploy/kubernetes/deployment.yaml",
              lambda doc: doc["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].pop("medium"))
    assert check_manifests.check(copy_root) == [
        "Deployment container 'vector-embedder': a read-only root needs /tmp from an emptyDir with medium: Memory "
        "and a sizeLimit"]


def test_a_grace_period_gunicorn_outlasts_is_reported(copy_root):
    edit_yaml(copy_root / "deploy/kubernetes/deployment.yaml",
              lambda doc: doc["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30))
    assert check_manifests.check(copy_root) == [
        "Deployment: terminationGracePeriodSeconds 30 does not outlast gunicorn's graceful_timeout 30: "
        "requests in flight would be killed"]


def test_a_pod_without_its_hardening_is_reported(copy_root):
    def change(doc):
        pod = doc["spec"]["template"]["spec"]
        del pod["automountServiceAccountToken"]
        del pod["securityContext"]["runAsNonRoot"]
        del pod["securityContext"]["seccompProfile"]
    edit_yaml(copy_root / "deploy/kubernetes/deployment.yaml", change)
    assert check_manifests.check(copy_root) == [
        "Deployment: automountServiceAccountToken must be false (the service calls no API server)",
        "Deployment container 'vector-embedder': must set runAsNonRoot: true and a non-zero runAsUser",
        "Deployment container 'vector-embedder': seccompProfile.type must be one of ['Localhost', 'RuntimeDefault']"]
