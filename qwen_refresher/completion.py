"""``qwen-refresher completion SHELL``: a completion script for bash, zsh or fish.

Generated from the same argparse tree the command line uses (by shtab, so flags and commands
cannot drift from the scripts), printed on demand like ``gh completion`` or ``kubectl
completion``: nothing is imported or run when you press Tab beyond the shell's own script.
"""

from __future__ import annotations

import argparse
import sys

SHELLS = ("bash", "zsh", "fish")

INSTALL = {
    "bash": "qwen-refresher completion bash > "
            "~/.local/share/bash-completion/completions/qwen-refresher",
    "zsh": "qwen-refresher completion zsh > \"${fpath[1]}/_qwen-refresher\"",
    "fish": "qwen-refresher completion fish > ~/.config/fish/completions/qwen-refresher.fish",
}


def completion_command(args: argparse.Namespace) -> int:
    import shtab

    from .cli import build_parser

    parser = build_parser()
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh, fish)",
        description="Print a completion script for SHELL. Install it with:\n  "
                    + "\n  ".join(INSTALL.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(handler=completion_command)
