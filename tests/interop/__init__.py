"""The interop suite: qwen-refresher against the real OpenClaw 2026.3.24 (docs/interop.md)."""
