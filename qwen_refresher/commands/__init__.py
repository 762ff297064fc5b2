"""The subcommands' command-line halves: parse the arguments, call the part of the package that
knows, render what it returns. One module per command (``status``, ``service`` for
install-/uninstall-service, ``config``, ``demo``, ``fleet``); ``cli.py`` imports only the one
that runs, so ``status`` never pays for another command's imports.

What each command works on lives outside: ``status.py`` (the rows), ``service/`` (the unit and
the install steps), ``config.py`` and ``settings_core.py`` (settings), ``published.py`` (the
state file and the rows' one constructor), ``report.py`` (verdicts and exit codes).
"""
