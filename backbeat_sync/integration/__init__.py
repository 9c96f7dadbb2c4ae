"""The :class:`Integration` and its parts (see :mod:`.base` for the layout)."""

from __future__ import annotations

from .base import IntegrationState
from .facade import Integration
from .health import HEALTH_FIELDS, Health, HealthField

__all__ = ["HEALTH_FIELDS", "Health", "HealthField", "Integration", "IntegrationState"]
