"""Running the real OpenClaw CLI (2026.3.24) against the fake Qwen server, for the interop suite.

``scripts/install-openclaw.sh`` puts Node 22 and OpenClaw into ``.openclaw-interop/``; ``install()``
finds that install (running the script first, which is instant once installed) or says why it
cannot. ``OpenClaw`` runs the CLI inside one test's ``OpenClawHome``: its own ``HOME`` and
``OPENCLAW_STATE_DIR``, a scrubbed environment, an empty working directory (OpenClaw loads a
``.env`` from there) and ``preload.mjs``, which sends Qwen's hosts to the fake and refuses every
other non-loopback connection. Every run's wall time is kept for the session summary.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import ROOT, OpenClawHome

OPENCLAW_VERSION = "2026.3.24"
INSTALL_SCRIPT = ROOT / "scripts" / "install-openclaw.sh"
PRELOAD = Path(__file__).with_name("preload.mjs")
QWEN = "qwen-portal"
DEFAULT_PROFILE = f"{QWEN}:default"
QWEN_CLI_PROFILE = f"{QWEN}:qwen-cli"
#: OpenClaw's own refresh request: Node's fetch sends ``User-Agent: node``.
OPENCLAW_USER_AGENT = "node"
LOGIN_COMMAND = "openclaw models auth login --provider qwen-portal"
PROBE = ("models", "status", "--json", "--probe", "--probe-provider", QWEN)
STATUS = ("models", "status", "--json")


# --------------------------------------------------------------------------- installation


@dataclass(frozen=True)
class Install:
    root: Path
    node: Path
    entry: Path  # openclaw.mjs

    @property
    def compile_cache(self) -> Path:
        return self.root / "compile-cache"


def install(timeout: float = 900.0) -> Install | str:
    """The OpenClaw install, or why there is none (the reason the suite is skipped with).

    Runs the install script, which answers in milliseconds once its stamp says all is there;
    with ``QWEN_INTEROP_INSTALL=0`` it only checks and never downloads.
    """
    check_only = os.environ.get("QWEN_INTEROP_INSTALL", "1").strip() in ("0", "false", "no")
    argv = ["bash", str(INSTALL_SCRIPT), *(["--check"] if check_only else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OPENCLAW_VERSION": OPENCLAW_VERSION})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scripts/install-openclaw.sh could not install OpenClaw {OPENCLAW_VERSION}: {exc}"
    paths = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if done.returncode == 0 and {"DIR", "NODE", "OPENCLAW"} <= paths.keys():
        return Install(Path(paths["DIR"]), Path(paths["NODE"]), Path(paths["OPENCLAW"]))
    lines = done.stderr.strip().splitlines()
    telling = [line for line in lines if line.startswith(
        ("install-openclaw:", "npm error code", "npm error network", "npm error 40"))]
    hint = " (QWEN_INTEROP_INSTALL=0: not downloading)" if check_only else ""
    return (f"scripts/install-openclaw.sh could not install OpenClaw {OPENCLAW_VERSION}{hint} "
            f"(exit {done.returncode}): {' | '.join(telling[-4:] or lines[-3:])}")


# --------------------------------------------------------------------------- timings


def timing_summary(runs: Sequence[tuple[str, float]]) -> list[str]:
    """One line per command: how many runs and their wall times."""
    by_label: dict[str, list[float]] = {}
    for label, seconds in runs:
        by_label.setdefault(label, []).append(seconds)
    return [f"openclaw {label}: n={len(values)} min={min(values):.2f}s "
            f"median={statistics.median(values):.2f}s max={max(values):.2f}s"
            for label, values in sorted(by_label.items())]


# --------------------------------------------------------------------------- one CLI run


@dataclass
class OpenClawRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    started: float  # time.time()

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    def describe(self) -> str:
        return (f"openclaw {' '.join(self.argv)} -> exit {self.returncode} in "
                f"{self.seconds:.1f}s\n--- stdout ---\n{self.stdout[-3000:]}\n"
                f"--- stderr ---\n{self.stderr[-3000:]}")

    def json(self) -> dict[str, Any]:
        assert self.returncode == 0, self.describe()
        try:
            start = self.stdout.index("{")
            value = json.loads(self.stdout[start:])
        except ValueError:
            raise AssertionError("no JSON document on stdout:\n" + self.describe()) from None
        assert isinstance(value, dict), self.describe()
        return value


def _label(args: Sequence[str]) -> str:
    words = [a for a in args if a not in ("--json",)]
    if "--probe" in words:
        return "models status --json --probe"
    return " ".join(words[:2]) + (" --json" if "--json" in args else "")


@dataclass
class OpenClawProcess:
    """One OpenClaw run in the background; ``wait()`` gives its ``OpenClawRun``."""

    argv: list[str]
    proc: subprocess.Popen[bytes]
    out: IO[bytes]
    err: IO[bytes]
    started: float
    timings: list[tuple[str, float]]  # the owner's: (command, seconds) is added on wait()
    t0: float = field(default_factory=time.monotonic)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 120.0) -> OpenClawRun:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = -9
        seconds = time.monotonic() - self.t0
        run = OpenClawRun(self.argv, code, _drain(self.out), _drain(self.err), seconds,
                          self.started)
        self.timings.append((_label(self.argv), seconds))
        if code == -9:
            raise AssertionError(f"OpenClaw still running after {timeout}s:\n{run.describe()}")
        return run


def _drain(handle: IO[bytes]) -> str:
    handle.seek(0)
    text = handle.read().decode("utf-8", "replace")
    handle.close()
    return text


class OpenClaw:
    """The OpenClaw CLI inside one ``OpenClawHome`` (``~/.openclaw`` under its own HOME)."""

    def __init__(self, setup: Install, home: OpenClawHome, fake_url: str) -> None:
        self.install = setup
        self.home = home
        self.fake_url = fake_url
        self.cwd = home.root / "openclaw-cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.net_log = home.root / "openclaw-net.jsonl"
        self.timings: list[tuple[str, float]] = []  # (command, wall seconds) of every run
        self._numbers = itertools.count(1)

    @property
    def store_path(self) -> Path:
        return self.home.store_path()

    @property
    def qwen_creds(self) -> Path:
        return self.home.home / ".qwen" / "oauth_creds.json"

    def env(self) -> dict[str, str]:
        """Built from nothing: no API key, proxy or NODE_OPTIONS of the developer leaks in."""
        return {
            "PATH": f"{self.install.node.parent}:/usr/bin:/bin",
            "HOME": str(self.home.home),
            "OPENCLAW_STATE_DIR": str(self.home.state),
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            "NO_COLOR": "1",
            "FORCE_COLOR": "0",
            # Our preload, and the flag OpenClaw would otherwise re-exec Node to add (one
            # Node start saved per run); OPENCLAW_NO_RESPAWN says the same.
            "NODE_OPTIONS": f"--import={PRELOAD.as_uri()} --disable-warning=ExperimentalWarning",
            "OPENCLAW_NO_RESPAWN": "1",
            "NODE_COMPILE_CACHE": str(self.install.compile_cache),
            "QWEN_INTEROP_FAKE_URL": self.fake_url,
            "QWEN_INTEROP_NET_LOG": str(self.net_log),
        }

    def argv(self, args: Sequence[str]) -> list[str]:
        return [str(self.install.node), str(self.install.entry), *args]

    def start(self, *args: str) -> OpenClawProcess:
        # Kept in the test's directory (pytest keeps the last few) for a look after a failure.
        n = next(self._numbers)
        out = (self.home.root / f"openclaw-{n}.out").open("w+b")
        err = (self.home.root / f"openclaw-{n}.err").open("w+b")
        started = time.time()
        proc = subprocess.Popen(self.argv(args), cwd=self.cwd, env=self.env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        return OpenClawProcess(list(args), proc, out, err, started, self.timings)

    def run(self, *args: str, timeout: float = 120.0) -> OpenClawRun:
        return self.start(*args).wait(timeout)

    def status(self) -> dict[str, Any]:
        """``openclaw models status --json``: reads the store, refreshes nothing."""
        return self.run(*STATUS).json()

    def probe(self) -> dict[str, Any]:
        """``... --probe --probe-provider qwen-portal``: resolves the key (refreshing it when
        expired), sends one chat completion with it, then writes its bookkeeping."""
        return self.run(*PROBE).json()

    def network_events(self) -> list[dict[str, Any]]:
        try:
            lines = self.net_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def refused(self) -> list[dict[str, Any]]:
        return [e for e in self.network_events() if e.get("event") == "refused"]


# --------------------------------------------------------------------------- reading reports


def oauth_profile(report: dict[str, Any], profile_id: str) -> dict[str, Any]:
    """One profile of ``auth.oauth.profiles`` in a ``models status --json`` report."""
    for entry in report["auth"]["oauth"]["profiles"]:
        if entry["profileId"] == profile_id:
            assert isinstance(entry, dict)
            return entry
    raise AssertionError(f"{profile_id} not in the report: "
                         f"{[p['profileId'] for p in report['auth']['oauth']['profiles']]}")


def probe_result(report: dict[str, Any], profile_id: str = DEFAULT_PROFILE) -> dict[str, Any]:
    probes = report["auth"].get("probes")
    assert probes, "the report has no probe results"
    for entry in probes["results"]:
        if entry.get("profileId") == profile_id:
            assert isinstance(entry, dict)
            return entry
    raise AssertionError(f"no probe result for {profile_id}: {probes['results']}")



# --------------------------------------------------------------------------- our own CLI


def refresher(home: OpenClawHome, fake: FakeQwen, *args: str,
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m qwen_refresher ARGS`` with the home's environment, pointed at ``fake``."""
    endpoints = (["--token-url", fake.token_url, "--device-code-url", fake.device_code_url]
                 if args and args[0] == "login" else [])
    return subprocess.run([sys.executable, "-m", "qwen_refresher", *args, *endpoints],
                          cwd=ROOT, env=home.env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def refresher_status(home: OpenClawHome, fake: FakeQwen) -> tuple[dict[str, Any], str]:
    """``qwen-refresher status --json``: (document, raw output for the secrets check)."""
    done = refresher(home, fake, "status", "--json")
    try:
        document = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"status --json printed no JSON (exit {done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}") from None
    assert isinstance(document, dict)
    return document, done.stdout + done.stderr


def status_row(document: dict[str, Any], home: OpenClawHome, store: Path,
               profile: str) -> dict[str, Any]:
    """The row of one profile; status shows paths under the (sandbox) home as ``~/...``."""
    for row in document["profiles"]:
        shown = str(row["store"])
        path = home.home / shown[2:] if shown.startswith("~/") else Path(shown)
        if row["profile"] == profile and path == store:
            assert isinstance(row, dict)
            return row
    raise AssertionError(f"{store}#{profile} not in status: "
                         f"{[(r['store'], r['profile']) for r in document['profiles']]}")


# --------------------------------------------------------------------------- the gateway

#: What the fake's chat endpoint answers: a model call through OpenClaw succeeded iff this text
#: came back (on a failed model call the gateway still answers, with an error text instead).
FAKE_REPLY = "Hello from the fake Qwen server."
#: The default agent's model: the qwen-portal plugin's own default.
QWEN_MODEL = f"{QWEN}/coder-model"
#: The one request ``gateway run`` sends off loopback that no setting turns off: the model-pricing
#: bootstrap (OpenRouter's model list, fetched once per configured model set). The preload refuses
#: it; the gateway logs "pricing bootstrap failed" and carries on.
GATEWAY_ALLOWED_REFUSALS = frozenset({("fetch", "openrouter.ai")})
#: Gateway parts the soak does not use, kept from starting (each would listen, poll or advertise):
#: chat channels, the Gmail watcher, cron, browser control, the canvas host and mDNS.
GATEWAY_SKIP_ENV = {
    "OPENCLAW_SKIP_CHANNELS": "1",
    "OPENCLAW_SKIP_GMAIL_WATCHER": "1",
    "OPENCLAW_SKIP_CRON": "1",
    "OPENCLAW_SKIP_BROWSER_CONTROL_SERVER": "1",
    "OPENCLAW_SKIP_CANVAS_HOST": "1",
    "OPENCLAW_DISABLE_BONJOUR": "1",
}
#: Printed by ``openclaw agent`` when it could not reach the gateway and ran the model itself.
AGENT_FALLBACK = "falling back to embedded"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the gateway binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_config(port: int, token: str) -> dict[str, Any]:
    """``openclaw.json`` for a loopback gateway with token auth and the OpenAI-compatible chat
    endpoint, whose default agent talks to qwen-portal.

    ``gateway.reload.mode`` is ``off``: a config hot reload would also rebuild the gateway's auth
    snapshot, and the soak must show that ``openclaw secrets reload`` alone keeps it current.
    """
    return {
        "gateway": {
            "mode": "local",
            "port": port,
            "bind": "loopback",
            "auth": {"mode": "token", "token": token},
            "http": {"endpoints": {"chatCompletions": {"enabled": True}}},
            "reload": {"mode": "off"},
        },
        "agents": {"defaults": {"model": {"primary": QWEN_MODEL}}},
        "update": {"checkOnStart": False},
        "discovery": {"mdns": {"mode": "off"}},
        "browser": {"enabled": False},
        "canvasHost": {"enabled": False},
    }


@dataclass(frozen=True)
class ModelCall:
    """One model call through the gateway, as its client saw it."""

    kind: str  # "http" (POST /v1/chat/completions) or "agent" (`openclaw agent`)
    started: float  # time.time()
    ended: float
    ok: bool
    detail: str  # why it failed (never a Qwen token: the gateway never shows one)

    def describe(self) -> str:
        return (f"{self.kind} call at {self.started:.1f} took {self.ended - self.started:.1f}s: "
                f"{'ok' if self.ok else 'FAILED'} {self.detail}")


class Gateway:
    """``openclaw gateway run`` (the real, long-running gateway) in one test's home.

    Loopback, token auth, the chat-completions endpoint on, its Qwen traffic sent to the fake by
    the preload like every other OpenClaw run; its own network log (``refused()``), because its
    pricing bootstrap is refused on every start. The CLI finds it through ``openclaw.json``
    (port and token), so ``openclaw agent`` and ``openclaw secrets reload`` reach it with no flags.
    """

    def __init__(self, claw: OpenClaw) -> None:
        self.claw = claw
        self.port = free_port()
        self.token = "gw-" + secrets.token_hex(16)  # the gateway's, not a Qwen secret
        self.net_log = claw.home.root / "gateway-net.jsonl"
        self.log_path = claw.home.root / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after = 0.0  # seconds from start to /healthz answering

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        path = self.claw.home.state / "openclaw.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(json.dumps(gateway_config(self.port, self.token), indent=2) + "\n")
        os.chmod(path, 0o600)
        return path

    def start(self, timeout: float = 90.0) -> None:
        """Start it and wait until ``/healthz`` answers (or fail with its log)."""
        self.write_config()
        env = {**self.claw.env(), **GATEWAY_SKIP_ENV, "QWEN_INTEROP_NET_LOG": str(self.net_log)}
        self.started_at = time.monotonic()
        with self.log_path.open("wb") as log:
            # Its own session: stop() ends the gateway and anything it started, and nothing else.
            self.proc = subprocess.Popen(self.claw.argv(["gateway", "run", "--port",
                                                         str(self.port)]),
                                         cwd=self.claw.cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited ({self.proc.returncode}) while "
                                     f"starting:\n{self.log_tail()}")
            if self._healthy():
                self.ready_after = time.monotonic() - self.started_at
                self.claw.timings.append(("gateway run (until healthy)", self.ready_after))
                return
            time.sleep(0.25)
        raise AssertionError(f"the gateway did not answer /healthz within {timeout}s:\n"
                             f"{self.log_tail()}")

    def _opener(self) -> urllib.request.OpenerDirector:
        # A developer's HTTP(S)_PROXY must not swallow requests meant for 127.0.0.1.
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _healthy(self) -> bool:
        try:
            with self._opener().open(self.url + "/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the gateway process has used so far, for the report."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to its process group, SIGKILL after ``timeout``; its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group
        return proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def network_events(self) -> list[dict[str, Any]]:
        try:
            lines = self.net_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def refused(self) -> list[dict[str, Any]]:
        """Refused attempts to leave loopback, apart from the pricing bootstrap."""
        return [e for e in self.network_events() if e.get("event") == "refused"
                and (e.get("what"), e.get("host")) not in GATEWAY_ALLOWED_REFUSALS]

    def chat(self, message: str, timeout: float = 90.0) -> ModelCall:
        """One ``POST /v1/chat/completions`` with the gateway token, default agent."""
        body = json.dumps({"model": "openclaw/default",
                           "messages": [{"role": "user", "content": message}]}).encode()
        request = urllib.request.Request(
            self.url + "/v1/chat/completions", data=body, method="POST",
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        started = time.time()
        try:
            with self._opener().open(request, timeout=timeout) as response:
                raw = response.read(1 << 20)
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(1 << 16), exc.code
        except OSError as exc:
            return ModelCall("http", started, time.time(), False, f"no answer: {exc!r}")
        ended = time.time()
        try:
            document = json.loads(raw)
            text = document["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            text = None
        ok = status == 200 and text == FAKE_REPLY
        return ModelCall("http", started, ended, ok,
                         "" if ok else f"HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")


def agent_call(claw: OpenClaw, message: str, timeout: float = 150.0) -> ModelCall:
    """``openclaw agent --agent main --json`` (through the gateway, not ``--local``).

    The CLI falls back to running the model itself when the gateway call fails, so a reply alone
    proves nothing: the fallback's message on stderr makes the call a failure.
    """
    run = claw.start("agent", "--agent", "main", "--message", message, "--json",
                     "--timeout", str(int(timeout) - 30)).wait(timeout)
    texts: list[str] = []
    try:
        document = run.json()
        payloads = document.get("result", {}).get("payloads", [])
        texts = [str(p.get("text")) for p in payloads if isinstance(p, dict)]
        status = document.get("status")
    except AssertionError:
        status = None
    ok = (run.returncode == 0 and status == "ok" and texts == [FAKE_REPLY]
          and AGENT_FALLBACK not in run.stderr)
    return ModelCall("agent", run.started, run.ended, ok,
                     "" if ok else f"status {status!r}, replies {texts!r}\n{run.describe()}")


def launcher(claw: OpenClaw) -> Path:
    """A directory holding an ``openclaw`` command that runs this install, for programs that
    call OpenClaw by name, as the daemon's default ``on_rotate`` (``openclaw secrets reload``)
    does. Put it first on their ``PATH``, with the rest of ``claw.env()``."""
    bin_dir = claw.home.root / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "openclaw"
    script.write_text("#!/bin/sh\n"
                      f"exec {shlex.quote(str(claw.install.node))} "
                      f"{shlex.quote(str(claw.install.entry))} \"$@\"\n")
    script.chmod(0o755)
    return bin_dir
