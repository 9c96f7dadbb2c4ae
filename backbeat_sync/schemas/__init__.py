"""JSON Schemas (draft 2020-12) of the two wire messages, for peers in other languages.

``beat_frame.schema.json`` and ``status_claim.schema.json`` are shipped in the
package (and copied in ``docs/schemas/``). They are open to unknown fields, as
the contract requires; the rules of the strict parser that a JSON Schema cannot
express are listed in ``docs/protocol.md``.

Example:
    >>> from backbeat_sync.schemas import load_schema
    >>> load_schema("beat_frame")["properties"]["type"]["const"]
    'backbeat.beatframe.v1'
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Final, Literal

__all__ = ["SCHEMA_FILES", "load_schema"]

#: Message kind -> file name in this package.
SCHEMA_FILES: Final = {"beat_frame": "beat_frame.schema.json", "status_claim": "status_claim.schema.json"}


def load_schema(kind: Literal["beat_frame", "status_claim"]) -> dict[str, Any]:
    """The JSON Schema of a wire message, as a dict.

    Args:
        kind: ``"beat_frame"`` or ``"status_claim"``.

    Returns:
        The schema (a fresh dict each call).

    Raises:
        KeyError: an unknown kind.
    """
    text = resources.files(__name__).joinpath(SCHEMA_FILES[kind]).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
