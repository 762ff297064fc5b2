"""``python -m qwen_refresher`` is the same as the ``qwen-refresher`` command."""

import sys

from .cli import main

sys.exit(main())
