"""The claims stream: a JetStream stream that holds every final claim of a cluster exactly once.

``backbeat-sync streams create`` (:func:`create_claims_stream`) makes a file-stored
stream named ``BACKBEAT_CLAIMS_{cluster}`` capturing ``backbeat.status.{cluster}.>``
(the cluster's status subjects: every claim, final or not, lands in it). With
``BackbeatConfig(claims_stream=NAME)`` an agent publishes its final claims (done,
failed) to it by JetStream publish with a ``Nats-Msg-Id`` (:func:`claim_msg_id`):
a final claim leaves the outbox only on the stream's acknowledgement, and a resend
after an outage carries the same id, so the stream's duplicate window drops it.
:func:`replay_claims` reads the stream's last bars back (``monitor --replay``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any, Final

import attrs

from .claims import claim_msg_id
from .config import BackbeatConfig
from .errors import BackbeatConnectionError, ConfigError, JetStreamUnavailable

__all__ = [
    "DUPLICATE_WINDOW",
    "MAX_AGE",
    "StreamSummary",
    "claim_msg_id",
    "claims_stream_name",
    "claims_subjects",
    "create_claims_stream",
    "replay_claims",
]

#: Seconds a stream remembers a ``Nats-Msg-Id`` (a resend within it is dropped).
DUPLICATE_WINDOW: Final = 300.0
#: Seconds a claim is kept in a stream ``streams create`` makes (one day).
MAX_AGE: Final = 86_400.0
#: Bytes a stream ``streams create`` makes may hold (the oldest claims go first).
MAX_BYTES: Final = 1024**3

_NOT_IN_NAME = re.compile(r"[\s.*>/\\]")


def claims_stream_name(cluster_id: str) -> str:
    """The default claims stream of ``cluster_id``: ``BACKBEAT_CLAIMS_{cluster}``.

    Characters a stream name cannot hold (``/``, ``\\``) become ``_``.

    >>> claims_stream_name("chorus-dev")
    'BACKBEAT_CLAIMS_chorus-dev'
    """
    return "BACKBEAT_CLAIMS_" + _NOT_IN_NAME.sub("_", cluster_id)


def claims_subjects(config: BackbeatConfig) -> str:
    """The subject filter of every status claim of ``config.cluster_id``.

    The status subject template with ``{agent_id}`` (and every token after it) replaced
    by ``>``, so ``backbeat.status.{cluster_id}.{agent_id}`` gives ``backbeat.status.C.>``.

    Raises:
        ConfigError: the template has no ``{agent_id}`` token (one subject for all agents:
            then the subject itself is the filter).
    """
    template = config.status_subject
    tokens = template.split(".")
    for i, token in enumerate(tokens):
        if "{agent_id}" in token:
            head = ".".join(tokens[:i]).format(cluster_id=config.cluster_id)
            return f"{head}.>" if head else ">"
    raise ConfigError("status_subject", template, "has no {agent_id} token to put a wildcard in")


@attrs.frozen
class StreamSummary:
    """What :func:`create_claims_stream` made or found.

    Attributes:
        name: the stream.
        subjects: what it captures.
        created: False if it existed already (its settings were brought up to date).
        replicas: its replicas.
        duplicate_window: seconds a message id is remembered.
        max_age: seconds a claim is kept.
        max_bytes: bytes it may hold.
        messages: messages in it now.
    """

    name: str
    subjects: tuple[str, ...]
    created: bool
    replicas: int
    duplicate_window: float
    max_age: float
    max_bytes: int
    messages: int


def jetstream_cause(exc: BaseException) -> str | None:
    """Why JetStream refused, if ``exc`` (from nats-py) says it is missing or refused; else None."""
    import nats.errors as nats_errors
    import nats.js.errors as js_errors

    if isinstance(exc, (js_errors.ServiceUnavailableError, nats_errors.NoRespondersError)):
        return "the server has no JetStream (start nats-server with -js, or enable it for the account)"
    if isinstance(exc, js_errors.APIError):
        return f"JetStream refused: {exc.description or exc}"
    return None


def auto_replicas(nc: Any) -> int:
    """Replicas for a new bucket or stream: the servers the cluster advertises, at most 3 (1 alone)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    return max(1, min(3, len(info.get("connect_urls") or ())))


async def _connected(config: BackbeatConfig, fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    import nats

    from .transport.nats import connect_options, describe_error

    options = connect_options(config, name=f"backbeat-tool-{config.cluster_id}")
    options["allow_reconnect"] = False
    options["max_reconnect_attempts"] = 0
    try:
        nc = await asyncio.wait_for(nats.connect(**options), config.connect_timeout)
    except Exception as exc:
        raise BackbeatConnectionError(config.masked_url, describe_error(exc)) from None
    try:
        return await fn(nc)
    finally:
        try:
            await nc.close()
        except Exception:
            pass


def create_claims_stream(
    config: BackbeatConfig,
    *,
    name: str | None = None,
    replicas: int | None = None,
    duplicate_window: float = DUPLICATE_WINDOW,
    max_age: float = MAX_AGE,
    max_bytes: int = MAX_BYTES,
) -> StreamSummary:
    """Create (or bring up to date) the claims stream of ``config.cluster_id``.

    File storage; subjects :func:`claims_subjects`; limits retention, the oldest claims
    discarded first past ``max_age`` or ``max_bytes``.

    Args:
        config: servers, auth, TLS, the cluster id and the status subject template.
        name: the stream (default :func:`claims_stream_name`).
        replicas: replicas (None: 3 on a cluster of 3 or more servers, else 1).
        duplicate_window: seconds a ``Nats-Msg-Id`` is remembered (a resend later than
            this after the first send is stored again).
        max_age: seconds a claim is kept.
        max_bytes: bytes the stream may hold.

    Returns:
        What was made or found.

    Raises:
        ConfigError: a bad name or limit.
        BackbeatConnectionError: no connection.
        JetStreamUnavailable: no JetStream, or JetStream refused the stream.
    """
    stream = claims_stream_name(config.cluster_id) if name is None else name
    if not isinstance(stream, str) or not stream or _NOT_IN_NAME.search(stream):
        raise ConfigError(
            "name", stream, "must be a JetStream stream name (no whitespace, '.', '*', '>', '/')"
        )
    for field, value in (("duplicate_window", duplicate_window), ("max_age", max_age)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ConfigError(field, value, "must be a number of seconds > 0")
    if duplicate_window > max_age:
        raise ConfigError("duplicate_window", duplicate_window, f"must not exceed max_age ({max_age:g} s)")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError("max_bytes", max_bytes, "must be an integer >= 1")
    if replicas is not None and (
        isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5
    ):
        raise ConfigError("replicas", replicas, "must be an integer from 1 to 5, or None")
    subjects = claims_subjects(config)
    needed = f"JetStream stream {stream!r}"

    async def make(nc: Any) -> StreamSummary:
        import nats.js.api as api
        import nats.js.errors as js_errors

        js = nc.jetstream(timeout=config.connect_timeout)
        cfg = api.StreamConfig(
            name=stream,
            description=f"backbeat_sync status claims of cluster {config.cluster_id}",
            subjects=[subjects],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_age=float(max_age),
            max_bytes=max_bytes,
            duplicate_window=float(duplicate_window),
            num_replicas=replicas if replicas is not None else auto_replicas(nc),
        )
        try:
            try:
                await js.stream_info(stream)
            except js_errors.NotFoundError:
                created = True
                info = await js.add_stream(cfg)
            else:
                created = False
                info = await js.update_stream(cfg)
        except Exception as exc:
            cause = jetstream_cause(exc)
            if cause is None:
                raise
            raise JetStreamUnavailable(config.masked_url, needed, cause) from None
        c = info.config
        return StreamSummary(
            name=stream,
            subjects=tuple(c.subjects or ()),
            created=created,
            replicas=int(c.num_replicas or 1),
            duplicate_window=float(c.duplicate_window or 0.0),
            max_age=float(c.max_age or 0.0),
            max_bytes=int(c.max_bytes or -1),
            messages=int(info.state.messages),
        )

    result: StreamSummary = asyncio.run(_connected(config, make))
    return result


def _beat_of(data: bytes | None) -> int | None:
    try:
        doc = json.loads(data or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    beat = doc.get("beat_index") if isinstance(doc, dict) else None
    return beat if isinstance(beat, int) and not isinstance(beat, bool) else None


def replay_claims(
    config: BackbeatConfig,
    bars: int,
    *,
    stream: str | None = None,
    bar_length: int | None = None,
    limit: int = 100_000,
) -> list[bytes]:
    """The claims of the stream's last ``bars`` bars, oldest first, as stored (raw payloads).

    The last bar is the one of the newest claim's ``beat_index``; a bar is ``bar_length``
    beats (bar ``b`` holds beats ``b * bar_length`` to ``(b + 1) * bar_length - 1``).
    The start is found by a binary search over the stream (claims are stored about in
    beat order), then the rest is read in order.

    Args:
        config: servers, auth, TLS and the cluster id (and the default bar length).
        bars: how many bars (>= 1).
        stream: the stream (default ``config.claims_stream``, else :func:`claims_stream_name`).
        bar_length: beats per bar (default ``config.bar_length``).
        limit: read at most this many claims (the newest ones).

    Returns:
        Payloads, in stream order.

    Raises:
        ConfigError: ``bars`` < 1.
        BackbeatConnectionError: no connection.
        JetStreamUnavailable: no JetStream, or no such stream.
    """
    if isinstance(bars, bool) or not isinstance(bars, int) or bars < 1:
        raise ConfigError("bars", bars, "must be an integer >= 1")
    name = stream or config.claims_stream or claims_stream_name(config.cluster_id)
    per_bar = bar_length or config.bar_length

    async def read(nc: Any) -> list[bytes]:
        import nats.js.errors as js_errors

        js = nc.jetstream(timeout=config.connect_timeout)
        try:
            info = await js.stream_info(name)
        except js_errors.NotFoundError:
            raise JetStreamUnavailable(
                config.masked_url, f"JetStream stream {name!r}", "no such stream"
            ) from None
        except Exception as exc:
            cause = jetstream_cause(exc)
            if cause is None:
                raise
            raise JetStreamUnavailable(config.masked_url, f"JetStream stream {name!r}", cause) from None
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        if info.state.messages == 0 or last < first:
            return []

        async def beat_at(seq: int) -> int | None:
            try:
                msg = await js.get_msg(name, seq)
            except js_errors.NotFoundError:
                return None
            return _beat_of(msg.data)

        newest = None
        seq = last
        while newest is None and seq >= first:
            newest = await beat_at(seq)
            seq -= 1
        if newest is None:
            return []
        threshold = (newest // per_bar - bars + 1) * per_bar
        lo, hi = max(first, last - limit + 1), last
        while lo < hi:  # first seq whose beat is >= threshold
            mid = (lo + hi) // 2
            beat = await beat_at(mid)
            if beat is not None and beat >= threshold:
                hi = mid
            else:
                lo = mid + 1
        out: list[bytes] = []
        for s in range(lo, last + 1):
            try:
                msg = await js.get_msg(name, s)
            except js_errors.NotFoundError:
                continue
            beat = _beat_of(msg.data)
            if beat is None or beat >= threshold:
                out.append(bytes(msg.data or b""))
        return out

    result: list[bytes] = asyncio.run(_connected(config, read))
    return result
