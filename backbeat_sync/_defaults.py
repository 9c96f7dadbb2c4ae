"""The process-default integration that ``@beat_budget`` and ``track_operation`` use.

It is the first integration started, unless one is set with
:func:`set_default_integration` (which returns a context manager that restores
the previous default when used in a ``with``).
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .integration import Integration

__all__ = ["DefaultIntegration", "get_default_integration", "set_default_integration"]

_lock = threading.Lock()
_default: Integration | None = None
_explicit = False


def get_default_integration() -> Integration | None:
    """The process-default integration, or None (whether or not it is running)."""
    return _default


class DefaultIntegration:
    """Returned by :func:`set_default_integration`; as a context manager it restores the old default."""

    def __init__(self, previous: Integration | None, previous_explicit: bool) -> None:
        self._previous = previous
        self._previous_explicit = previous_explicit

    def __enter__(self) -> DefaultIntegration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _default, _explicit
        with _lock:
            _default, _explicit = self._previous, self._previous_explicit


def set_default_integration(integration: Integration | None) -> DefaultIntegration:
    """Make ``integration`` the process default (None: back to "the first started").

    Returns:
        A handle; ``with set_default_integration(i): ...`` restores the previous default on exit.

    Example:
        >>> from backbeat_sync import set_default_integration
        >>> with set_default_integration(None):
        ...     pass
    """
    global _default, _explicit
    with _lock:
        handle = DefaultIntegration(_default, _explicit)
        _default, _explicit = integration, integration is not None
    return handle


def _started(integration: Integration) -> None:
    global _default
    with _lock:
        if _default is None or (not _explicit and not _default.running):
            _default = integration


def _stopped(integration: Integration) -> None:
    global _default
    with _lock:
        if _default is integration and not _explicit:
            _default = None
