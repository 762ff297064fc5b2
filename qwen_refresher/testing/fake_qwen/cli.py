"""``python -m qwen_refresher.testing.fake_qwen``: prints ``READY <url>`` and serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import fields
from types import FrameType

from .config import (
    DEFAULT_RANDOM_KINDS,
    FakeQwenConfig,
)
from .fake import FakeQwen

# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_refresher.testing.fake_qwen",
        description="A fake Qwen OAuth server for tests, demos and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    for f in fields(FakeQwenConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "rotate":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="rotate refresh tokens (default: on)")
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(),
                                help=f"default: {f.default}")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--failure-kinds", default=",".join(DEFAULT_RANDOM_KINDS))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(message)s",
                        level=logging.DEBUG if args.verbose else logging.WARNING)
    overrides = {f.name: getattr(args, f.name) for f in fields(FakeQwenConfig)
                 if getattr(args, f.name) is not None}
    try:
        fake = FakeQwen(host=args.host, port=args.port, **overrides)
        if args.failure_rate:
            fake.set_failure_rate(args.failure_rate, args.failure_kinds.split(","), args.seed)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fake.start()
    except OSError as exc:
        print(f"fake qwen: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"READY {fake.base_url}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        fake.stop()
    return 0


