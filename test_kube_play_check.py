"""What scripts/kube_play_check.py reads from the real Deployment before podman plays it.

The play itself runs in the container check (scripts/container_check.sh), which needs podman and root.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("kube_play_check", ROOT / "scripts" / "kube_play_check.py")
kube_play_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kube_play_check  # its dataclasses look their module up there
_spec.loader.exec_module(kube_play_check)


@pytest.fixture
def deployment() -> dict:
    return kube_play_check.load_deployment(kube_play_check.MANIFEST)


def test_the_played_copy_changes_only_the_image_and_the_ports(deployment):
    original = copy.deepcopy(deployment)
    played = kube_play_check.podman_copy(deployment, "localhost/vector-embedder:check")
    container = kube_play_check.app_container(played)
    assert container["image"] == "localhost/vector-embedder:check"
    assert "ports" not in container
    container["image"] = kube_play_check.app_container(original)["image"]
    container["ports"] = kube_play_check.app_container(original)["ports"]
    assert played == original
    assert deployment == original


def test_probes_are_read_as_the_kubelet_reads_them(deployment):
    probes = {probe.kind: probe for probe in kube_play_check.manifest_probes(kube_play_check.app_container(deployment))}
    assert list(probes) == ["startupProbe", "readinessProbe", "livenessProbe"]
    # The manifest names the port "http"; the kubelet looks the number up among the container's ports.
    assert {probe.port for probe in probes.values()} == {5001}
    assert probes["startupProbe"].path == "/health/ready"
    assert probes["livenessProbe"].path == "/health"
    # Left out in the manifest: the kubelet's default.
    assert probes["startupProbe"].initial_delay == 0


def test_a_probe_on_a_port_name_the_container_lacks_fails(deployment):
    container = kube_play_check.app_container(deployment)
    container["readinessProbe"]["httpGet"]["port"] = "metrics"
    with pytest.raises(kube_play_check.CheckFailed, match="'metrics' is not a port name of the container"):
        kube_play_check.manifest_probes(container)


def test_the_secret_and_the_pods_are_named_as_podman_names_them(deployment):
    assert kube_play_check.secret_reference(kube_play_check.app_container(deployment)) == ("vector-embedder", "api-key")
    assert kube_play_check.pod_names(deployment) == ["vector-embedder-pod-0", "vector-embedder-pod-1"]


@pytest.mark.parametrize("text, value", [("512Mi", 512 * 2 ** 20), ("64Mi", 64 * 2 ** 20), ("1", 1), ("500m", 0.5)])
def test_quantities(text, value):
    assert kube_play_check.quantity(text) == value
