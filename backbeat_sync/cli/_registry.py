"""The one list of ``backbeat-sync`` commands, in the order ``--help`` shows them.

To add a command: write a module ``_NAME.py`` in this package that defines
``COMMAND = Command(name=..., help=..., epilog=..., add_arguments=..., run=...)``
(see :class:`~backbeat_sync.cli._base.Command`; ``_status.py`` is a short one),
import it here and add its ``COMMAND`` to :data:`COMMANDS`. Then name the
command and each of its flags in ``docs/cli.md`` (a test checks that) and test
it through ``main(argv)`` in ``tests/test_cli.py``.
"""

from __future__ import annotations

from typing import Final

from . import _dashboard, _demo, _monitor, _pulse, _report, _status, _streams, _tempo
from ._base import Command

COMMANDS: Final[tuple[Command, ...]] = (
    _demo.COMMAND,
    _pulse.COMMAND,
    _monitor.COMMAND,
    _dashboard.COMMAND,
    _status.COMMAND,
    _report.COMMAND,
    _tempo.COMMAND,
    _streams.COMMAND,
)
