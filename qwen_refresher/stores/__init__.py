"""Store adapters: one module per file format, all speaking ``stores.base.Store``.

Adding a third format is one new module plus one line in ``STORE_KINDS``; nothing in the
engine or the daemon knows which formats exist. Stdlib only (``status`` reads stores).
"""

from __future__ import annotations

from .base import ProfileRecord, Store, StoreSnapshot
from .openclaw import OpenClawStore
from .qwen_code import QwenCodeStore

STORE_KINDS: dict[str, type[Store]] = {
    OpenClawStore.kind: OpenClawStore,
    QwenCodeStore.kind: QwenCodeStore,
}

__all__ = ["STORE_KINDS", "OpenClawStore", "ProfileRecord", "QwenCodeStore", "Store",
           "StoreSnapshot"]
