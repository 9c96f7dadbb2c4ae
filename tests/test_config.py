"""Tests for backbeat_sync.config."""

from __future__ import annotations

import attrs
import pytest

from backbeat_sync import BackbeatConfig, BackbeatError, ConfigError
from backbeat_sync.config import mask_url, valid_token


def test_defaults_follow_the_seed() -> None:
    """Defaults are the seed document's: enabled, chorus-production, backbeat-nats:4222, 2 BPM, 8 beats."""
    cfg = BackbeatConfig()
    assert cfg.enabled is True
    assert cfg.cluster_id == "chorus-production"
    assert cfg.nats_url == "nats://backbeat-nats:4222"
    assert cfg.tempo_bpm == 2.0
    assert cfg.bar_length == 4
    assert cfg.health_every_beats == 8
    assert cfg.agent_id.startswith("chorus-")
    assert valid_token(cfg.agent_id)


def test_config_is_frozen() -> None:
    """A config cannot be changed after construction; evolve() makes a validated copy."""
    cfg = BackbeatConfig(agent_id="a")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.agent_id = "b"  # type: ignore[misc]
    assert cfg.evolve(agent_id="b").agent_id == "b"
    with pytest.raises(ConfigError):
        cfg.evolve(agent_id="b.c")


def test_subjects_follow_the_protocol() -> None:
    """Beat and status subjects are backbeat.beat.{cluster} and backbeat.status.{cluster}.{agent}."""
    cfg = BackbeatConfig(cluster_id="chorus-dev", agent_id="alice")
    assert cfg.beat_subject_for() == "backbeat.beat.chorus-dev"
    assert cfg.status_subject_for() == "backbeat.status.chorus-dev.alice"


def test_subject_templates_can_be_overridden() -> None:
    """Subject templates are user-overridable and validated."""
    cfg = BackbeatConfig(cluster_id="c", agent_id="a", status_subject="claims.{agent_id}")
    assert cfg.status_subject_for() == "claims.a"
    with pytest.raises(ConfigError, match="status_subject"):
        BackbeatConfig(status_subject="claims.{nope}")
    with pytest.raises(ConfigError, match="beat_subject"):
        BackbeatConfig(beat_subject="beats.*")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("agent_id", "has.dot"),
        ("agent_id", "has space"),
        ("agent_id", ""),
        ("agent_id", "star*"),
        ("cluster_id", "gt>"),
        ("cluster_id", 5),
        ("tempo_bpm", 0),
        ("tempo_bpm", -1.0),
        ("tempo_bpm", 6001),
        ("tempo_bpm", float("nan")),
        ("tempo_bpm", True),
        ("bar_length", 0),
        ("bar_length", 2.5),
        ("health_every_beats", 0),
        ("enabled", "yes"),
        ("nats_url", "http://x:4333"),
        ("nats_url", "backbeat-nats:4333"),
        ("nats_url", ""),
        ("nats_url", "nats://"),
        ("nats_url", "nats://h:99999"),
        ("nats_url", "local://,nats://h:1"),
        ("connect_timeout", 0),
        ("outbox_limit", 0),
        ("token", ""),
    ],
)
def test_bad_values_are_refused_naming_the_field(field: str, value: object) -> None:
    """Every invalid value raises ConfigError (a BackbeatError and ValueError) naming the field."""
    with pytest.raises(ConfigError) as info:
        BackbeatConfig(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, BackbeatError)
    assert isinstance(info.value, ValueError)


def test_url_lists_and_schemes() -> None:
    """nats_url takes a comma-separated server list; local:// selects the in-process pulse."""
    cfg = BackbeatConfig(nats_url="nats://a:4333, tls://b:4223,ws://c:80")
    assert cfg.servers == ["nats://a:4333", "tls://b:4223", "ws://c:80"]
    assert not cfg.is_local
    assert BackbeatConfig(nats_url="local://").is_local
    assert BackbeatConfig(nats_url="local://bus?pulse=manual").is_local


def test_from_env_reads_the_seed_variables() -> None:
    """from_env reads CHORUS_BACKBEAT_* with the seed's defaults, and overrides win."""
    env = {
        "CHORUS_BACKBEAT_ENABLED": "false",
        "CHORUS_BACKBEAT_CLUSTER_ID": "chorus-dev",
        "CHORUS_BACKBEAT_AGENT_ID": "chorus-dev-alice",
        "CHORUS_BACKBEAT_NATS_URL": "nats://localhost:4333",
        "CHORUS_BACKBEAT_TEMPO_BPM": "120",
        "CHORUS_BACKBEAT_BAR_LENGTH": "3",
    }
    cfg = BackbeatConfig.from_env(env, agent_id="override")
    assert cfg.enabled is False
    assert cfg.cluster_id == "chorus-dev"
    assert cfg.agent_id == "override"
    assert cfg.nats_url == "nats://localhost:4333"
    assert cfg.tempo_bpm == 120.0
    assert cfg.bar_length == 3
    assert BackbeatConfig.from_env({}).cluster_id == "chorus-production"


@pytest.mark.parametrize("raw", ["true", "1", "YES", "on", " True "])
def test_enabled_truthy_spellings(raw: str) -> None:
    """ENABLED accepts the usual spellings of true."""
    assert BackbeatConfig.from_env({"CHORUS_BACKBEAT_ENABLED": raw}).enabled is True


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CHORUS_BACKBEAT_ENABLED", "maybe"),
        ("CHORUS_BACKBEAT_AGENT_ID", "has.dot"),
        ("CHORUS_BACKBEAT_AGENT_ID", "has space"),
        ("CHORUS_BACKBEAT_CLUSTER_ID", ""),
        ("CHORUS_BACKBEAT_NATS_URL", "redis://x:1"),
        ("CHORUS_BACKBEAT_TEMPO_BPM", "0"),
        ("CHORUS_BACKBEAT_TEMPO_BPM", "fast"),
        ("CHORUS_BACKBEAT_BAR_LENGTH", "4.5"),
    ],
)
def test_from_env_errors_name_the_variable_and_value(var: str, value: str) -> None:
    """A variable that cannot be read raises ConfigError naming the variable and the bad value."""
    with pytest.raises(ConfigError) as info:
        BackbeatConfig.from_env({var: value})
    assert info.value.field == var
    assert var in str(info.value)
    assert repr(value) in str(info.value) or value in str(info.value)


def test_unknown_override_is_refused() -> None:
    """An override that is not a field is a ConfigError, not a TypeError deep inside attrs."""
    with pytest.raises(ConfigError, match="overrides"):
        BackbeatConfig.from_env({}, tempo=3)


def test_secrets_never_appear_in_repr_or_errors() -> None:
    """Passwords, tokens and seeds are masked in repr(), and URL passwords in errors."""
    cfg = BackbeatConfig(
        nats_url="nats://bob:hunter2@h:4333",
        token="s3cret-token",
        password="pw-secret",
        nkey_seed="SUAMYSEED",
    )
    text = repr(cfg)
    for secret in ("hunter2", "s3cret-token", "pw-secret", "SUAMYSEED"):
        assert secret not in text
    assert "bob:***@h:4333" in text
    with pytest.raises(ConfigError) as info:
        BackbeatConfig(nats_url="nats://bob:hunter2@h:4333,redis://x:1")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as info2:
        BackbeatConfig.from_env({"CHORUS_BACKBEAT_NATS_PASSWORD": ""})
    assert info2.value.field == "CHORUS_BACKBEAT_NATS_PASSWORD"


def test_mask_url() -> None:
    """mask_url hides passwords and bare tokens in each URL of a list."""
    assert mask_url("nats://u:p@h:1,nats://h2:2") == "nats://u:***@h:1,nats://h2:2"
    assert mask_url("nats://tok@h:1") == "nats://***@h:1"
    assert mask_url("nats://h:1") == "nats://h:1"


def test_from_env_defaults_apply_only_where_env_is_silent() -> None:
    """defaults= fills fields the environment does not set; the environment wins over it."""
    cfg = BackbeatConfig.from_env({}, defaults={"nats_url": "local://", "tempo_bpm": 120})
    assert (cfg.nats_url, cfg.tempo_bpm) == ("local://", 120)
    env = {"CHORUS_BACKBEAT_NATS_URL": "nats://h:1"}
    assert BackbeatConfig.from_env(env, defaults={"nats_url": "local://"}).nats_url == "nats://h:1"


def test_mask_url_never_raises_on_a_bad_port() -> None:
    """A URL with an impossible port is masked as written (the error about the port comes later)."""
    assert mask_url("nats://u:secret@h:99999") == "nats://u:***@h:99999"
    with pytest.raises(ConfigError) as info:
        BackbeatConfig(nats_url="nats://u:secret@h:99999")
    assert "secret" not in str(info.value)
