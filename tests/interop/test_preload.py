"""The suite's own plumbing: preload.mjs sends Qwen's hosts to the fake and nothing anywhere else.

If this fails, every other interop result is suspect: OpenClaw may be talking to the real Qwen
or to the internet.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from qwen_refresher.testing.fake_qwen import QWEN_CLIENT_ID, FakeQwen
from tests.interop.openclaw import OpenClaw

pytestmark = pytest.mark.interop

SCRIPT = """
const out = {};
const form = new URLSearchParams({grant_type: "refresh_token", refresh_token: process.argv[1],
                                  client_id: process.argv[2]});
const r = await fetch("https://chat.qwen.ai/api/v1/oauth2/token", {method: "POST", body: form,
  headers: {"Content-Type": "application/x-www-form-urlencoded", Accept: "application/json"}});
out.token = [r.status, Object.keys(await r.json()).sort()];
for (const url of ["https://example.com/", "https://registry.npmjs.org/", "http://10.0.0.1/"]) {
  try { await fetch(url); out[url] = "reached"; } catch (e) { out[url] = String(e.cause?.code); }
}
const dns = await import("node:dns");
out.dns = await dns.promises.lookup("example.com").then(() => "resolved", e => e.code);
const https = await import("node:https");
out.https = await new Promise(done => https.get("https://example.com/", () => done("reached"))
  .on("error", e => done(e.code)));
console.log(JSON.stringify(out));
"""


def test_qwen_goes_to_the_fake_and_everything_else_is_refused(
        openclaw: OpenClaw, fake: FakeQwen) -> None:
    _, refresh, _ = fake.issue_tokens()
    done = subprocess.run(
        [str(openclaw.install.node), "--input-type=module", "-e", SCRIPT, refresh,
         QWEN_CLIENT_ID],
        env=openclaw.env(), cwd=openclaw.cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)

    assert out["token"] == [200, ["access_token", "expires_in", "refresh_token", "resource_url",
                                  "token_type"]]
    assert [(r.refresh_token, r.outcome) for r in fake.refresh_requests()] == [(refresh, "ok")]
    assert out["https://example.com/"] == "ECONNREFUSED"
    assert out["https://registry.npmjs.org/"] == "ECONNREFUSED"
    assert out["http://10.0.0.1/"] == "ECONNREFUSED"
    assert out["dns"] == "ENOTFOUND"
    assert out["https"] == "ECONNREFUSED"
    refused = {(e["what"], e["host"]) for e in openclaw.refused()}
    assert refused == {("fetch", "example.com"), ("fetch", "registry.npmjs.org"),
                       ("fetch", "10.0.0.1"), ("dns.promises.lookup", "example.com"),
                       ("socket connect", "example.com")}
    openclaw.net_log.unlink()  # refused on purpose: the fixture's own check must pass
