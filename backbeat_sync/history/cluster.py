"""History shared by the cluster: per-agent sketches merged into a JetStream key-value bucket.

With ``BackbeatConfig(history_bucket=NAME)`` (on NATS, not ``local://``), each agent
keeps a cumulative :class:`~.sketch.Sketch` per operation type of its own runs, and once
a bar (at each downbeat, on the integration's beat thread) hands a merge to the NATS
loop thread: for each type it has run (or been asked about), it reads the key
``{cluster}.{type}``, replaces its own entry (keyed by agent id) with its cumulative
sketch, and writes the value back by compare-and-set (``update(last=revision)``,
``create`` for a new key), reading again and retrying when another agent wrote between.
A resend or retry only replaces the agent's own entry, so nothing is counted twice; the
cluster figure is the sum of every agent's entry. A restarted agent (same ``agent_id``)
reads its entry back first and goes on from it.

The value is JSON: ``{"v": 1, "type": TYPE, "agents": {AGENT: {sketch..., "t": epoch}}}``.

Agents come and go (a pod's agent id may never come back), and the value must stay under
the server's ``max_payload``: an entry not written for ``retire_after`` seconds is folded,
by the next agent that writes the key, into one entry :data:`RETIRED` (the sum of the
retired agents' sketches: the cluster's figure, the sum of the entries, does not change).
An agent rewrites its own entry at least every ``retire_after / 4`` (with new runs or
not), so a live agent is not retired. One whose entry was retired all the same (away
longer than ``retire_after``) finds its entry gone at its next merge and from then on
writes only what it did not write before (its runs are in :data:`RETIRED` already).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Final

from ..errors import JetStreamUnavailable
from .records import OperationStats, Sample
from .sketch import Sketch

__all__ = ["MAX_TRIES", "RETIRED", "RETIRE_AFTER", "VALUE_VERSION", "ClusterHistory", "history_key"]

#: Compare-and-set attempts per key and merge before the merge gives up until the next bar.
MAX_TRIES: Final = 20
#: The ``"v"`` of the JSON value this library writes.
VALUE_VERSION: Final = 1
#: The entry the retired agents' sketches are summed into (no agent id can be this: ids
#: are single NATS subject tokens, and ``*`` is not allowed in one).
RETIRED: Final = "*retired"
#: Seconds without a write after which another agent's entry is folded into :data:`RETIRED`.
RETIRE_AFTER: Final = 7 * 86_400.0
_PLAIN: Final = re.compile(r"[-_a-zA-Z0-9]+")

#: Runs ``fn(nc)`` on the NATS loop thread; returns a future, or None when not connected.
Submitter = Callable[[Callable[[Any], Coroutine[Any, Any, Any]]], "Future[Any] | None"]


def _token(part: str) -> str:
    """A key token: the text itself if it is plain (letters, digits, ``-``, ``_``), else ``=`` + hex."""
    if _PLAIN.fullmatch(part):
        return part
    return "=" + part.encode("utf-8").hex()


def _written_at(entry: Any) -> float | None:
    """The ``"t"`` of an entry, or None when it has none (its age unknown: never retired)."""
    t = entry.get("t") if isinstance(entry, dict) else None
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def history_key(cluster_id: str, operation_type: str) -> str:
    """The bucket key of a (cluster, type): ``{cluster}.{type}``, each part hex-encoded after
    ``=`` unless it is only letters, digits, ``-`` and ``_``.

    >>> history_key("chorus", "dht_store"), history_key("chorus", "a b")
    ('chorus.dht_store', 'chorus.=612062')
    """
    return f"{_token(cluster_id)}.{_token(operation_type)}"


class ClusterHistory:
    """This agent's share of the cluster's history, and the merged figures it last read.

    Thread-safe: samples come in on whichever thread drains the budget history, the merge
    runs on the NATS loop thread, figures are read by any thread.

    Args:
        bucket: the key-value bucket name.
        cluster_id: the cluster (first token of every key).
        agent_id: this agent's entry in every value.
        submit: runs a coroutine function on the NATS loop (see :data:`Submitter`).
        on_error: called with a message for the integration's ``errors``.
        on_change: called with a type whose cluster figures changed (the history drops its
            cached ``"auto"`` budget of that type).
        time_source: epoch seconds (the ``"t"`` of this agent's entry).
        timeout: seconds per JetStream request.
        retire_after: seconds without a write after which another agent's entry is folded
            into :data:`RETIRED` when this agent writes the key.
    """

    def __init__(
        self,
        bucket: str,
        cluster_id: str,
        agent_id: str,
        submit: Submitter,
        *,
        on_error: Callable[[str], Any],
        on_change: Callable[[str], Any],
        time_source: Callable[[], float],
        timeout: float = 5.0,
        retire_after: float = RETIRE_AFTER,
    ) -> None:
        self.bucket = bucket
        self.cluster_id = cluster_id
        self.agent_id = agent_id
        self._submit = submit
        self._on_error = on_error
        self._on_change = on_change
        self._now = time_source
        self._timeout = timeout
        self.retire_after = retire_after
        self._lock = threading.Lock()
        #: This process's runs since start, per type (the entry is base + this).
        self._delta: dict[str, Sketch] = {}
        #: This agent's entry as read from the bucket before its first write (a restart's).
        self._base: dict[str, Sketch] = {}
        #: The other agents' entries, summed, as last read.
        self._others: dict[str, Sketch] = {}
        #: What of base + delta was retired into RETIRED while this process ran (not ours to write).
        self._gone: dict[str, Sketch] = {}
        #: The entry this process last wrote, per type (to tell a retired entry from a new key).
        self._last_own: dict[str, Sketch] = {}
        self.retired = 0  #: other agents' entries this agent folded into RETIRED
        self._version: dict[str, int] = {}  #: runs taken in per type
        self._written: dict[str, int] = {}  #: the version last written per type
        self._wanted: set[str] = set()  #: types asked about (read even if not run here)
        self._kv: Any = None
        self._kv_for: Any = None
        self._pending: Future[Any] | None = None
        self.disabled = False  #: no JetStream (reported once): history stays local
        self._failing = False
        self.merges = 0  #: keys written
        self.retries = 0  #: compare-and-set conflicts (another agent wrote between)
        self.errors = 0  #: merges that failed

    # -- any thread ----------------------------------------------------------

    def add(self, sample: Sample) -> None:
        """Count one of this process's runs (the budget history's listener)."""
        typ = sample.operation_type
        with self._lock:
            sketch = self._delta.get(typ)
            if sketch is None:
                sketch = self._delta[typ] = Sketch()
            sketch.add(sample)
            self._version[typ] = self._version.get(typ, 0) + 1

    def sketch(self, operation_type: str) -> Sketch:
        """The cluster's sketch of a type: the others' last read plus this agent's own, now."""
        with self._lock:
            self._wanted.add(operation_type)
            out = self._own(operation_type)
            others = self._others.get(operation_type)
            if others is not None:
                out.merge(others)
            return out

    def _own(self, typ: str) -> Sketch:
        """With the lock: this agent's entry now (its base and its runs, less what was retired)."""
        own = Sketch()
        for part in (self._base, self._delta):
            s = part.get(typ)
            if s is not None:
                own.merge(s)
        gone = self._gone.get(typ)
        return own if gone is None else own.without(gone)

    def stats(self, operation_type: str) -> OperationStats:
        """The cluster's figures of a type (see :meth:`sketch`)."""
        return self.sketch(operation_type).stats(operation_type)

    def bar(self) -> None:
        """Hand a merge to the NATS loop unless one is still running (a downbeat calls this)."""
        if self.disabled:
            return
        pending = self._pending
        if pending is not None and not pending.done():
            return
        try:
            self._pending = self._submit(self.merge_on)
        except Exception:  # the loop is gone (stopping): the next bar, if any, tries again
            self._pending = None

    def sync(self, timeout: float) -> bool:
        """Merge now and wait for it (at most ``timeout`` s). Returns whether every key merged."""
        if self.disabled:
            return False
        pending = self._pending
        try:
            if pending is not None and not pending.done():
                pending.result(timeout)
            fut = self._submit(self.merge_on)
            if fut is None:
                return False
            self._pending = fut
            return bool(fut.result(timeout))
        except Exception:
            return False

    # -- the NATS loop thread ------------------------------------------------

    async def merge_on(self, nc: Any) -> bool:
        """Open the bucket on ``nc`` (creating it if missing) and :meth:`merge` (never raises)."""
        try:
            if self._kv is None or self._kv_for is not nc:
                from ..ha import open_bucket

                self._kv = await open_bucket(
                    nc, self.bucket, create=True, replicas=None, timeout=self._timeout
                )
                self._kv_for = nc
            return await self.merge(self._kv)
        except JetStreamUnavailable as exc:
            self.disabled = True
            self._on_error(f"history bucket {self.bucket!r} unavailable: {exc}; budget history stays local")
            return False
        except Exception as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return False

    async def merge(self, kv: Any) -> bool:
        """Merge every type run or asked about into ``kv`` (a nats-py ``KeyValue``).

        Returns:
            True if every key was read (and written where this agent had new runs).
        """
        with self._lock:
            types = sorted(set(self._delta) | self._wanted)
        ok = True
        for typ in types:
            try:
                ok = await self._merge_key(kv, typ) and ok
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(f"{typ}: {type(exc).__name__}: {exc}")
                ok = False
        if ok and self._failing:
            self._failing = False
        return ok

    async def _merge_key(self, kv: Any, typ: str) -> bool:
        import nats.js.errors as js_errors

        key = history_key(self.cluster_id, typ)
        for _ in range(MAX_TRIES):
            try:
                entry = await kv.get(key)
                revision: int | None = entry.revision
                doc = self._parse(typ, entry.value)
            except js_errors.KeyNotFoundError:  # also a deleted or purged key
                revision, doc = None, {}
            agents: dict[str, Any] = doc.get("agents", {}) if isinstance(doc.get("agents"), dict) else {}
            now = self._now()
            others = Sketch()
            stale: dict[str, Sketch] = {}  # other agents' entries to retire, if we write
            retired = Sketch()  # the RETIRED entry as read (stale entries are added to it)
            for agent, data in agents.items():
                if agent == self.agent_id:
                    continue
                try:
                    sketch = Sketch.from_json(data)
                except ValueError as exc:
                    self._failed(f"{key}: agent {agent!r}'s entry skipped: {exc}")
                    continue
                others.merge(sketch)
                if agent == RETIRED:
                    retired = sketch
                    continue
                at = _written_at(data)
                if at is not None and now - at > self.retire_after:
                    stale[agent] = sketch
            mine = agents.get(self.agent_id)
            with self._lock:
                if typ not in self._base:  # first read: a restart's own entry is the base
                    base = Sketch()
                    if mine is not None:
                        try:
                            base = Sketch.from_json(mine)
                        except ValueError:
                            pass  # corrupt: start again from this run's counts
                    self._base[typ] = base
                elif mine is None and typ in self._last_own:
                    # Our entry was retired (we were away longer than retire_after): what we
                    # wrote is counted in RETIRED now; from here we write only the rest.
                    gone = self._gone.setdefault(typ, Sketch())
                    gone.merge(self._last_own.pop(typ))
                    self._written[typ] = -1  # what is left is not in the bucket: write it
                changed = self._others.get(typ) != others
                self._others[typ] = others
                version = self._version.get(typ, 0)
                dirty = version != self._written.get(typ, 0)
                own = self._own(typ)
            if changed:
                self._on_change(typ)
            mine_at = None if mine is None else _written_at(mine)
            if not dirty and (
                mine is None or (mine_at is not None and now - mine_at <= self.retire_after / 4)
            ):
                return True  # nothing new, and our entry is fresh enough not to be retired
            if stale:  # a corrupt RETIRED entry (reported above) is replaced by the sum of the stale
                for agent, sketch in stale.items():
                    retired.merge(sketch)
                    del agents[agent]
                agents[RETIRED] = {**retired.to_json(), "t": now}
            entry_json = own.to_json()
            entry_json["t"] = now
            agents[self.agent_id] = entry_json
            data = json.dumps(
                {"v": VALUE_VERSION, "type": typ, "agents": agents}, separators=(",", ":"), sort_keys=True
            ).encode()
            try:
                if revision is None:
                    await kv.create(key, data)
                else:
                    await kv.update(key, data, last=revision)
            except js_errors.KeyWrongLastSequenceError:
                self.retries += 1
                continue
            except js_errors.APIError as exc:
                if exc.err_code == 10071:  # wrong last sequence, as an API error
                    self.retries += 1
                    continue
                raise
            with self._lock:
                self._written[typ] = version
                self._last_own[typ] = own
            self.merges += 1
            self.retired += len(stale)
            return True
        self._failed(f"{key}: {MAX_TRIES} compare-and-set attempts lost to other writers")
        return False

    def _parse(self, typ: str, raw: bytes | None) -> dict[str, Any]:
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            self._failed(f"{history_key(self.cluster_id, typ)}: not a history value; it is replaced")
            return {}
        return doc

    def _failed(self, detail: str) -> None:
        """Count a failure; report the first of a run of failures (not one per bar)."""
        self.errors += 1
        if not self._failing:
            self._failing = True
            self._on_error(f"history bucket {self.bucket!r}: merge failed: {detail}")
