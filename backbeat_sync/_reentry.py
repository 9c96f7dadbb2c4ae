"""Whether the calling thread is inside library code: a signal handler's view of the stack.

A Python signal handler runs on the main thread between two bytecodes of
whatever the main thread was doing, so a handler that calls
``Integration.stop()`` may run while that thread is inside a library call and
holds one of its locks (the registry's, in ``complete_p2p_operation`` or a
``track_operation`` exit). Waiting there for another thread that needs the
same lock, or taking it again, deadlocks. :func:`inside_library` tells
``stop()`` so: it then hands the work to a helper thread instead of doing it
(see ``Integration.stop``).

The test is the stack itself: any frame of this package's code, other than the
few marked :func:`lock_free` (frames that never hold a library lock and from
which user code is called), means the thread may hold a lock. Nothing is
counted on the hot paths; the walk costs a few microseconds, once per
``stop()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, Final, TypeVar

__all__ = ["inside_library", "lock_free"]

F = TypeVar("F", bound=Callable[..., Any])

_PACKAGE: Final = __name__.rpartition(".")[0]
#: Modules of the package that are applications of the public API (they hold no lock
#: the integration's threads wait for): the command line and the dashboard (its demo
#: agents stop their integrations). A stop() called from them runs there and then.
_APPLICATION_PREFIXES: Final = (f"{_PACKAGE}.cli", f"{_PACKAGE}.__main__", f"{_PACKAGE}.dashboard")
_lock_free: set[CodeType] = set()


def lock_free(fn: F) -> F:
    """Mark ``fn`` as a frame that holds no library lock anywhere in its body.

    Only for functions that call user code (a budgeted call, a callback loop)
    or ``stop()`` itself; a signal landing anywhere in them finds no library
    lock held by them.
    """
    _lock_free.add(fn.__code__)
    return fn


def inside_library(skip: int = 1) -> bool:
    """Whether a frame of library code that may hold a lock is on the calling thread's stack.

    Args:
        skip: frames to skip above this call (1: the caller's own frame).

    Returns:
        True if some frame below the caller belongs to this package (and is not
        :func:`lock_free`, nor the command line's).
    """
    frame: FrameType | None = sys._getframe(skip + 1)
    prefix = _PACKAGE + "."
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if (
            (name == _PACKAGE or name.startswith(prefix))
            and frame.f_code not in _lock_free
            and not name.startswith(_APPLICATION_PREFIXES)
        ):
            return True
        frame = frame.f_back
    return False
