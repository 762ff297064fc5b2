"""The daemon, in rooms: ``daemon`` (lifecycle, signals, events), ``jobs`` (the scheduler),
``inventory`` (stores -> views), ``families`` (views -> plans, pure), ``refresh`` (one family
job), ``outcomes``, ``publisher``, ``onrotate``, ``relogin``, ``services``; ``memory`` holds
the tables they share. See docs/architecture.md. Nothing is imported here: ``status`` and
the CLI must stay fast."""
