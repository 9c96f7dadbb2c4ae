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


# -- ids that would be accepted by the subject rules alone (issue 10, item 12) ----------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("cluster_id", "dev\x00prod", "control characters"),
        ("cluster_id", "x" * 10_000, "at most 256 bytes"),
        ("cluster_id", "$SYS", "must not start with '$'"),
        ("cluster_id", "$JS", "must not start with '$'"),
        ("agent_id", "team/alice", "must not contain '/'"),
        ("agent_id", "team\\alice", "must not contain '/'"),
        ("agent_id", "bell\x07", "control characters"),
    ],
)
def test_ids_that_break_subjects_files_or_claims_are_refused(field: str, value: str, says: str) -> None:
    """NUL and control characters, 10,000 characters, $-reserved names, path separators: ConfigError."""
    with pytest.raises(ConfigError) as info:
        BackbeatConfig(**{field: value})
    assert field == info.value.field
    assert says in info.value.reason
    assert len(str(info.value)) < 300  # a 10,000-character id is shown by its start and size


def test_ids_of_256_bytes_are_accepted() -> None:
    """The limit is 256 bytes of UTF-8, whatever the characters."""
    assert len(BackbeatConfig(cluster_id="c" * 256).cluster_id) == 256
    assert len(BackbeatConfig(agent_id="é" * 128).agent_id) == 128
    with pytest.raises(ConfigError, match="257 bytes"):
        BackbeatConfig(agent_id="é" * 128 + "x")


@pytest.mark.parametrize("raw", [",,", ",", "", " , "])
def test_trusted_pulse_keys_with_only_empty_items_is_a_config_error(raw: str) -> None:
    """CHORUS_BACKBEAT_TRUSTED_PULSE_KEYS=",," (or empty) must not turn signature checking off silently."""
    with pytest.raises(ConfigError) as info:
        BackbeatConfig.from_env({"CHORUS_BACKBEAT_TRUSTED_PULSE_KEYS": raw})
    assert info.value.field == "CHORUS_BACKBEAT_TRUSTED_PULSE_KEYS"
    assert "signature checking off" in info.value.reason
    with pytest.raises(ConfigError):
        BackbeatConfig(trusted_pulse_keys=raw)


def test_an_empty_item_among_trusted_pulse_keys_is_refused_too() -> None:
    """'KEY,,' (a variable that expanded to nothing) is refused rather than trusting fewer keys."""
    pytest.importorskip("cryptography")
    from backbeat_sync.signing import SigningKey, generate_private_key

    public = SigningKey.load(generate_private_key()).public_text()
    assert (public,) == BackbeatConfig(trusted_pulse_keys=public).trusted_pulse_keys
    with pytest.raises(ConfigError, match="empty item"):
        BackbeatConfig(trusted_pulse_keys=f"{public},,")


# -- two integrations on one local:// bus ---------------------------------------------------


class Recorder:
    """A user logger (the seed's interface) that keeps every line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str, *args: object) -> None:
        self.lines.append(("info", msg))

    def warn(self, msg: str, *args: object) -> None:
        self.lines.append(("warn", msg))

    def error(self, msg: str, *args: object) -> None:
        self.lines.append(("error", msg))


def test_a_second_integration_with_another_tempo_on_a_local_bus_is_warned() -> None:
    """The second of two integrations on local://NAME with another tempo follows the running pulse, warned."""
    from backbeat_sync import Integration

    first_cfg = BackbeatConfig(
        cluster_id="clash", agent_id="a", nats_url="local://tempo-clash", tempo_bpm=600
    )
    second_cfg = first_cfg.evolve(agent_id="b", tempo_bpm=120)
    same_cfg = first_cfg.evolve(agent_id="c")
    first, second, same = Recorder(), Recorder(), Recorder()
    with (
        Integration(first_cfg, node_id="n1", logger=first),
        Integration(second_cfg, node_id="n2", logger=second) as b,
        Integration(same_cfg, node_id="n3", logger=same),
    ):
        assert b.transport.bus.pulse_schedule("backbeat.beat.clash").tempo_bpm == 600  # type: ignore[union-attr]
    warnings = [msg for level, msg in second.lines if level == "warn"]
    assert len(warnings) == 1
    assert "already runs at 600 BPM, not the configured tempo_bpm=120" in warnings[0]
    assert "on bus 'tempo-clash'" in warnings[0]
    assert [m for level, m in first.lines + same.lines if level == "warn"] == []
