"""``python -m qwen_refresher.testing.fake_qwen``: the fake as a process (see ``cli``)."""

import sys

from .cli import main

sys.exit(main())
