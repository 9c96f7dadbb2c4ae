"""``python -m backbeat_sync``: the ``backbeat-sync`` command (see :mod:`backbeat_sync.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
