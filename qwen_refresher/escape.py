"""Names we do not choose, made safe for where they are shown: one function per purpose.

Profile ids are any JSON string (a lone surrogate such as ``"\\ud800"`` included), agent ids
are directory names (any bytes but ``/`` and NUL; Python hands undecodable bytes over as
surrogates ``\\udc80``-``\\udcff``), and store paths are paths. Such a name may carry
``ESC ]52;`` (writes the terminal's clipboard), ``ESC [2J``, a carriage return that hides
what came before, or a right-to-left override; it may not be encodable as UTF-8 at all.

* ``printable(text)`` for people and for anything that must be UTF-8: terminals (``status``,
  ``login``), Prometheus label values, notification titles and bodies. Every character
  ``str.isprintable`` refuses is written as a visible escape (``\\x1b``, ``\\r``, ``\\u202e``,
  ``\\ud800``); undecodable bytes come out as the ``\\xNN`` they are on disk.
* ``shell_quote(arg)`` / ``shell_join(argv)`` for every command we print for someone to paste
  ("run this to log in"): ``shlex.quote``, or bash's ``$'...'`` with ``\\xNN`` escapes when an
  argument holds a byte that is not printable, so that the pasted word is the exact original
  bytes and the printed text holds no raw control character.

A hook's environment follows ``printable`` too, line by line (``hooks.env_text``).

Stdlib only and cheap to import: ``status`` uses it on every health check.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

#: Short forms for the controls people know; every other one is ``\\xNN``.
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _code(ch: str) -> str:
    """The visible escape of one non-printable character."""
    if ch in _NAMED:
        return _NAMED[ch]
    n = ord(ch)
    if 0xDC80 <= n <= 0xDCFF:  # an undecodable byte (surrogateescape): show the byte
        return f"\\x{n - 0xDC00:02x}"
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character written as a visible escape.

    The result is valid UTF-8 and holds nothing a terminal acts on. Printable text (the
    normal case) is returned unchanged, so ``qwen-portal:default`` stays as it is.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _code(ch) for ch in text)


def _raw_bytes(ch: str) -> bytes:
    """The bytes a character stands for on the command line (a lone surrogate outside the
    surrogateescape range has none: its UTF-8-like encoding is the best we can say)."""
    try:
        return ch.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return ch.encode("utf-8", "surrogatepass")


def shell_quote(arg: str) -> str:
    """One shell word that stands for exactly ``arg``; nothing in it is interpreted.

    Printable arguments get ``shlex.quote`` (POSIX single quotes). An argument with a control
    character, a lone surrogate or undecodable bytes gets ANSI-C quoting, ``$'...'`` (bash,
    zsh, ksh, POSIX.1-2024 sh), with those bytes as ``\\xNN``: single quotes would carry them
    raw to the terminal, and a person could not type them back anyway.
    """
    if arg.isprintable():
        import shlex  # only here: status prints commands only when a login is needed

        return shlex.quote(arg)
    out = []
    for ch in arg:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out += [f"\\x{b:02x}" for b in _raw_bytes(ch)]
    return "$'" + "".join(out) + "'"


def shell_join(argv: Iterable[str]) -> str:
    """A command line to print for someone to paste: every argument ``shell_quote``d."""
    return " ".join(shell_quote(arg) for arg in argv)

