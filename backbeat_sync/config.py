"""Configuration: :class:`BackbeatConfig`, its defaults, validation and ``from_env()``.

A config is frozen and validated at construction: a value that cannot work
raises :class:`~backbeat_sync.ConfigError` naming the field (or, through
``from_env``, the environment variable) and the bad value.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from .errors import ConfigError

__all__ = ["ENV_PREFIX", "BackbeatConfig", "mask_url", "valid_token"]

ENV_PREFIX = "CHORUS_BACKBEAT_"

#: URL schemes nats-py understands, plus ``local`` for the in-process pulse.
NATS_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
LOCAL_SCHEME = "local"

_BAD_TOKEN = re.compile(r"[\s.*>\x00-\x1f\x7f]")
#: Characters an id may not hold beyond the subject rules: ids name files (the spool) too.
_BAD_ID_CHAR = re.compile(r"[/\\]")
#: Longest cluster or agent id, in UTF-8 bytes (ids go into every subject and claim).
MAX_ID_BYTES = 256
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

T = TypeVar("T")


def valid_token(value: str) -> bool:
    """Whether ``value`` is a valid single NATS subject token.

    Non-empty, with no whitespace, control character (NUL included), ``.``, ``*`` or ``>``.
    """
    return bool(value) and _BAD_TOKEN.search(value) is None


def _id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a cluster or agent id, or None."""
    if not valid_token(value):
        return (
            "must be a single NATS subject token: non-empty, no whitespace, control characters,"
            " '.', '*' or '>'"
        )
    if _BAD_ID_CHAR.search(value):
        return "must not contain '/' or '\\' (ids also name files)"
    if value.startswith("$"):
        return "must not start with '$' (NATS reserves $SYS, $JS, $KV ... for the system)"
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        return f"is {size} bytes long; at most {MAX_ID_BYTES} bytes of UTF-8"
    return None


def mask_url(url: str) -> str:
    """Return ``url`` (or a comma-separated list of URLs) with any password or token replaced by ``***``."""
    parts = []
    for one in url.split(","):
        one = one.strip()
        try:
            split = urlsplit(one)
        except ValueError:
            parts.append(one)
            continue
        if split.username is not None or split.password is not None:
            host = split.netloc.rpartition("@")[2]  # as written: a bad port must not raise here
            user = split.username or ""
            cred = f"{user}:***" if split.password is not None else "***"
            one = split._replace(netloc=f"{cred}@{host}").geturl()
        parts.append(one)
    return ",".join(parts)


def _default_agent_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-") or "agent"
    return f"chorus-{host}"


def _secret_repr(value: object) -> str:
    return "None" if value is None else "'***'"


def _token_field(inst: BackbeatConfig, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(attribute.name, value, "must be a string")
    problem = _id_problem(value)
    if problem is not None:
        shown = value if len(value) <= 64 else f"{value[:32]}... ({len(value)} characters)"
        raise ConfigError(attribute.name, shown, problem)


def _positive_number(
    upper: float | None = None,
) -> Callable[[Any, attrs.Attribute[float], float], None]:
    def check(inst: Any, attribute: attrs.Attribute[float], value: float) -> None:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
            and (upper is None or value <= upper)
        )
        if not ok:
            bound = f"0 < x <= {upper:g}" if upper is not None else "a finite number > 0"
            raise ConfigError(attribute.name, value, f"must be {bound}")

    return check


def _int_at_least(low: int) -> Callable[[Any, attrs.Attribute[int], int], None]:
    def check(inst: Any, attribute: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(attribute.name, value, f"must be an integer >= {low}")

    return check


def _bool_field(inst: Any, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(attribute.name, value, "must be True or False")


def _optional_str(inst: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        shown = "***" if attribute.repr is _secret_repr else value
        raise ConfigError(attribute.name, shown, "must be a non-empty string or None")


def _nats_url(inst: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(attribute.name, value, "must be a non-empty URL")
    urls = [u.strip() for u in value.split(",")]
    for url in urls:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme == LOCAL_SCHEME:
            if len(urls) > 1:
                raise ConfigError(
                    attribute.name, mask_url(value), "local:// cannot be combined with other servers"
                )
            continue
        if scheme not in NATS_SCHEMES:
            raise ConfigError(
                attribute.name,
                mask_url(value),
                f"unknown scheme {scheme or '(none)'!r} in {mask_url(url)!r}:"
                " expected nats://, tls://, ws://, wss:// or local://",
            )
        try:
            split = urlsplit(url)
            split.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError(
                attribute.name, mask_url(value), f"cannot parse {mask_url(url)!r}: {exc}"
            ) from None
        if not split.hostname:
            raise ConfigError(attribute.name, mask_url(value), f"no host in {mask_url(url)!r}")


def _subject_template(inst: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(attribute.name, value, "must be a string")
    try:
        subject = value.format(cluster_id="c", agent_id="a")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            attribute.name, value, f"bad template ({exc}); it may use {{cluster_id}} and {{agent_id}}"
        ) from None
    tokens = subject.split(".")
    if not subject or any(not t or re.search(r"\s", t) or t in ("*", ">") for t in tokens):
        raise ConfigError(
            attribute.name, value, "must give a NATS subject of non-empty tokens without wildcards"
        )


def _to_tuple(value: Any) -> tuple[str, ...]:
    """A comma-separated string (or a sequence) as a tuple; an empty item stays, for the validator.

    ``",,"`` must not become ``()``: for ``trusted_pulse_keys`` that would turn
    signature checking off without a word.
    """
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(","))
    if value is None:
        return ()
    return tuple(value)


def _signing_key(inst: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    _optional_str(inst, attribute, value)
    if value is not None:
        from .signing import SigningKey

        SigningKey.load(value, field=attribute.name)


def _trusted_keys(inst: Any, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            attribute.name,
            value,
            "must be non-empty strings (an empty item, as in ',,' or an empty variable, is refused:"
            " it would turn signature checking off)",
        )
    if value:
        from .signing import Verifier

        Verifier.from_keys(value, field=attribute.name)


def _profiles(value: Any) -> dict[str, tuple[float, float]]:
    from .history import check_profiles

    return check_profiles({} if value is None else value)


def _stream_name(inst: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or re.search(r"[\s.*>/\\]", value):
        raise ConfigError(
            attribute.name,
            value,
            "must be a JetStream stream name (no whitespace, '.', '*', '>', '/' or '\\') or None",
        )


def _bucket_name(inst: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise ConfigError(
            attribute.name,
            value,
            "must be a JetStream key-value bucket name (letters, digits, '-' and '_') or None",
        )


def _history_scope(inst: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ("local", "cluster"):
        raise ConfigError(attribute.name, value, "must be 'local' or 'cluster'")
    if value == "cluster" and inst.history_bucket is None:
        raise ConfigError(attribute.name, value, "'cluster' needs history_bucket (the bucket it reads)")


@attrs.frozen(kw_only=True)
class BackbeatConfig:
    """How an :class:`~backbeat_sync.Integration` joins a BACKBEAT cluster.

    Every field has the seed document's default; ``nats_url="local://"`` selects
    the in-process pulse (no server). Invalid values raise
    :class:`~backbeat_sync.ConfigError` at construction.

    Example:
        >>> cfg = BackbeatConfig(cluster_id="chorus-dev", agent_id="alice", nats_url="local://")
        >>> cfg.beat_subject_for()
        'backbeat.beat.chorus-dev'
    """

    enabled: bool = attrs.field(default=True, validator=_bool_field)
    cluster_id: str = attrs.field(default="chorus-production", validator=_token_field)
    agent_id: str = attrs.field(factory=_default_agent_id, validator=_token_field)
    nats_url: str = attrs.field(default="nats://backbeat-nats:4222", validator=_nats_url, repr=mask_url)
    #: Tempo of the in-process pulse (``local://``); on NATS the pulse sets the tempo.
    tempo_bpm: float = attrs.field(default=2.0, validator=_positive_number(6000.0))
    #: Beats per bar of the in-process pulse.
    bar_length: int = attrs.field(default=4, validator=_int_at_least(1))
    health_every_beats: int = attrs.field(default=8, validator=_int_at_least(1))
    beat_subject: str = attrs.field(default="backbeat.beat.{cluster_id}", validator=_subject_template)
    status_subject: str = attrs.field(
        default="backbeat.status.{cluster_id}.{agent_id}", validator=_subject_template
    )
    #: Where a pulse answers requests with its latest frame (optional in the protocol: the
    #: ``status`` probe asks it first, and waits for a beat when nothing answers).
    last_beat_subject: str = attrs.field(
        default="backbeat.pulse.{cluster_id}.last", validator=_subject_template
    )

    # --- NATS connection ---------------------------------------------------
    connect_timeout: float = attrs.field(default=5.0, validator=_positive_number())
    connect_in_background: bool = attrs.field(default=False, validator=_bool_field)
    #: -1 means reconnect forever.
    max_reconnect_attempts: int = attrs.field(default=-1, validator=_int_at_least(-1))
    reconnect_wait: float = attrs.field(default=1.0, validator=_positive_number())
    reconnect_jitter: float = attrs.field(default=0.2, validator=_positive_number())
    reconnect_buffer_size: int = attrs.field(default=8 * 1024 * 1024, validator=_int_at_least(0))
    ping_interval: float = attrs.field(default=20.0, validator=_positive_number())
    max_outstanding_pings: int = attrs.field(default=2, validator=_int_at_least(1))
    #: Claims held while disconnected before intermediate ones are coalesced.
    outbox_limit: int = attrs.field(default=10_000, validator=_int_at_least(1))
    #: How long ``stop()`` (and the exit hook) may spend publishing what is queued.
    flush_timeout: float = attrs.field(default=5.0, validator=_positive_number())
    #: A directory for final claims NATS did not confirm by ``stop()``: the next integration
    #: of the same cluster and agent sends them (None: they are counted as dropped).
    spool_path: str | None = attrs.field(default=None, validator=_optional_str)

    # --- auth and TLS (secrets never appear in repr) ------------------------
    token: str | None = attrs.field(default=None, validator=_optional_str, repr=_secret_repr)
    user: str | None = attrs.field(default=None, validator=_optional_str)
    password: str | None = attrs.field(default=None, validator=_optional_str, repr=_secret_repr)
    creds_file: str | None = attrs.field(default=None, validator=_optional_str)
    nkey_seed: str | None = attrs.field(default=None, validator=_optional_str, repr=_secret_repr)
    tls_ca: str | None = attrs.field(default=None, validator=_optional_str)
    tls_cert: str | None = attrs.field(default=None, validator=_optional_str)
    tls_key: str | None = attrs.field(default=None, validator=_optional_str)

    # --- signing (the ``signing`` extra) ---------------------------------------
    #: This agent's Ed25519 private key (PEM file path or ``base64:`` seed): signs its claims.
    signing_key: str | None = attrs.field(default=None, validator=_signing_key, repr=_secret_repr)
    #: Key id put in signed claims (default: derived from the public key).
    signing_key_id: str | None = attrs.field(default=None, validator=_optional_str)
    #: Public keys of pulses to trust (PEM paths or ``base64:`` keys, optionally ``ID=``-prefixed).
    #: When set, unsigned and forged beat frames are dropped.
    trusted_pulse_keys: tuple[str, ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_trusted_keys
    )

    # --- observability (the ``otel`` extra) ------------------------------------
    #: ``start()`` instruments the integration with the global OpenTelemetry tracer provider.
    otel: bool = attrs.field(default=False, validator=_bool_field)
    # --- budget history (``docs/learning.md``) -----------------------------------
    #: SQLite file of budget history shared by processes on one host; None keeps it in memory.
    history_path: str | None = attrs.field(default=None, validator=_optional_str)
    #: Samples kept per (operation type, name), the newest.
    history_keep: int = attrs.field(default=1000, validator=_int_at_least(1))
    #: Names kept per operation type; the runs of names past it share the name ``"(other)"``.
    history_max_names: int = attrs.field(default=1000, validator=_int_at_least(1))
    #: Runs (done or exceeded) of a type before ``"auto"`` learns from them.
    history_min_samples: int = attrs.field(default=20, validator=_int_at_least(1))
    #: ``"auto"`` gives ``p95 * history_margin`` (rounded up to a quarter beat).
    history_margin: float = attrs.field(default=1.25, validator=_positive_number())
    #: ``type -> (min, max)`` beats, added to (or overriding) the seed's profiles.
    budget_profiles: dict[str, tuple[float, float]] = attrs.field(
        factory=dict, converter=_profiles, hash=False
    )

    # --- JetStream (see docs/ha.md) ---------------------------------------------
    #: A JetStream stream capturing this cluster's status subjects: final claims (done,
    #: failed) are published to it with a ``Nats-Msg-Id`` and leave the outbox only on its
    #: PubAck, so the stream holds each exactly once. None (default): flush-confirmed core NATS.
    claims_stream: str | None = attrs.field(default=None, validator=_stream_name)
    #: A JetStream key-value bucket (created if missing) the cluster's agents merge their
    #: budget history into once a bar: mergeable sketches per (cluster, type). None: off.
    history_bucket: str | None = attrs.field(default=None, validator=_bucket_name)
    #: Which figures ``"auto"`` budgets learn from: ``"local"`` (this agent's history) or
    #: ``"cluster"`` (the merged figures of ``history_bucket``, which it needs).
    history_scope: str = attrs.field(default="local", validator=_history_scope)
    #: Seconds without a write after which an agent's entry in ``history_bucket`` is folded
    #: into the shared ``"*retired"`` entry (agents that are gone; the figures do not change).
    history_retire_after: float = attrs.field(default=7 * 86_400.0, validator=_positive_number())

    @property
    def is_local(self) -> bool:
        """True when ``nats_url`` selects the in-process pulse (``local://``)."""
        return self.nats_url.strip().lower().startswith(LOCAL_SCHEME + "://")

    @property
    def servers(self) -> list[str]:
        """The server URLs of ``nats_url``, split on commas."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def masked_url(self) -> str:
        """``nats_url`` with any password replaced by ``***``; safe to log."""
        return mask_url(self.nats_url)

    @property
    def beat_duration(self) -> float:
        """Seconds per beat at ``tempo_bpm``."""
        return 60.0 / self.tempo_bpm

    def beat_subject_for(self) -> str:
        """The subject beat frames arrive on, for this cluster."""
        return self.beat_subject.format(cluster_id=self.cluster_id, agent_id=self.agent_id)

    def last_beat_subject_for(self) -> str:
        """The subject a pulse answers "what was your last beat?" requests on, for this cluster."""
        return self.last_beat_subject.format(cluster_id=self.cluster_id, agent_id=self.agent_id)

    def status_subject_for(self) -> str:
        """The subject this agent publishes its status claims on."""
        return self.status_subject.format(cluster_id=self.cluster_id, agent_id=self.agent_id)

    def evolve(self, **changes: Any) -> BackbeatConfig:
        """Return a copy with ``changes`` applied (validated like a new config)."""
        return attrs.evolve(self, **changes)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> BackbeatConfig:
        """Build a config from ``CHORUS_BACKBEAT_*`` variables, then ``overrides``.

        Args:
            environ: the variables to read (default ``os.environ``).
            defaults: field values used where the environment sets nothing
                (``defaults={"nats_url": "local://"}`` runs in-process unless
                ``CHORUS_BACKBEAT_NATS_URL`` is set).
            **overrides: field values that win over the environment.

        Returns:
            A validated config.

        Raises:
            ConfigError: a variable (named in the error) or override cannot be used.

        Variables read (all of them; ``tests/test_env_docs.py`` holds this list, and
        the table in ``docs/configuration.md``, to what the code reads): ``ENABLED``,
        ``CLUSTER_ID``, ``AGENT_ID``, ``NATS_URL``, ``TEMPO_BPM``, ``BAR_LENGTH``,
        ``NATS_TOKEN``, ``NATS_USER``, ``NATS_PASSWORD``, ``NATS_CREDS``,
        ``NATS_NKEY_SEED``, ``NATS_TLS_CA``, ``NATS_TLS_CERT``, ``NATS_TLS_KEY``,
        ``SIGNING_KEY``, ``SIGNING_KEY_ID``, ``TRUSTED_PULSE_KEYS`` (comma-separated),
        ``SPOOL_PATH``, ``OTEL``, ``HISTORY_PATH``, ``CLAIMS_STREAM``, ``HISTORY_BUCKET``,
        ``HISTORY_SCOPE``, each prefixed ``CHORUS_BACKBEAT_``.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = dict(defaults or {})
        from_var: dict[str, str] = {}
        for field, var, conv in _ENV_FIELDS:
            name = ENV_PREFIX + var
            raw = env.get(name)
            if raw is None or field in overrides:
                continue
            shown = "***" if field in _SECRET_FIELDS else raw
            try:
                values[field] = conv(raw)
            except ValueError as exc:
                raise ConfigError(name, shown, str(exc)) from None
            from_var[field] = name
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as exc:
            if exc.field in from_var:
                raise ConfigError(from_var[exc.field], exc.value, exc.reason) from None
            raise
        except TypeError as exc:  # unknown override name
            raise ConfigError("overrides", sorted(overrides), str(exc)) from None


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected one of true/false, 1/0, yes/no, on/off")


def _parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("expected a number") from None


def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected an integer") from None


def _identity(raw: str) -> str:
    return raw


_SECRET_FIELDS = frozenset({"token", "password", "nkey_seed", "signing_key"})
_ENV_FIELDS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("enabled", "ENABLED", _parse_bool),
    ("cluster_id", "CLUSTER_ID", _identity),
    ("agent_id", "AGENT_ID", _identity),
    ("nats_url", "NATS_URL", _identity),
    ("tempo_bpm", "TEMPO_BPM", _parse_float),
    ("bar_length", "BAR_LENGTH", _parse_int),
    ("token", "NATS_TOKEN", _identity),
    ("user", "NATS_USER", _identity),
    ("password", "NATS_PASSWORD", _identity),
    ("creds_file", "NATS_CREDS", _identity),
    ("nkey_seed", "NATS_NKEY_SEED", _identity),
    ("tls_ca", "NATS_TLS_CA", _identity),
    ("tls_cert", "NATS_TLS_CERT", _identity),
    ("tls_key", "NATS_TLS_KEY", _identity),
    ("signing_key", "SIGNING_KEY", _identity),
    ("signing_key_id", "SIGNING_KEY_ID", _identity),
    ("trusted_pulse_keys", "TRUSTED_PULSE_KEYS", _identity),
    ("spool_path", "SPOOL_PATH", _identity),
    ("otel", "OTEL", _parse_bool),
    ("history_path", "HISTORY_PATH", _identity),
    ("claims_stream", "CLAIMS_STREAM", _identity),
    ("history_bucket", "HISTORY_BUCKET", _identity),
    ("history_scope", "HISTORY_SCOPE", _identity),
)
