"""``qwen-refresher fleet``: set up fleet mode (docs/fleet.md).

``fleet init FILE`` writes a new fleet secret (0600, never over an existing one without
``--force``); copy the same file to every host and point ``fleet_secret_file`` at it.
``fleet check`` asks the configured etcd members whether they answer and have a leader.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..report import EX_FAILURE, EX_OK, EX_USAGE


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="fleet mode: one login on many hosts, through etcd",
                       description="Set up fleet mode (docs/fleet.md).")
    fleet_sub = p.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    init = fleet_sub.add_parser("init", help="write a new fleet secret file (0600)")
    init.add_argument("file", help="where to write it, e.g. /etc/qwen-refresher/fleet.key")
    init.add_argument("--force", action="store_true",
                      help="replace an existing secret (this starts a new fleet)")
    init.set_defaults(handler=init_command)
    check = fleet_sub.add_parser("check", help="ask every etcd member of the configured "
                                              "fleet whether it answers and has a leader")
    check.add_argument("--config", help="TOML config file")
    check.set_defaults(handler=check_command)

    def usage(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return EX_USAGE

    p.set_defaults(handler=usage)


def init_command(args: argparse.Namespace) -> int:
    from ..fleet.crypto import FleetKeys, read_secret_file, write_secret_file

    path = Path(args.file).expanduser().absolute()
    write_secret_file(path, force=args.force)
    key_id = FleetKeys(read_secret_file(path), "qwen-refresher").key_id
    print(f"wrote {path} (mode 0600, key {key_id}). Copy it to every host of the fleet and set "
          f"fleet_secret_file = \"{path}\" and fleet = \"https://etcd1:2379,...\".")
    return EX_OK


def check_command(args: argparse.Namespace) -> int:
    from ..config import load_settings
    from ..fleet.etcd import EtcdClient
    from ..fleet.runtime import fleet_config

    settings = load_settings({}, config_file=Path(args.config) if args.config else None)
    if not settings.fleet:
        print("fleet mode is off (no fleet URLs configured)", file=sys.stderr)
        return EX_FAILURE
    config = fleet_config(settings)
    client = EtcdClient(config.urls, timeout=config.timeout, ca=config.ca, cert=config.cert,
                        key=config.key, user=config.user, password=config.password)
    from ..fleet.errors import FleetUnavailable

    try:
        problems = client.status()
        try:  # a linearizable read answers only with a quorum behind it
            client.get(config.namespace.encode() + b"/health")
            quorum: str | None = None
        except FleetUnavailable as exc:
            quorum = str(exc)
    finally:
        client.close()
    for url, problem in problems:
        print(f"{url}: {problem or 'ok'}")
    print("quorum: ok" if quorum is None else f"quorum: NONE ({quorum})")
    return EX_OK if quorum is None else EX_FAILURE
