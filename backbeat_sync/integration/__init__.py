"""The :class:`Integration` and its parts (see :mod:`.base` for the layout)."""

from __future__ import annotations

from typing import Final

from .base import IntegrationState
from .facade import Integration
from .health import HEALTH_FIELDS, Health, HealthField

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = ["HEALTH_FIELDS", "Health", "HealthField", "Integration", "IntegrationState"]
