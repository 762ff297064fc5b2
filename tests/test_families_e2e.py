"""Token families across stores: one refresh per rotation, every member written."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from qwen_refresher.testing.fake_qwen import FakeQwen
from tests.harness import (
    DaemonProcess,
    OpenClawHome,
    all_tokens,
    assert_no_secrets,
    qwen_profile,
    wait_for,
)


def qwen_code_doc(access: str, refresh: str, expires: int) -> dict[str, object]:
    return {"access_token": access, "token_type": "Bearer", "refresh_token": refresh,
            "resource_url": "portal.qwen.ai", "expiry_date": expires}


def seed_family(oc: OpenClawHome, fake: FakeQwen, lifetime: float) -> list[Path]:
    access, refresh, expires = fake.issue_tokens(lifetime=lifetime)
    paths = []
    for agent in ("main", "work"):
        paths.append(oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, expires)}}, agent=agent))
    creds = oc.home / ".qwen" / "oauth_creds.json"
    creds.parent.mkdir(mode=0o700)
    creds.write_text(json.dumps(qwen_code_doc(access, refresh, expires), indent=2))
    os.chmod(creds, 0o600)
    paths.append(creds)
    return paths


def refresh_of(path: Path) -> str:
    doc = json.loads(path.read_bytes())
    if "profiles" in doc:
        return str(doc["profiles"]["qwen-portal:default"]["refresh"])
    return str(doc["refresh_token"])


def test_one_refresh_per_rotation_for_the_whole_family(oc: OpenClawHome, fake: FakeQwen) -> None:
    fake.configure(lifetime=2.0)
    paths = seed_family(oc, fake, lifetime=2.0)
    with DaemonProcess(oc, fake, margin="1.5") as daemon:
        wait_for(lambda: len(fake.refresh_requests()) >= 3, 20, "three rotations", daemon)
        wait_for(lambda: {refresh_of(p) for p in paths} == {fake.issued[-1].refresh_token}, 5,
                 "every member on the newest token", daemon)
    rotations = [t for t in fake.issued if t.via == "refresh"]
    assert len(fake.refresh_requests()) == len(rotations)
    assert fake.reuse_count == 0, "no refresh token was ever used twice"
    creds = json.loads(paths[2].read_text())
    assert set(creds) >= {"access_token", "token_type", "refresh_token", "resource_url",
                          "expiry_date"}
    assert paths[2].stat().st_mode & 0o777 == 0o600
    assert_no_secrets([daemon.output], all_tokens(fake))


def test_qwen_codes_lock_delays_the_write(oc: OpenClawHome, fake: FakeQwen) -> None:
    paths = seed_family(oc, fake, lifetime=3)
    lock = paths[2].parent / "oauth_creds.lock"
    lock.write_text(str(uuid.uuid4()))  # fresh mtime: not stale for 10 s
    with DaemonProcess(oc, fake, margin="2.5") as daemon:
        time.sleep(2.5)
        assert fake.refresh_requests() == [], "the family waits for every member's lock"
        lock.unlink()
        wait_for(lambda: len(fake.refresh_requests()) == 1, 10, "the refresh", daemon)
        wait_for(lambda: {refresh_of(p) for p in paths} == {fake.issued[-1].refresh_token}, 5,
                 "all members written", daemon)


def test_a_stale_qwen_code_lock_is_taken_over_by_its_own_rule(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    paths = seed_family(oc, fake, lifetime=3)
    lock = paths[2].parent / "oauth_creds.lock"
    lock.write_text(str(uuid.uuid4()))
    old = time.time() - 11
    os.utime(lock, (old, old))
    with DaemonProcess(oc, fake, margin="2.5") as daemon:
        wait_for(lambda: len(fake.refresh_requests()) == 1, 10, "the refresh", daemon)
        wait_for(lambda: refresh_of(paths[2]) == fake.issued[-1].refresh_token, 5,
                 "Qwen Code's file written", daemon)


def test_a_rotation_by_another_program_propagates_without_a_server_call(
        oc: OpenClawHome, fake: FakeQwen) -> None:
    paths = seed_family(oc, fake, lifetime=20)
    fake.inject("503", count=1000)  # our refreshes fail, so the family stays due...
    with DaemonProcess(oc, fake, margin="15") as daemon:
        daemon.wait_event("refresh_failed", timeout=15)
        # ...and Qwen Code, refreshing by itself, gets through and writes its file.
        access, refresh, expires = fake.issue_tokens(lifetime=3600)
        paths[2].write_text(json.dumps(qwen_code_doc(access, refresh, expires), indent=2))
        fake.clear_faults()
        wait_for(lambda: all(refresh_of(p) == refresh for p in paths[:2]), 10,
                 "the other members copied", daemon)
        daemon.wait_event("rotated_elsewhere")
        time.sleep(1)
    assert [r for r in fake.refresh_requests() if r.status == 200] == []
    assert not any(r.refresh_token == refresh for r in fake.refresh_requests())


def test_a_new_login_in_one_place_splits_the_family(oc: OpenClawHome, fake: FakeQwen) -> None:
    paths = seed_family(oc, fake, lifetime=3600)
    shared = refresh_of(paths[0])
    with DaemonProcess(oc, fake, margin="60") as daemon:
        daemon.wait_event("started")
        access, refresh, expires = fake.issue_tokens(lifetime=3600)
        oc.write_store({"version": 1, "profiles": {
            "qwen-portal:default": qwen_profile(access, refresh, expires)}}, agent="work")
        daemon.wait_event("family_split")
        time.sleep(1)
        state = json.loads((oc.our_state / "state.json").read_text())
    assert refresh_of(paths[0]) == shared and refresh_of(paths[2]) == shared
    assert refresh_of(paths[1]) == refresh
    families = {p["store"].split("/")[-3] if "agents" in p["store"] else "qwen": p["family"]
                for p in state["profiles"]}
    assert families["main"] == families["qwen"] != families["work"]
    assert fake.refresh_requests() == []
