"""Names we do not choose: profile ids and agent directory names, printed, scraped and pasted.

A profile id is any JSON string (a lone surrogate included) and an agent id is a directory
name (any bytes but ``/`` and NUL, so not always UTF-8). These names reach ``/metrics`` (whose
label values must be UTF-8, or the whole scrape fails for every profile), ``status`` on a
terminal (where ``ESC ]52;`` writes the clipboard and ``ESC [2J`` clears the screen) and the
"run this command to log in" text (which people paste into a shell). One function per purpose
lives in ``qwen_refresher.escape``: ``printable`` for people and labels, ``shell_join`` for
commands.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qwen_refresher.escape import printable, shell_join, shell_quote
from qwen_refresher.hooks import hook_variables
from qwen_refresher.notify import Notice
from qwen_refresher.stores import OpenClawStore
from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.adversarial.registry import Case, case, params
from tests.harness import ROOT, DaemonProcess, OpenClawHome, qwen_profile, wait_for

HOUR = 3600.0
#: The bytes a terminal must never receive raw from a name: ESC, BEL, CR, the C1 CSI.
RAW_CONTROLS = ("\x1b", "\x07", "\r", "\x9b", "\x00")
OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # write "echo pwned" into the clipboard
CLEAR = "\x1b[2J\x1b[H"
INJECTION = "ops;curl x|sh;#"


def agent_store(oc: OpenClawHome, agent: bytes | str, doc: dict[str, object]) -> Path:
    """A store under an agent directory whose name may not be UTF-8 (made with bytes paths)."""
    root = os.fsencode(oc.state / "agents")
    name = agent if isinstance(agent, bytes) else agent.encode()
    os.makedirs(os.path.join(root, name, b"agent"), mode=0o700, exist_ok=True)
    path = os.path.join(root, name, b"agent", b"auth-profiles.json")
    with open(path, "wb") as fh:
        fh.write(json.dumps(doc, indent=2).encode())  # ensure_ascii: "\ud800" stays an escape
    os.chmod(path, 0o600)
    return Path(os.fsdecode(path))


def store_doc(fake: FakeQwen, *ids: str, lifetime: float = 6 * HOUR) -> dict[str, object]:
    profiles = {}
    for pid in ids:
        access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
        profiles[pid] = qwen_profile(access, refresh, expires)
    return {"version": 1, "profiles": profiles}


def status_cli(oc: OpenClawHome, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = oc.env()
    env.pop("QWEN_REFRESHER_LOG_FORMAT", None)
    return subprocess.run([sys.executable, "-m", "qwen_refresher", "status", *args], cwd=ROOT,
                          env=env, capture_output=True, timeout=30)


def assert_terminal_safe(out: bytes) -> str:
    """Decodes as UTF-8 (strictly) and holds no control character a name could have brought."""
    text = out.decode("utf-8")
    for ch in RAW_CONTROLS:
        assert ch not in text, f"raw {ch!r} reached the terminal"
    assert "Traceback" not in text
    return text


# -- the escaping functions themselves ---------------------------------------------------------


@pytest.mark.adversarial
@case("names-printable-function", "names",
      "ids with ESC, BEL, CR, C1, bidi overrides, lone surrogates and undecodable bytes",
      "printable() writes every non-printable character as a visible escape, valid UTF-8")
def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    assert printable("qwen-portal:default") == "qwen-portal:default"
    assert printable("agents/å/ü 日本") == "agents/å/ü 日本"  # printable text is left alone
    assert printable(OSC52) == "\\x1b]52;c;ZWNobyBwd25lZA==\\x07"
    assert printable("a\rb\nc\td") == "a\\rb\\nc\\td"
    assert printable("\x9b2J") == "\\x9b2J"
    assert printable("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # right-to-left override
    assert printable("\ud800x") == "\\ud800x"
    assert printable(os.fsdecode(b"\xff\xfe")) == "\\xff\\xfe"  # the bytes as they are on disk
    for text in (OSC52, "\ud800", os.fsdecode(b"\xff"), "\udfff\x00"):
        printable(text).encode("utf-8")  # never raises


@pytest.mark.adversarial
@case("names-shell-quote-function", "names",
      "a name with ; | $() ` quotes, newlines, control bytes or non-UTF-8 bytes in a command",
      "shell_quote() is shlex.quote, or $'...' with \\xNN escapes when a byte is not printable")
@pytest.mark.parametrize("arg", [
    INJECTION, "$(touch pwned)", "`id`", "it's", "a b", "", "-n", "x\ny", OSC52, "tab\there",
    os.fsdecode(b"\xff\xfeops"), "back\\slash'quote",
])
def test_shell_quote_round_trips_through_bash(arg: str, tmp_path: Path) -> None:
    quoted = shell_quote(arg)
    assert printable(quoted) == quoted, "the quoted form itself is safe on a terminal"
    # bash parses the quoted word back into exactly the original bytes, running nothing.
    out = subprocess.run(["bash", "-c", f"printf %s {quoted}"], cwd=tmp_path,
                         capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == os.fsencode(arg)
    assert list(tmp_path.iterdir()) == []
    if arg.isprintable():
        assert shlex.split(shell_join(["cmd", arg])) == ["cmd", arg]


# -- /metrics ------------------------------------------------------------------------------


METRICS = [
    Case("names-metrics-lone-surrogate", "names",
         'a profile id "qwen-portal:\\ud800" (a lone surrogate, valid JSON) in one store',
         "label values go through printable(): /metrics stays 200 and UTF-8 for everyone"),
    Case("names-metrics-non-utf8-agent-dir", "names",
         "an agent directory whose name is the bytes ff fe (not UTF-8)",
         "the store path label is escaped (\\xff\\xfe); the scrape still succeeds"),
    Case("names-metrics-escape-codes", "names",
         "an agent dir and a profile id holding OSC 52, clear-screen, CR and BEL",
         "escaped in labels, so a scrape shown in a terminal or UI cannot act on them"),
]


@pytest.mark.adversarial
@pytest.mark.parametrize("c", params(METRICS))
def test_metrics_survive_hostile_names(oc: OpenClawHome, fake: FakeQwen, c: Case) -> None:
    oc.write_store(store_doc(fake, "qwen-portal:default"))  # the healthy neighbour
    if c.name.endswith("lone-surrogate"):
        agent_store(oc, "work", store_doc(fake, "qwen-portal:\ud800"))
    elif c.name.endswith("non-utf8-agent-dir"):
        agent_store(oc, b"\xff\xfe", store_doc(fake, "qwen-portal:default"))
    else:
        agent_store(oc, "x" + OSC52 + CLEAR, store_doc(fake, "qwen-portal:\r" + OSC52))
    with DaemonProcess(oc, fake, env=oc.env(QWEN_REFRESHER_LISTEN="127.0.0.1:0"),
                       margin="900") as daemon:
        port = daemon.wait_event("health_listening")["address"].rsplit(":", 1)[1]
        wait_for(lambda: (oc.our_state / "state.json").exists(), 20, "a first publish", daemon)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode("utf-8")  # strict: a stray surrogate would raise
        expiry = [line for line in body.splitlines()
                  if line.startswith("qwen_refresher_token_expiry_timestamp_seconds{")]
        assert len(expiry) == 2, expiry  # both profiles, the healthy one included
        for ch in RAW_CONTROLS:
            assert ch not in body
        if c.name.endswith("non-utf8-agent-dir"):
            assert "\\\\xff\\\\xfe" in body  # the label value, with prometheus' own escaping
        assert daemon.proc.poll() is None


# -- status on a terminal ------------------------------------------------------------------


STATUS = [
    Case("names-status-escape-codes", "names",
         "an agent dir and profile id with OSC 52 (clipboard write), ESC[2J, CR and BEL",
         "status prints them as visible \\x1b... escapes; nothing raw reaches the terminal"),
    Case("names-status-lone-surrogate", "names",
         "a profile id with a lone surrogate, printed by status",
         "escaped to \\udXXX: no UnicodeEncodeError traceback, other rows still shown"),
    Case("names-status-non-utf8-agent-dir", "names",
         "an agent dir whose name is not UTF-8, printed by status",
         "the undecodable bytes are shown as \\xNN; JSON output stays valid"),
]


@pytest.mark.adversarial
@pytest.mark.parametrize("c", params(STATUS))
def test_status_prints_hostile_names_visibly(oc: OpenClawHome, fake: FakeQwen, c: Case) -> None:
    oc.write_store(store_doc(fake, "qwen-portal:default"))
    if c.name.endswith("escape-codes"):
        agent_store(oc, "x" + OSC52 + CLEAR, store_doc(fake, "qwen-portal:\r" + OSC52))
        shown = "\\x1b]52;c;"
    elif c.name.endswith("lone-surrogate"):
        agent_store(oc, "work", store_doc(fake, "qwen-portal:\ud800"))
        shown = "qwen-portal:\\ud800"
    else:
        agent_store(oc, b"\xff\xfe", store_doc(fake, "qwen-portal:default"))
        shown = "agents/\\xff\\xfe/agent"
    text = status_cli(oc, "--no-color")
    assert text.returncode == 3, text.stderr.decode(errors="replace")[-2000:]
    out = assert_terminal_safe(text.stdout)
    assert shown in out
    assert "~/.openclaw/agents/main/agent/auth-profiles.json" in out  # the neighbour
    assert_terminal_safe(text.stderr)
    doc = status_cli(oc, "--json")
    assert doc.returncode == 3
    assert len(json.loads(assert_terminal_safe(doc.stdout))["profiles"]) == 2


# -- printed commands -----------------------------------------------------------------------


@pytest.mark.adversarial
@case("names-login-command-injection", "names",
      "an agent directory named 'ops;curl x|sh;#' whose token is rejected (needs login)",
      "the printed 'openclaw models --agent ...' command quotes it with shlex.quote")
def test_login_command_is_quoted_end_to_end(oc: OpenClawHome, fake: FakeQwen) -> None:
    doc = store_doc(fake, "qwen-portal:default", lifetime=1)
    refresh = doc["profiles"]["qwen-portal:default"]["refresh"]  # type: ignore[index]
    fake.reject_token(refresh)
    agent_store(oc, INJECTION, doc)
    with DaemonProcess(oc, fake, env=oc.env()) as daemon:
        daemon.wait_event("needs_login")
        wait_for(lambda: status_cli(oc, "--quiet").returncode == 2, 20, "needs_login", daemon)
        text = assert_terminal_safe(status_cli(oc, "--no-color").stdout)
        published = json.loads(status_cli(oc, "--json").stdout)
    command = published["profiles"][0]["login_command"]
    expected = ["openclaw", "models", "--agent", INJECTION, "auth", "login", "--provider",
                "qwen-portal"]
    assert shlex.split(command) == expected
    assert f"(or `{command}`)" in text
    logged = [e for e in daemon.events() if e.get("event") == "needs_login"]
    assert logged
    assert all(shlex.split(c) == expected for e in logged for c in e["alternatives"])
    for e in logged:  # qwen-refresher's own login leads, its store path quoted too
        words = shlex.split(e["run"])
        assert words[:4] == ["qwen-refresher", "login", "--store", words[3]]
        assert INJECTION in words[3] and words[4:] == ["--profile", "qwen-portal:default"]
        assert f"run `{e['run']}`" in text


@pytest.mark.adversarial
@case("names-login-command-control-bytes", "names",
      "an agent dir with ESC and non-UTF-8 bytes in the 'log in again' command",
      "quoted as $'...' with \\xNN escapes: pastes back to the exact directory, no raw ESC")
def test_login_command_with_unprintable_agent(tmp_path: Path) -> None:
    for agent in ("x" + OSC52, os.fsdecode(b"\xff\xfe")):
        store = OpenClawStore(tmp_path / "agents" / agent / "agent" / "auth-profiles.json")
        command = store.login_command("qwen-portal:default")
        assert printable(command) == command
        word = command.split(" --agent ", 1)[1].split(" ", 1)[0]
        out = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True,
                             timeout=10)
        assert out.stdout == os.fsencode(agent)


@pytest.mark.adversarial
@case("names-notice-commands", "names",
      "a store path and profile id with ';', '$(...)', ESC and a lone surrogate in a notice",
      "the notice's commands are shell_join()ed, its names printable(); the hook still starts")
def test_notice_text_and_hook_env_are_safe(tmp_path: Path) -> None:
    store = str(tmp_path / "agents" / INJECTION / "agent" / "auth-profiles.json")
    now = time.time()
    row = {"store": store, "store_kind": "openclaw", "agent": INJECTION,
           "profile": "qwen-portal:$(id)\ud800" + OSC52, "family": None,
           "state": "needs_login", "expires_at": now - 10, "next_refresh_at": None,
           "last_refresh_at": None, "attempts": 1, "last_error": "invalid_grant",
           "login_command": OpenClawStore(Path(store)).login_command("x")}
    notice = Notice("needs_login", row, now=now)  # type: ignore[arg-type]
    for text in (notice.title(), notice.body()):
        text.encode("utf-8")
        for ch in RAW_CONTROLS:
            assert ch not in text
    assert shlex.split(notice.refresher_command())[:4] == ["qwen-refresher", "login", "--store",
                                                           store]
    env = hook_variables(notice.variables())
    out = subprocess.run(["sh", "-c", 'printf %s "$QWEN_REFRESHER_PROFILE"'],
                         env={**os.environ, **env}, capture_output=True, timeout=10)
    assert out.returncode == 0
    assert_terminal_safe(out.stdout)
    assert shlex.split(env["QWEN_REFRESHER_LOGIN_COMMAND"])[3] == INJECTION
