"""What ``BackbeatConfig.from_env`` reads is what its docstring and docs/configuration.md list;
a missing extra's error names this project's extra.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from backbeat_sync import BackbeatConfig, ConfigError
from backbeat_sync.config import ENV_PREFIX
from backbeat_sync.transport.nats.options import connect_options

ROOT = Path(__file__).resolve().parent.parent


class RecordingEnv(Mapping[str, str]):
    """An empty environment that records every variable asked for (``get``, ``[]``, ``in``)."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_read() -> set[str]:
    """The CHORUS_BACKBEAT_* variables from_env looks up, found by asking it."""
    env = RecordingEnv()
    BackbeatConfig.from_env(env)
    assert env.asked, "from_env read nothing from the mapping it was given"
    assert all(name.startswith(ENV_PREFIX) for name in env.asked), env.asked
    return {name[len(ENV_PREFIX) :] for name in env.asked}


def test_the_from_env_docstring_lists_every_variable_read() -> None:
    """The docstring's "Variables read" paragraph names exactly the variables from_env reads."""
    doc = BackbeatConfig.from_env.__doc__ or ""
    paragraph = doc[doc.index("Variables read") :]
    listed = set(re.findall(r"``([A-Z][A-Z0-9_]*)``", paragraph)) - {ENV_PREFIX}
    assert listed == variables_read()


def test_the_configuration_docs_list_every_variable_read() -> None:
    """docs/configuration.md's table has a row for each variable from_env reads, and no other."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `" + ENV_PREFIX + r"([A-Z0-9_]+)` \|", text, flags=re.MULTILINE))
    assert rows == variables_read()


@pytest.mark.parametrize("field", ["nkey_seed", "creds_file"])
def test_the_missing_nkeys_error_names_this_projects_extra(
    field: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the nkeys package, a seed or creds file is a ConfigError saying
    pip install 'backbeat_sync[nkeys]' (the extra in setup.cfg), as the other extras' errors do."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "nkeys" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    creds = tmp_path / "agent.creds"
    creds.write_text("not read", encoding="utf-8")
    value = "SUAEXAMPLESEED" if field == "nkey_seed" else str(creds)
    cfg = BackbeatConfig(nats_url="nats://127.0.0.1:1", **{field: value})  # never connected
    with pytest.raises(ConfigError) as info:
        connect_options(cfg)
    assert info.value.field == field
    assert "pip install 'backbeat_sync[nkeys]'" in str(info.value)
    assert "nats-py[nkeys]" not in str(info.value)
    assert "nkeys =" in (ROOT / "setup.cfg").read_text(encoding="utf-8")  # the extra it names exists
