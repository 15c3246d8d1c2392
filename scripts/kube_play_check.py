"""Play the Kubernetes Deployment with `podman kube play` and check what the manifest promises.

    python scripts/kube_play_check.py IMAGE [MANIFEST]

scripts/container_check.sh runs this inside its private mount namespace, once the image it built has
answered on its own. It plays a copy of deploy/kubernetes/deployment.yaml with IMAGE put in, after
creating the podman secret that the manifest's secretKeyRef names, holding a random API key. Then, for
every pod the Deployment makes:

1. the manifest's own startup, readiness and liveness probes pass, run here the way the kubelet runs
   them, from the pod's network namespace (podman 4.3 runs none of them: see podman_probe_handling);
2. a request with the key from the secret gets a unit vector of 384 numbers, one without a key 401;
3. every process of the service runs as the manifest's user and group, with no capabilities, no
   privilege escalation and a seccomp filter; a write to / fails; /tmp is the emptyDir volume and
   writable; the memory and CPU limits are in force in the container's cgroup;
4. stopped the way the kubelet stops a pod (SIGTERM, then terminationGracePeriodSeconds before a
   kill), gunicorn shuts down and exits 0 in time; `podman kube down` then removes the pods.

Every pod, secret and volume it creates is removed on the way out, also when a check fails.
Prints what it saw; exits 1 with the reason when a promise is not kept.
"""
from __future__ import annotations

import base64
import copy
import json
import math
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "deployment.yaml"
API_KEY_VARIABLE = "VECTOR_EMBEDDER_API_KEY"
EXPECTED_DIMENSION = 384
# What the kubelet assumes when a probe or a pod leaves a field out.
PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3}
DEFAULT_GRACE_SECONDS = 30
PROBE_KINDS = ("startupProbe", "readinessProbe", "livenessProbe")
# Where podman 4.3 puts a pod's cgroups under the (cgroupfs) hierarchy it is given.
MEMORY_HIERARCHY = Path("/sys/fs/cgroup/memory")
CPU_HIERARCHY = Path("/sys/fs/cgroup/cpu")
# Sent as the client's source, run in a pod's network namespace by http_in_pod.
HTTP_CLIENT = """
import json, sys, urllib.error, urllib.request
spec = json.load(sys.stdin)
body = spec["body"].encode() if spec["body"] is not None else None
request = urllib.request.Request(spec["url"], data=body, headers=spec["headers"], method=spec["method"])
try:
    with urllib.request.urlopen(request, timeout=spec["timeout"]) as response:
        status, text = response.status, response.read()
except urllib.error.HTTPError as error:
    status, text = error.code, error.read()
except OSError as error:
    status, text = None, str(error).encode()
print(json.dumps({"status": status, "body": text.decode(errors="replace")}))
"""


class CheckFailed(Exception):
    """A promise of the manifest that the played pods do not keep."""


@dataclass(frozen=True)
class Probe:
    """One httpGet probe of the manifest, with the kubelet's defaults filled in."""
    kind: str
    path: str
    port: int
    period: float
    timeout: float
    failure_threshold: int
    initial_delay: float

    def describe(self) -> str:
        return f"{self.kind} GET {self.path} on port {self.port}"


@dataclass(frozen=True)
class Pod:
    """A played pod: its app container, and where its network is."""
    name: str
    container: str
    network_pid: int  # the infra container's process: its network namespace is the pod's
    address: str


def log(message: str) -> None:
    print(message, flush=True)


def podman(*args: str, check: bool = True) -> str:
    finished = subprocess.run(["podman", *args], capture_output=True, text=True)
    if check and finished.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args)} failed: {finished.stderr.strip()}")
    return finished.stdout.strip()


# --- the manifest ---------------------------------------------------------------------------

def load_deployment(path: Path) -> dict:
    deployments = [document for document in yaml.safe_load_all(path.read_text())
                   if document and document.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise CheckFailed(f"{path}: expected one Deployment, found {len(deployments)}")
    return deployments[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def app_container(deployment: dict) -> dict:
    containers = pod_spec(deployment)["containers"]
    if len(containers) != 1:
        raise CheckFailed(f"expected one container in the pod, found {len(containers)}")
    return containers[0]


def container_port(container: dict, port: int | str) -> int:
    """A port number, or the number of the container's port with that name (as the kubelet resolves it)."""
    if isinstance(port, int):
        return port
    named = {entry.get("name"): entry["containerPort"] for entry in container.get("ports", [])}
    if port not in named:
        raise CheckFailed(f"port {port!r} is not a port name of the container (it has {sorted(named)})")
    return named[port]


def manifest_probes(container: dict) -> list[Probe]:
    probes = []
    for kind in PROBE_KINDS:
        spec = container.get(kind)
        if spec is None:
            continue
        http_get = spec.get("httpGet")
        if http_get is None or http_get.get("scheme", "HTTP") != "HTTP":
            raise CheckFailed(f"{kind} is not a plain httpGet probe: this check runs only those")
        settings = {**PROBE_DEFAULTS, **spec}
        probes.append(Probe(kind, http_get.get("path", "/"), container_port(container, http_get["port"]),
                            settings["periodSeconds"], settings["timeoutSeconds"],
                            settings["failureThreshold"], settings["initialDelaySeconds"]))
    return probes


def secret_reference(container: dict) -> tuple[str, str]:
    """The secret name and key the API key comes from."""
    for entry in container.get("env", []):
        if entry.get("name") == API_KEY_VARIABLE:
            reference = entry.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                return reference["name"], reference["key"]
    raise CheckFailed(f"{API_KEY_VARIABLE} does not come from a secretKeyRef")


def podman_copy(deployment: dict, image: str) -> dict:
    """The Deployment as podman plays it: the image just built, and no container ports.

    podman 4.3 publishes every containerPort on the host, on every address, under the same number,
    which Kubernetes never does; the second replica then finds the port taken and does not start.
    The pods are reached in their own network namespaces instead, as the kubelet reaches a pod.
    """
    played = copy.deepcopy(deployment)
    for container in pod_spec(played)["containers"]:
        container["image"] = image
        container.pop("ports", None)
    return played


def pod_names(deployment: dict) -> list[str]:
    # podman 4.3 makes one pod per replica, named after the Deployment.
    name = deployment["metadata"]["name"]
    return [f"{name}-pod-{index}" for index in range(deployment["spec"].get("replicas", 1))]


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number: 512Mi -> 536870912, 500m -> 0.5, 1 -> 1."""
    text = str(value)
    suffixes = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "m": 10 ** -3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if not match or (match.group(2) and match.group(2) not in suffixes):
        raise CheckFailed(f"cannot read the quantity {text!r}")
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


# --- podman -----------------------------------------------------------------------------------

def create_secret(name: str, key: str, api_key: str, folder: Path) -> None:
    """A podman secret that secretKeyRef can read.

    podman 4.3 reads secretKeyRef from a podman secret holding the Secret's data as JSON (base64
    values). A Secret played with `kube play` is stored as the whole object in YAML, which that
    reader refuses ("not valid JSON"), so the secret is created with `podman secret create`.
    """
    path = folder / "secret-data.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps({key: base64.b64encode(api_key.encode()).decode()}))
    if name in podman("secret", "ls", "--format", "{{.Name}}").split():
        # Left by an interrupted run: the storage is this check's own.
        podman("secret", "rm", name)
    podman("secret", "create", name, str(path))
    path.unlink()


def play(copy_path: Path) -> None:
    # slirp4netns: the default would create a bridge network, which changes the machine's firewall.
    output = podman("kube", "play", "--replace", "--network", "slirp4netns", str(copy_path))
    log(f"podman kube play: {output.splitlines().count('Pod:')} pods started")


def container_logs(name: str, *options: str) -> str:
    """What the container wrote, stdout and stderr together (gunicorn logs to stderr)."""
    finished = subprocess.run(["podman", "logs", *options, name], capture_output=True, text=True)
    return finished.stdout + finished.stderr


def find_pod(name: str, container_name: str) -> Pod:
    infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", name)
    network_pid = int(podman("inspect", "--format", "{{.State.Pid}}", infra))
    addresses = subprocess.run(["nsenter", f"--target={network_pid}", "--net", "hostname", "-I"],
                               capture_output=True, text=True, check=True).stdout.split()
    ipv4 = [address for address in addresses if "." in address]
    if not ipv4:
        raise CheckFailed(f"{name}: the pod's network namespace has no IPv4 address ({addresses})")
    return Pod(name, f"{name}-{container_name}", network_pid, ipv4[0])


def running(pod: Pod) -> bool:
    return podman("inspect", "--format", "{{.State.Running}}", pod.container, check=False) == "true"


def http_in_pod(pod: Pod, method: str, path: str, port: int, body: str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int | None, str]:
    """An HTTP request to the pod's own address, sent from inside the pod's network namespace."""
    request = {"url": f"http://{pod.address}:{port}{path}", "method": method, "body": body,
               "headers": headers or {}, "timeout": timeout}
    finished = subprocess.run(["nsenter", f"--target={pod.network_pid}", "--net", "--", sys.executable, "-c",
                               HTTP_CLIENT], input=json.dumps(request), capture_output=True, text=True,
                              timeout=timeout + 30)
    if finished.returncode != 0:
        raise CheckFailed(f"{pod.name}: the HTTP client failed in the pod's network: {finished.stderr.strip()}")
    answer = json.loads(finished.stdout)
    return answer["status"], answer["body"]


def podman_probe_handling(pod: Pod) -> None:
    """Say what podman itself made of the probes (it runs none of them here)."""
    healthcheck = json.loads(podman("inspect", "--format", "{{json .Config.Healthcheck}}", pod.container) or "null")
    test = " ".join((healthcheck or {}).get("Test", [])) or "none"
    log(f"{pod.name}: podman ignores startupProbe and readinessProbe; it turned livenessProbe into the "
        f"healthcheck '{test}', run only by systemd timers, which this machine lacks")


# --- the checks -------------------------------------------------------------------------------

def probe_until_success(pod: Pod, probe: Probe) -> int:
    """Run a probe the way the kubelet does until it passes; the number of tries it took."""
    time.sleep(probe.initial_delay)
    failures = 0
    while True:
        status, body = http_in_pod(pod, "GET", probe.path, probe.port, timeout=probe.timeout)
        if status is not None and 200 <= status < 400:
            return failures + 1
        failures += 1
        if failures >= probe.failure_threshold:
            raise CheckFailed(f"{pod.name}: {probe.describe()} failed {failures} times in a row "
                              f"(last answer: {status} {body[:300]})")
        if not running(pod):
            raise CheckFailed(f"{pod.name}: the container stopped while its {probe.kind} was failing "
                              f"(last answer: {status} {body[:300]})")
        time.sleep(probe.period)


def check_probes(pod: Pod, probes: list[Probe], played_at: float) -> None:
    """Startup first, then readiness, then liveness, as the kubelet orders them."""
    for probe in probes:
        tries = probe_until_success(pod, probe)
        log(f"{pod.name}: {probe.describe()} passed (try {tries}, {time.monotonic() - played_at:.0f}s after play)")
    if not any(probe.kind == "readinessProbe" for probe in probes):
        raise CheckFailed("the manifest has no readinessProbe: nothing says when a pod may take traffic")


def check_api_key(pod: Pod, port: int, api_key: str) -> None:
    request = json.dumps({"text": "A pod that really embeds."})
    status, body = http_in_pod(pod, "POST", "/embeddings", port, request,
                               {"Content-Type": "application/json", "X-API-Key": api_key}, timeout=60)
    if status != 200:
        raise CheckFailed(f"{pod.name}: the key from the secret got {status}: {body[:300]}")
    vector = json.loads(body)["embeddings"][0]
    norm = math.sqrt(sum(value * value for value in vector))
    if len(vector) != EXPECTED_DIMENSION or abs(norm - 1) > 1e-3:
        raise CheckFailed(f"{pod.name}: bad vector: {len(vector)} values, norm {norm}")
    status, body = http_in_pod(pod, "POST", "/embeddings", port, request, {"Content-Type": "application/json"})
    if status != 401:
        raise CheckFailed(f"{pod.name}: a request without a key got {status}, expected 401: {body[:300]}")
    log(f"{pod.name}: key from the secret: {len(vector)} floats, norm {norm:.6f}; no key: 401")


def service_processes(pod: Pod) -> list[dict[str, str]]:
    """/proc/PID/status of gunicorn (the container's PID 1) and its workers, read inside the container."""
    text = podman("exec", pod.container, "sh", "-c", 'for f in /proc/[0-9]*/status; do cat "$f"; echo; done')
    statuses = []
    for block in text.split("\n\n"):
        fields = dict(line.split(":\t", 1) for line in block.splitlines() if ":\t" in line)
        if fields.get("Pid") == "1" or fields.get("PPid") == "1":
            statuses.append({key: value.strip() for key, value in fields.items()})
    if not statuses:
        raise CheckFailed(f"{pod.name}: found no process of the service in the container")
    return statuses


def check_logs(pod: Pod) -> None:
    errors = [line for line in container_logs(pod.container).splitlines() if "Traceback" in line or " ERROR " in line]
    if errors:
        raise CheckFailed(f"{pod.name}: the service logged errors:\n" + "\n".join(errors))


def check_identity(pod: Pod, deployment: dict) -> None:
    """User, group, capabilities, privilege escalation and seccomp of every service process."""
    container = app_container(deployment)
    context = {**pod_spec(deployment).get("securityContext", {}), **container.get("securityContext", {})}
    user, group = str(context["runAsUser"]), str(context["runAsGroup"])
    drops_all = "ALL" in context.get("capabilities", {}).get("drop", [])
    for status in service_processes(pod):
        where = f"{pod.name}: process {status['Pid']} ({status['Name']})"
        if set(status["Uid"].split()) != {user} or set(status["Gid"].split()) != {group}:
            raise CheckFailed(f"{where} runs as uid {status['Uid']} gid {status['Gid']}, expected {user}:{group}")
        if drops_all and any(int(status[field], 16) for field in ("CapPrm", "CapEff", "CapBnd")):
            raise CheckFailed(f"{where} keeps capabilities: {status['CapEff']} (the manifest drops ALL)")
        if context.get("allowPrivilegeEscalation") is False and status.get("NoNewPrivs") != "1":
            raise CheckFailed(f"{where} may gain privileges (NoNewPrivs {status.get('NoNewPrivs')})")
        if status.get("Seccomp") != "2":
            raise CheckFailed(f"{where} runs without a seccomp filter (Seccomp {status.get('Seccomp')})")
    log(f"{pod.name}: gunicorn and its workers run as {user}:{group}, no capabilities, no new privileges, "
        f"seccomp filtering (podman's default profile)")


def mounts(pod: Pod) -> dict[str, tuple[str, str]]:
    """Mount point -> (file system type, options), as the container sees them."""
    table = {}
    for line in podman("exec", pod.container, "cat", "/proc/mounts").splitlines():
        _, point, kind, options = line.split()[:4]
        table[point] = (kind, options)
    return table


def check_filesystems(pod: Pod, deployment: dict) -> None:
    """A read-only root, and /tmp the writable emptyDir the manifest mounts there."""
    if not app_container(deployment).get("securityContext", {}).get("readOnlyRootFilesystem"):
        raise CheckFailed("the manifest does not make the root file system read-only")
    table = mounts(pod)
    if "ro" not in table["/"][1].split(","):
        raise CheckFailed(f"{pod.name}: the root file system is mounted {table['/'][1]}")
    write = subprocess.run(["podman", "exec", pod.container, "sh", "-c", "echo x > /kube-check"],
                           capture_output=True, text=True)
    if write.returncode == 0 or "Read-only file system" not in write.stderr:
        raise CheckFailed(f"{pod.name}: a write to / did not fail as read-only: {write.stderr.strip()!r}")
    volume = tmp_volume(deployment)
    if "/tmp" not in table:
        raise CheckFailed(f"{pod.name}: /tmp is not a mount of its own (the manifest mounts an emptyDir there)")
    podman("exec", pod.container, "sh", "-c", 'file=$(mktemp) && rm "$file"')
    kind, options = table["/tmp"]
    medium, size_limit = volume.get("medium", ""), volume.get("sizeLimit")
    log(f"{pod.name}: write to /: Read-only file system; /tmp: {kind}, writable")
    if kind == "tmpfs":
        size = re.search(r"size=(\d+)k", options)
        if size_limit and (size is None or int(size.group(1)) * 1024 > quantity(size_limit)):
            raise CheckFailed(f"{pod.name}: /tmp is a tmpfs ({options}) larger than sizeLimit {size_limit}")
        log(f"{pod.name}: /tmp honours emptyDir medium {medium or 'default'}, sizeLimit {size_limit}")
    elif medium == "Memory":
        version = podman("version", "--format", "{{.Client.Version}}")
        log(f"{pod.name}: podman {version} does not honour emptyDir medium: Memory nor sizeLimit {size_limit}: "
            f"/tmp is a volume on {kind} (scripts/check_manifests.py checks these fields instead)")


def tmp_volume(deployment: dict) -> dict:
    """The emptyDir the container mounts at /tmp."""
    mounted = {entry["name"] for entry in app_container(deployment).get("volumeMounts", [])
               if entry["mountPath"] == "/tmp"}
    for volume in pod_spec(deployment).get("volumes", []):
        if volume["name"] in mounted and "emptyDir" in volume:
            return volume["emptyDir"] or {}
    raise CheckFailed("the manifest mounts no emptyDir at /tmp, and the root file system is read-only")


def container_cgroup(hierarchy: Path, pod: Pod) -> Path:
    container_id = podman("inspect", "--format", "{{.Id}}", pod.container)
    found = list(hierarchy.glob(f"libpod_parent/*/libpod-{container_id}"))
    if len(found) != 1:
        raise CheckFailed(f"{pod.name}: no cgroup of the container under {hierarchy}")
    return found[0]


def check_limits(pod: Pod, deployment: dict) -> None:
    """The memory and CPU limits, read from the container's own cgroup."""
    limits = app_container(deployment).get("resources", {}).get("limits", {})
    memory = container_cgroup(MEMORY_HIERARCHY, pod)
    cpu = container_cgroup(CPU_HIERARCHY, pod)
    memory_limit = int((memory / "memory.limit_in_bytes").read_text())
    quota, period = (int((cpu / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    if "memory" in limits and memory_limit != quantity(limits["memory"]):
        raise CheckFailed(f"{pod.name}: memory limit {memory_limit} bytes, the manifest says {limits['memory']}")
    if "cpu" in limits and (quota <= 0 or abs(quota / period - quantity(limits["cpu"])) > 1e-3):
        raise CheckFailed(f"{pod.name}: CPU quota {quota}/{period} us, the manifest says {limits['cpu']} CPU")
    log(f"{pod.name}: cgroup limits: memory {memory_limit // 2 ** 20} MiB, CPU {quota / period:g}")


def stop_like_the_kubelet(pods: list[Pod], grace: int) -> None:
    """SIGTERM, and a kill only after terminationGracePeriodSeconds: gunicorn must finish before it."""
    started = time.monotonic()
    podman("pod", "stop", "--time", str(grace), *(pod.name for pod in pods))
    elapsed = time.monotonic() - started
    for pod in pods:
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", pod.container)
        logs = container_logs(pod.container)
        if exit_code != "0" or "Shutting down: Master" not in logs:
            raise CheckFailed(f"{pod.name}: gunicorn did not shut down cleanly on SIGTERM "
                              f"(exit code {exit_code}); last log lines:\n" + "\n".join(logs.splitlines()[-10:]))
    if elapsed >= grace:
        raise CheckFailed(f"stopping took {elapsed:.0f}s, the whole grace period of {grace}s: the kill came")
    log(f"SIGTERM: gunicorn exited 0 in every pod ('Shutting down: Master'), {elapsed:.1f}s of {grace}s grace")


def kube_down(copy_path: Path, pods: list[Pod], volumes_before: set[str]) -> None:
    podman("kube", "down", str(copy_path))
    left = [pod.name for pod in pods if subprocess.run(["podman", "pod", "exists", pod.name]).returncode == 0]
    if left:
        raise CheckFailed(f"podman kube down left pods behind: {left}")
    volumes = set(podman("volume", "ls", "--quiet").split()) - volumes_before
    log(f"podman kube down: pods {', '.join(pod.name for pod in pods)} removed; "
        f"{len(volumes)} emptyDir volumes left for the check to remove")


# --- the whole run ----------------------------------------------------------------------------

def check_deployment(deployment: dict, image: str, folder: Path, api_key: str, volumes_before: set[str]) -> None:
    container = app_container(deployment)
    copy_path = folder / "deployment.yaml"
    copy_path.write_text(yaml.safe_dump(podman_copy(deployment, image), sort_keys=False))
    create_secret(*secret_reference(container), api_key, folder)
    played_at = time.monotonic()
    play(copy_path)
    pods = [find_pod(name, container["name"]) for name in pod_names(deployment)]
    log(f"pods: {', '.join(f'{pod.name} at {pod.address}' for pod in pods)} "
        f"(replicas: {deployment['spec'].get('replicas', 1)})")
    podman_probe_handling(pods[0])
    probes = manifest_probes(container)
    for pod in pods:
        check_probes(pod, probes, played_at)
    port = container["ports"][0]["containerPort"]
    for pod in pods:
        check_api_key(pod, port, api_key)
        check_identity(pod, deployment)
        check_filesystems(pod, deployment)
        check_limits(pod, deployment)
        check_logs(pod)
    liveness = [probe for probe in probes if probe.kind == "livenessProbe"]
    for pod in pods:
        for probe in liveness:
            probe_until_success(pod, probe)
    grace = pod_spec(deployment).get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    stop_like_the_kubelet(pods, grace)
    kube_down(copy_path, pods, volumes_before)


def show_logs(deployment: dict) -> None:
    container = app_container(deployment)["name"]
    for name in pod_names(deployment):
        print(f"--- logs of {name}-{container}\n{container_logs(f'{name}-{container}', '--tail', '40')}",
              file=sys.stderr)


def remove_everything(deployment: dict, folder: Path, volumes_before: set[str]) -> None:
    """Whatever the check created, whether it passed or not."""
    copy_path = folder / "deployment.yaml"
    if copy_path.exists():
        podman("kube", "down", str(copy_path), check=False)
    podman("pod", "rm", "--force", "--ignore", *pod_names(deployment), check=False)
    secret_name, _ = secret_reference(app_container(deployment))
    if secret_name in podman("secret", "ls", "--format", "{{.Name}}", check=False).split():
        podman("secret", "rm", secret_name, check=False)
    for volume in set(podman("volume", "ls", "--quiet", check=False).split()) - volumes_before:
        podman("volume", "rm", "--force", volume, check=False)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    image, manifest = argv[1], Path(argv[2]) if len(argv) == 3 else MANIFEST
    deployment = load_deployment(manifest)
    volumes_before = set(podman("volume", "ls", "--quiet").split())
    with tempfile.TemporaryDirectory(prefix="kube-play-check-") as folder:
        try:
            check_deployment(deployment, image, Path(folder), secrets.token_urlsafe(24), volumes_before)
        except (CheckFailed, subprocess.SubprocessError) as failure:
            show_logs(deployment)
            print(f"kube play check failed: {failure}", file=sys.stderr)
            return 1
        finally:
            remove_everything(deployment, Path(folder), volumes_before)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
