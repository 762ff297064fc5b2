"""The bad-input corpus (``corpus.py``): broken and hostile stores beside a healthy one, and
broken settings.

Store cases share one daemon run (about 35 agent directories, one broken store each, plus a
healthy agent): every broken file gets exactly one clear error naming it, stays byte-identical
(its directory too: no lock, no temp file), shows up in ``status``, and the healthy agent keeps
being refreshed. Cases that used to take the daemon down (before commit 94fd15a) run alone,
each with its own daemon, so that a regression cannot hide the verdict on the others. When the
tests run as root, the shared run's daemon is started without root's permission override
(``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH`` dropped from its bounding set), so that an
unreadable file is unreadable to it.

A case with ``bug=`` set (an open daemon bug) is expected to go wrong: it is a strict xfail, as
a parametrized test for the isolated ones and case by case (``verdicts``) in the shared runs.

Config cases are quick ``run --once`` processes (forked from one interpreter that has imported
the CLI already, see ``settings_runner.py``): exit 78 and one stderr line naming the setting,
and nothing written.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qwen_refresher.errors import StoreError
from qwen_refresher.stores import OpenClawStore, QwenCodeStore, Store
from qwen_refresher.testing.fake_qwen import FakeQwen, FakeQwenConfig
from tests.harness import ROOT, OpenClawHome, qwen_profile
from tests.reliability.conftest import Figures
from tests.reliability.corpus import (
    CONFIG_CASES,
    DOC,
    STORE_CASES,
    ConfigCase,
    StoreCase,
    render_markdown,
)
from tests.reliability.support import (
    Daemon,
    Entry,
    assert_no_leaks,
    fake_secrets,
    status_outputs,
    tree,
    wait_for,
)

HEALTHY_LIFETIME = 3.0
ERROR_EVENTS = ("store_invalid", "profile_invalid")


#: prctl(PR_CAPBSET_DROP, cap): remove a capability from the bounding set, so that a root
#: process exec'd afterwards no longer has it.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_dac_override() -> None:
    """In the daemon's child before exec: root, but bound by file permissions like anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def daemon_restriction() -> Callable[[], None] | None:
    """What makes a mode-000 file unreadable to the daemon: nothing when we are not root;
    as root, dropping the permission-override capabilities (checked to work here); None when
    neither works (the unreadable case is then skipped)."""
    if os.geteuid() != 0:
        return None
    with tempfile.TemporaryDirectory() as directory:
        probe = Path(directory) / "unreadable"
        probe.write_text("x")
        probe.chmod(0)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", f"import qwen_refresher; open({str(probe)!r}).read()"],
                cwd=ROOT, preexec_fn=_drop_dac_override, capture_output=True, text=True,
                timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    return _drop_dac_override if "PermissionError" in proc.stderr else None


def unreadable_works(restriction: Callable[[], None] | None) -> bool:
    return os.geteuid() != 0 or restriction is not None


def case_path(oc: OpenClawHome, case: StoreCase) -> Path:
    if case.kind == "qwen-code":
        return oc.home / ".qwen" / "oauth_creds.json"
    return oc.store_path(f"bad-{case.name}")


def case_marker(case: StoreCase) -> str:
    """How the daemon's messages name the case's file (paths are shown with ``~``)."""
    return ".qwen/oauth_creds.json" if case.kind == "qwen-code" else f"/agents/bad-{case.name}/"


def open_store(path: Path, case: StoreCase) -> Store:
    return QwenCodeStore(path) if case.kind == "qwen-code" else OpenClawStore(path)


@dataclass
class CorpusRun:
    """One daemon over some broken stores and a healthy agent, and what it left behind."""

    cases: list[StoreCase]
    base: Path
    oc: OpenClawHome
    restriction: Callable[[], None] | None
    fake: FakeQwen
    paths: dict[str, Path] = field(default_factory=dict)
    before: dict[str, dict[str, Entry]] = field(default_factory=dict)
    after: dict[str, dict[str, Entry]] = field(default_factory=dict)
    in_process: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    output: str = ""
    texts: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    alive: bool = False
    outside_changed: bool = False
    rc: int | None = None
    healthy_rotations: int = 0
    tracebacks: int = 0
    seconds: float = 0.0

    def errors_for(self, case: StoreCase) -> list[dict[str, Any]]:
        marker = case_marker(case)
        return [e for e in self.events if e.get("event") in ERROR_EVENTS
                and marker in str(e.get("store", ""))]

    def problems(self, case: StoreCase) -> list[str]:
        """Everything wrong with how the daemon handled ``case`` (empty: all good)."""
        out: list[str] = []
        errors = self.errors_for(case)
        if len(errors) != 1:
            out.append(f"{len(errors)} error events name the file, expected exactly 1")
        for e in errors:
            text = str(e.get("error") or e.get("problem") or "")
            if e["event"] != case.event:
                out.append(f"logged {e['event']}, expected {case.event}: {text!r}")
            if case.expect not in text:
                out.append(f"message {text!r} lacks {case.expect!r}")
        if self.before[case.name] != self.after[case.name]:
            changed = sorted(set(self.before[case.name].items())
                             ^ set(self.after[case.name].items()))
            out.append(f"the agent directory changed: {[k for k, _ in changed]}")
        if not self._in_status(case):
            out.append("status --json does not show the error")
        shown = self.in_process.get(case.name, "")
        if not (case.needs_permission_checks and os.geteuid() == 0) and case.expect not in shown:
            out.append(f"reading it in-process says {shown!r}")
        return out

    def _in_status(self, case: StoreCase) -> bool:
        marker = case_marker(case)
        stores = [s for s in self.status.get("stores", []) if marker in s["store"]]
        profiles = [p for p in self.status.get("profiles", []) if marker in p["store"]]
        return any(case.expect in (s.get("error") or "") for s in stores) or any(
            p["state"] == "invalid_store" and case.expect in (p.get("last_error") or "")
            for p in profiles)


def run_corpus(cases: list[StoreCase], restriction: Callable[[], None] | None) -> CorpusRun:
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="qr-corpus-"))
    base.chmod(0o755)
    fake = FakeQwen(FakeQwenConfig(lifetime=HEALTHY_LIFETIME)).start()
    run = CorpusRun(cases, base, OpenClawHome(base), restriction, fake)
    try:
        _run(run)
    finally:
        fake.stop()
    run.seconds = time.monotonic() - started
    return run


def _run(run: CorpusRun) -> None:
    oc, fake = run.oc, run.fake
    outside = run.base / "outside"
    outside.mkdir()

    def tokens() -> tuple[str, str, int]:
        return fake.issue_tokens(lifetime=3600)

    access, refresh, expires = fake.issue_tokens(lifetime=HEALTHY_LIFETIME)
    healthy = oc.write_store({"version": 1, "profiles": {
        "qwen-portal:default": qwen_profile(access, refresh, expires)}}, agent="healthy")
    for case in run.cases:
        path = case_path(oc, case)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        case.build(path, tokens, outside)
        run.paths[case.name] = path
        try:
            snap = open_store(path, case).read()
            run.in_process[case.name] = "; ".join(
                str(r.problem) for r in snap.records.values() if r.problem) or "read fine"
        except StoreError as exc:
            run.in_process[case.name] = str(exc)
        except Exception as exc:  # reported as a problem of the case
            run.in_process[case.name] = f"crashed: {type(exc).__name__}"
    for case in run.cases:
        run.before[case.name] = tree(run.paths[case.name].parent)
    outside_before = tree(outside)
    daemon = Daemon(oc, fake, "--margin", "2", "--jitter", "0", preexec=run.restriction,
                    log_file=run.base / "daemon.log")
    try:
        wait_for(lambda: fake_rotations(fake) >= 2 or daemon.proc.poll() is not None, 40,
                 "two rotations of the healthy agent", daemon)
        # Every case's error is logged at the first scan, before any rotation; a little
        # grace for watch events all the same (a missing error is the case's problem).
        with contextlib.suppress(AssertionError):
            wait_for(lambda: all(run_has_error(daemon, c) for c in run.cases)
                     or daemon.proc.poll() is not None, 5, "an error for every case")
        run.alive = daemon.proc.poll() is None
        if run.alive:
            run.texts = [*status_outputs(oc), daemon.http_get("/metrics")[1],
                         daemon.http_get("/readyz")[1]]
            run.status = json.loads(run.texts[0])
    finally:
        run.rc = daemon.stop()
    run.events, run.output = list(daemon.events), daemon.output
    run.tracebacks = daemon.tracebacks()[0]
    run.healthy_rotations = fake_rotations(fake)
    for case in run.cases:
        run.after[case.name] = tree(run.paths[case.name].parent)
    run.outside_changed = tree(outside) != outside_before or not healthy.is_file()


def fake_rotations(fake: FakeQwen) -> int:
    return sum(1 for i in fake.issued if i.via == "refresh")


def run_has_error(daemon: Daemon, case: StoreCase) -> bool:
    marker = case_marker(case)
    return any(e.get("event") in ERROR_EVENTS and marker in str(e.get("store", ""))
               for e in list(daemon.events))


def run_problems(run: CorpusRun) -> list[str]:
    """What is wrong with the run as a whole (daemon died, healthy agent starved, leaks)."""
    out: list[str] = []
    if not run.alive or run.rc != 0:
        out.append(f"the daemon did not survive (exit {run.rc}): {run.output[-1500:]}")
    if run.healthy_rotations < 2:
        out.append(f"the healthy agent was rotated {run.healthy_rotations} times, expected 2+")
    if run.outside_changed:
        out.append("the files outside the agent directories changed")
    if run.tracebacks:
        out.append("an unexpected exception was logged")
    try:
        assert_no_leaks([run.output, *run.texts, *run.in_process.values()],
                        fake_secrets(run.fake))
    except AssertionError as exc:
        out.append(str(exc))
    return out


def cleanup(run: CorpusRun) -> None:
    shutil.rmtree(run.base, ignore_errors=True)


def verdicts(results: dict[str, tuple[str | None, list[str]]]) -> dict[str, list[str]]:
    """Cases that went wrong: problems where none were expected, or, for a case with an open
    bug (``bug=``), no problem at all any more (a strict xfail, case by case)."""
    out: dict[str, list[str]] = {}
    for name, (bug, problems) in results.items():
        if bug is None and problems:
            out[name] = problems
        elif bug is not None and not problems:
            out[name] = ["passes now: remove bug= from the case and regenerate the docs"]
    return out


# -- store cases --------------------------------------------------------------------------------


SHARED = [c for c in STORE_CASES if not c.isolated]
ISOLATED = [c for c in STORE_CASES if c.isolated]


@pytest.fixture(scope="module")
def restriction() -> Callable[[], None] | None:
    return daemon_restriction()


@pytest.mark.timeout(180)
def test_broken_stores_beside_a_healthy_one(restriction: Callable[[], None] | None,
                                            figures: Figures) -> None:
    cases = [c for c in SHARED if not c.needs_permission_checks or unreadable_works(restriction)]
    run = run_corpus(cases, restriction)
    try:
        problems = run_problems(run)
        failed = verdicts({c.name: (c.bug, run.problems(c)) for c in cases})
        figures("bad_input_stores", {
            "cases": len(cases),
            "isolated_cases": len(ISOLATED),
            "skipped": [c.name for c in SHARED if c not in cases],
            "failed": sorted(failed),
            "open_bugs": sorted(c.name for c in cases if c.bug),
            "daemon_privileges": "root without CAP_DAC_OVERRIDE" if restriction is not None
            else ("root" if os.geteuid() == 0 else "not root"),
            "healthy_rotations": run.healthy_rotations,
            "seconds": round(run.seconds, 1),
        })
        assert problems == [], problems
        assert failed == {}, json.dumps(failed, indent=1)
        assert len(cases) >= 30
    finally:
        cleanup(run)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=c.bug, strict=True)]
                 if c.bug else []) for c in ISOLATED])
@pytest.mark.timeout(90)
def test_a_store_that_used_to_crash_the_daemon(
        case: StoreCase, restriction: Callable[[], None] | None) -> None:
    run = run_corpus([case], restriction)
    try:
        problems = run_problems(run) + run.problems(case)
        assert problems == [], problems
    finally:
        cleanup(run)


# -- config cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigResult:
    rc: int | None
    stdout: str
    stderr: str
    wrote: list[str]  # files created by the run


def run_config_cases(cases: list[ConfigCase], workdir: Path) -> list[ConfigResult]:
    """Each case is one ``run --once`` process (forked by ``settings_runner``)."""
    jobs: list[dict[str, Any]] = []
    before: list[set[str]] = []
    for case in cases:
        directory = workdir / case.name
        directory.mkdir(parents=True)
        oc = OpenClawHome(directory)
        args = [a.replace("{dir}", str(directory)) for a in case.args]
        if case.toml is not None:
            config = directory / "config.toml"
            config.write_bytes(case.toml)
            args += ["--config", str(config)]
        # No QWEN_REFRESHER_* defaults from the harness: a variable would shadow (and so
        # leave unchecked) the file's value of the same setting.
        env = {k: v for k, v in oc.env(**case.env).items()
               if not k.startswith("QWEN_REFRESHER_") or k in case.env}
        env["QWEN_REFRESHER_LOG_FORMAT"] = "json"
        out = workdir / f"{case.name}.out"
        jobs.append({"argv": ["run", "--once", *args], "env": env, "cwd": str(ROOT),
                     "out": str(out), "err": str(out.with_suffix(".err"))})
        before.append(set(tree(directory)))
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.settings_runner"],
                          cwd=ROOT, input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes: list[int | None] = json.loads(proc.stdout)
    results = []
    for case, job, seen, code in zip(cases, jobs, before, codes, strict=True):
        wrote = sorted(set(tree(workdir / case.name)) - seen)
        results.append(ConfigResult(code, Path(job["out"]).read_text(errors="replace"),
                                    Path(job["err"]).read_text(errors="replace"), wrote))
    return results


def config_problems(case: ConfigCase, result: ConfigResult) -> list[str]:
    out: list[str] = []
    lines = result.stderr.strip().splitlines()
    if result.rc != 78:
        out.append(f"exit {result.rc}, expected 78")
    if len(lines) != 1:
        out.append(f"{len(lines)} lines on stderr, expected 1: {result.stderr[-600:]!r}")
    line = lines[-1] if lines else ""
    if f"invalid setting {case.setting}" not in line:
        out.append(f"{line!r} does not name {case.setting!r}")
    if case.expect not in line:
        out.append(f"{line!r} lacks {case.expect!r}")
    if result.stdout.strip():
        out.append(f"stdout is not empty: {result.stdout[:200]!r}")
    if result.wrote:
        out.append(f"files were written: {result.wrote}")
    return out


@pytest.mark.timeout(180)
def test_bad_settings_exit_78_with_one_line(tmp_path: Path, figures: Figures) -> None:
    results = run_config_cases(CONFIG_CASES, tmp_path)
    failed = verdicts({c.name: (c.bug, config_problems(c, r))
                       for c, r in zip(CONFIG_CASES, results, strict=True)})
    figures("bad_input_settings", {"cases": len(CONFIG_CASES), "failed": sorted(failed),
                                   "open_bugs": [c.name for c in CONFIG_CASES if c.bug]})
    assert failed == {}, json.dumps(failed, indent=1)


# -- the docs -----------------------------------------------------------------------------------


def test_the_docs_table_matches_the_cases() -> None:
    assert len(STORE_CASES) >= 30
    assert DOC.exists(), "run: .venv/bin/python -m tests.reliability.corpus"
    assert DOC.read_text(encoding="utf-8") == render_markdown(), (
        "docs/bad-input.md is out of date; run: .venv/bin/python -m tests.reliability.corpus")
