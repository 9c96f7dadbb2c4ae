"""The :class:`BudgetHistory`: the finished runs of an integration and the budgets they suggest."""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import ConfigError, InvalidArgument
from .cluster import ClusterHistory
from .records import Figures, OperationStats, Sample, drain_logs
from .rules import (
    BUSY_TIMEOUT_SECONDS,
    DEFAULT_KEEP,
    DEFAULT_MARGIN,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_NAMES,
    DEFAULT_PROFILES,
    FLOOR_BEATS,
    OTHER_NAME,
    PENDING_LIMIT,
    SCHEMA_VERSION,
    check_profiles,
    name_of,
    quantile,
    round_up_quarter,
)
from .store import COLUMNS, MIGRATIONS, row_sample

__all__ = ["BudgetHistory"]


class BudgetHistory:
    """The finished budgeted runs of an integration, and the budgets they suggest.

    ``integration.history`` is one. It is thread-safe. Without ``path`` it lives in
    memory; with one it is a SQLite file that survives restarts and that several
    processes on one host may share (each reads what the others write at each flush).

    Args:
        path: the SQLite file, or None to keep history in memory only.
        keep: samples kept per (type, name), the newest (>= 1).
        max_names: names kept per type (>= 1): the runs of any name past them are kept
            together under :data:`OTHER_NAME` (``"(other)"``), so ids with no numbered
            suffix cannot grow the history (in memory and on disk) without bound.
        profiles: ``type -> (min, max)`` beats, merged over :data:`DEFAULT_PROFILES`.
        min_samples: done or exceeded runs of a type before ``"auto"`` learns (>= 1).
        margin: ``"auto"`` gives ``p95 * margin`` (> 0).
        log: an object with ``info/warn(msg)`` (the integration's logger), or None.
        on_error: called with a message for the integration's ``errors`` (a corrupt
            row, a learned budget outside its profile), or None.
        time_source: a callable returning epoch seconds (stamps ``recorded_at``).

    Example:
        >>> from backbeat_sync import BudgetHistory
        >>> h = BudgetHistory()
        >>> h.suggest("dht_store")            # no runs yet: the profile's max
        4.0
        >>> for _ in range(20):
        ...     h.record("dht_store", "store", budget=4, beats_used=1.1)
        >>> h.stats("dht_store").p95, h.suggest("dht_store")   # 1.1 * 1.25 = 1.375 -> 1.5 -> min 2
        (1.1, 2.0)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        keep: int = DEFAULT_KEEP,
        max_names: int = DEFAULT_NAMES,
        profiles: Mapping[str, tuple[float, float]] | None = None,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        margin: float = DEFAULT_MARGIN,
        log: Any = None,
        on_error: Callable[[str], Any] | None = None,
        time_source: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InvalidArgument("keep", keep, "must be an integer >= 1")
        if isinstance(max_names, bool) or not isinstance(max_names, int) or max_names < 1:
            raise InvalidArgument("max_names", max_names, "must be an integer >= 1")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise InvalidArgument("min_samples", min_samples, "must be an integer >= 1")
        if (
            isinstance(margin, bool)
            or not isinstance(margin, (int, float))
            or not math.isfinite(margin)
            or margin <= 0
        ):
            raise InvalidArgument("margin", margin, "must be a finite number > 0")
        self.path = None if path is None else os.fspath(path)
        self.keep = keep
        self.max_names = max_names
        self.min_samples = min_samples
        self.margin = float(margin)
        self.profiles: dict[str, tuple[float, float]] = dict(DEFAULT_PROFILES)
        if profiles:
            self.profiles.update(check_profiles(profiles))
        self.log = log
        self.on_error = on_error
        self._now = time_source
        self._lock = threading.RLock()
        self._db_lock = threading.Lock()
        #: Finished runs not yet turned into samples; appended by any thread without a lock.
        self._pending: deque[Any] = deque(maxlen=PENDING_LIMIT)
        #: The hot paths' append (``integration`` binds it once).
        self.push = self._pending.append
        self._samples: dict[str, dict[str, deque[Sample]]] = {}
        self._unwritten: dict[tuple[str, str], deque[Sample]] = {}
        self._stats_cache: dict[str, OperationStats] = {}
        self._figures: dict[str, Figures] = {}
        self._suggest_cache: dict[str, tuple[float, str]] = {}
        self._outside_reported: set[str] = set()
        self._below_checked: set[tuple[str, float]] = set()
        self._below: set[tuple[str, float]] = set()
        self._candidates: set[tuple[str, float]] = set()  #: (type, fixed budget) to check
        self._db: sqlite3.Connection | None = None
        self._pid = 0  #: the process that opened the file (a forked child never touches it)
        self._writer = uuid.uuid4().hex
        self._last_id = 0
        self.errors = 0  #: corrupt rows skipped and writes that failed
        self.written = 0  #: samples written to the file
        self._listeners: tuple[Callable[[Sample], Any], ...] = ()
        #: The cluster's shared history (``history_bucket``), or None: set by the integration.
        self.cluster: ClusterHistory | None = None
        #: Which figures ``"auto"`` learns from: ``"local"`` or ``"cluster"`` (``history_scope``).
        self.scope = "local"

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        """Open the file (if any) and load its samples. Called by ``Integration.start()``.

        Raises:
            ConfigError: the file cannot be opened, is not a SQLite database, or was
                written by a newer schema (the error names ``history_path`` and the path).
        """
        if self.path is None or self._db is not None:
            return
        path = self.path
        try:
            # Autocommit: every write below opens its own BEGIN IMMEDIATE transaction.
            db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise ConfigError("history_path", path, f"cannot open the history file: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            rows = self._prepare(db)
        except sqlite3.Error as exc:
            db.close()
            raise ConfigError("history_path", path, f"not a usable history file: {exc}") from None
        except ConfigError:
            db.close()
            raise
        with self._lock:
            self._db = db
            self._pid = os.getpid()
            self._load(rows)

    def _prepare(self, db: sqlite3.Connection) -> list[Any]:
        """WAL, the schema, the rows. SQLite answers ``PRAGMA journal_mode`` (and a schema
        change racing another process's) with "database is locked" at once, without its
        busy handler, when another process opens a new file at the same moment: so the
        steps are retried, with a short pause, within the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        pause = 0.01
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                self._migrate(db)
                return db.execute(f"SELECT {COLUMNS} FROM samples ORDER BY id").fetchall()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _migrate(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise ConfigError(
                "history_path",
                self.path,
                f"schema version {version} is newer than this library's {SCHEMA_VERSION}:"
                " upgrade backbeat_sync or use another file",
            )
        while version < SCHEMA_VERSION:
            # Each step is idempotent (IF NOT EXISTS), so two processes migrating at once are safe.
            db.executescript(MIGRATIONS[version] + f"PRAGMA user_version = {version + 1};")
            (version,) = db.execute("PRAGMA user_version").fetchone()

    def _load(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """With the lock: add rows read from the file (own rows are never in ``rows``)."""
        samples = []
        for row in rows:
            self._last_id = max(self._last_id, int(row[0]) if isinstance(row[0], int) else self._last_id)
            try:
                samples.append(row_sample(tuple(row)))
            except (ValueError, TypeError) as exc:
                self._error(f"budget history: skipped a corrupt row {row[0]!r} of {self.path}: {exc}")
        self._add_many(samples, write=False)

    def close(self) -> None:
        """Write what is pending and close the file. Called by ``Integration.stop()``; never raises."""
        try:
            self.flush()
        except Exception as exc:  # a bug must not break stop(): say so, and close anyway
            self._error(f"budget history: the last flush failed: {type(exc).__name__}: {exc}")
        with self._db_lock:
            db, self._db = self._db, None
            if db is not None and os.getpid() == self._pid:
                db.close()

    def _owned(self) -> bool:
        """Whether this process opened the file. A connection must not cross a fork (SQLite's
        rule): a forked child forgets it, unused, and keeps its history in memory."""
        if os.getpid() == self._pid:
            return True
        with self._db_lock:
            self._db = None
            self._unwritten.clear()
        return False

    # -- recording ---------------------------------------------------------------

    def record(
        self,
        operation_type: str,
        name: str,
        *,
        budget: float,
        beats_used: float,
        outcome: str = "done",
        exceeded_kind: str | None = None,
        end_beat: float = 0.0,
        tempo_bpm: float = 0.0,
        budget_source: str = "fixed",
    ) -> None:
        """Record one finished run (the budget engine does this for every budgeted run).

        Args:
            operation_type: the type.
            name: the function's qualified name or the operation id.
            budget: the budget it had (> 0).
            beats_used: beats it took (>= 0).
            outcome: ``"done"``, ``"failed"`` or ``"exceeded"``.
            exceeded_kind: ``"interrupted"`` or ``"late"`` for ``exceeded``.
            end_beat: the budget position when it ended.
            tempo_bpm: the tempo when it ended.
            budget_source: ``"fixed"``, ``"profile"`` or ``"history"``.

        Raises:
            InvalidArgument: a value out of range.
        """
        sample = Sample(
            operation_type,
            name,
            float(budget),
            float(beats_used),
            outcome,
            exceeded_kind,
            float(end_beat),
            float(tempo_bpm),
            budget_source,
            self._now(),
        )
        try:
            row_sample((0, *sample))  # the checks a row read back gets
        except (ValueError, TypeError) as exc:
            raise InvalidArgument("sample", sample, str(exc)) from None
        self._pending.append(sample)

    def _convert(self, item: Any) -> Sample:
        """A pending record as a sample. Records are a :class:`Sample`, or a fast-path tuple
        ``(entry, end_state, end_time)`` where ``entry`` is the budget engine's
        ``[tracker, settings, integration, start_state, start_time]`` list, or
        ``(tracker, end_state, end_time)`` (a ``track_operation`` block that completed)."""
        if isinstance(item, Sample):
            return item
        head, (idx, t0, spb, off), t_out = item
        if isinstance(head, list):
            settings, st_in, t_in = head[1], head[3], head[4]
        else:
            settings, st_in, t_in = head.settings, head.st_in, head.t_in
        i0, s0, p0, o0 = st_in
        end = idx + off + (t_out - t0) / spb
        used = max(0.0, end - (i0 + o0 + (t_in - s0) / p0))
        name = settings.name if isinstance(head, list) else name_of(head.op_id)
        return Sample(
            settings.operation_type,
            name or settings.operation_type,
            settings.beats,
            used,
            "done",
            None,
            end,
            60.0 / spb,
            settings.budget_source,
            self._now(),
        )

    def _drain(self, operation_type: str | None = None) -> None:
        """Take in the finished runs (of one type, or all): the engine's run logs, then this
        history's queue (any thread; cheap when nothing waits)."""
        drain_logs(operation_type)
        self._drain_own()

    def _drain_own(self) -> None:
        """Turn this history's pending records into samples (cheap when nothing is pending)."""
        pending = self._pending
        if not pending:
            return
        with self._lock:
            pop = pending.popleft
            convert = self._convert
            samples = []
            while True:
                try:
                    item = pop()
                except IndexError:
                    break
                try:
                    samples.append(convert(item))
                except Exception as exc:  # a bug must not stop the beat thread or raise into users
                    self._error(f"budget history: a run could not be recorded: {type(exc).__name__}: {exc}")
            self._add_many(samples, write=True)

    def add_listener(self, listener: Callable[[Sample], Any]) -> Callable[[], None]:
        """Call ``listener(sample)`` for each run of this process as the history takes it in.

        It runs on whichever thread drains (the beat thread, or a ``stats()`` caller),
        under the history's lock: keep it short (the metrics' histogram observes).

        Returns:
            A function that removes it.
        """
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def remove() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return remove

    def _add_many(self, samples: list[Sample], *, write: bool) -> None:
        """With the lock: keep ``samples`` (``write``: this process's, to be written and observed)."""
        if not samples:
            return
        keep = self.keep
        limit = self.max_names
        store = self._samples
        unwritten = self._unwritten if write and self._db is not None else None
        checked = self._below_checked
        candidates = self._candidates
        types: set[str] = set()
        last_key: tuple[str, str] | None = None
        q: deque[Sample] | None = None
        w: deque[Sample] | None = None
        figures: Figures | None = None
        other = False  # the current batch's name is past the type's cap: kept as OTHER_NAME
        for sample in samples:
            typ, name = key = sample[0], sample[1]
            if key != last_key:  # runs come in batches of one budget: look the deques up once a batch
                last_key = key
                types.add(typ)
                by_name = store.setdefault(typ, {})
                q = by_name.get(name)
                other = q is None and len(by_name) >= limit and name != OTHER_NAME
                if other:  # a new name past the cap: its runs join the type's OTHER_NAME
                    name = OTHER_NAME
                    key = (typ, name)
                    q = by_name.get(name)
                if q is None:
                    q = by_name[name] = deque(maxlen=keep)
                figures = self._figures.get(typ)
                if figures is None:
                    figures = self._figures[typ] = Figures()
                if unwritten is not None:
                    w = unwritten.get(key)
                    if w is None:
                        w = unwritten[key] = deque(maxlen=keep)
            if other:
                sample = sample._replace(name=OTHER_NAME)
            assert q is not None
            assert figures is not None
            if len(q) == keep:  # the oldest is about to be dropped: it leaves the figures too
                figures.remove(q[0])
            q.append(sample)
            figures.add(sample)
            if w is not None:
                w.append(sample)
            if sample.budget_source == "fixed" and (typ, sample.budget) not in checked:
                candidates.add((typ, sample.budget))
        for typ in types:
            self._stats_cache.pop(typ, None)
            self._suggest_cache.pop(typ, None)
        if write and self._listeners:
            for sample in samples:
                for listener in self._listeners:
                    try:
                        listener(sample)
                    except Exception as exc:  # a listener's bug must not lose the run or stop the drain
                        self.errors += 1
                        if self.log is not None:
                            self.log.warn(f"budget history listener failed: {type(exc).__name__}: {exc}")

    def flush(self) -> None:
        """Drain pending runs, write them to the file (if any), read other processes' samples.

        Called on the integration's beat thread about every 0.25 s
        (``HISTORY_FLUSH_SECONDS``), and by ``stop()``. Never raises: a failed write is
        counted in ``errors`` and the samples are kept for the next flush.
        """
        self._drain()
        self._check_below()
        if self._db is None or not self._owned():
            return
        with self._lock:
            batch = self._unwritten
            self._unwritten = {}
        with self._db_lock:
            db: sqlite3.Connection | None = getattr(self, "_db", None)  # closed meanwhile?
            if db is None:
                return
            try:
                rows = self._write(db, batch)
            except sqlite3.Error as exc:
                with self._lock:
                    for key, samples in batch.items():  # keep them for the next try
                        self._unwritten.setdefault(key, deque(maxlen=self.keep)).extendleft(reversed(samples))
                self._error(f"budget history: writing {self.path} failed: {exc}")
                return
        with self._lock:
            self._load(rows)

    def _write(
        self, db: sqlite3.Connection, batch: dict[tuple[str, str], deque[Sample]]
    ) -> list[tuple[Any, ...]]:
        """One transaction: insert ``batch``, prune each of its keys to the newest ``keep``, and
        read the rows other writers added since the last flush. Returns those rows."""
        w = self._writer
        db.execute("BEGIN IMMEDIATE" if batch else "BEGIN")
        try:
            if batch:
                db.executemany(
                    "INSERT INTO samples (operation_type, name, budget, beats_used, outcome, exceeded_kind,"
                    " end_beat, tempo_bpm, budget_source, recorded_at, writer)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*s, w) for samples in batch.values() for s in samples],
                )
                for typ, name in batch:
                    db.execute(
                        "DELETE FROM samples WHERE operation_type = ? AND name = ? AND id <= COALESCE(("
                        " SELECT id FROM samples WHERE operation_type = ? AND name = ?"
                        " ORDER BY id DESC LIMIT 1 OFFSET ?), -1)",
                        (typ, name, typ, name, self.keep),
                    )
            # Under the same transaction: what the others wrote, and where the file now ends.
            rows = db.execute(
                f"SELECT {COLUMNS} FROM samples WHERE id > ? AND writer != ? ORDER BY id", (self._last_id, w)
            ).fetchall()
            (top,) = db.execute("SELECT COALESCE(max(id), 0) FROM samples").fetchone()
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        self._last_id = max(self._last_id, int(top))
        self.written += sum(len(s) for s in batch.values())
        return rows

    def _error(self, message: str) -> None:
        self.errors += 1
        if self.log is not None:
            try:
                self.log.warn(message)
            except Exception:
                pass
        if self.on_error is not None:
            self.on_error(message)

    # -- reading -----------------------------------------------------------------

    def types(self) -> list[str]:
        """The operation types with recorded runs, sorted."""
        self._drain()
        with self._lock:
            return sorted(t for t, names in self._samples.items() if any(names.values()))

    def names(self, operation_type: str) -> list[str]:
        """The names recorded under ``operation_type``, sorted."""
        self._drain(operation_type)
        with self._lock:
            return sorted(n for n, q in self._samples.get(operation_type, {}).items() if q)

    def samples(self, operation_type: str, name: str | None = None) -> list[Sample]:
        """The kept samples of a type (or of one name of it), oldest first per name."""
        self._drain(operation_type)
        with self._lock:
            by_name = self._samples.get(operation_type, {})
            if name is not None:
                return list(by_name.get(name, ()))
            return [s for q in by_name.values() for s in q]

    def stats(self, operation_type: str, name: str | None = None, *, scope: str = "local") -> OperationStats:
        """The figures of a type's runs (or of one name's), over the samples kept.

        Args:
            operation_type: the type.
            name: restrict to this name (function qualname or operation id); ``"local"`` only.
            scope: ``"local"`` (this history's samples) or ``"cluster"``: the sum of every
                agent's sketch in the ``history_bucket`` as last read (once a bar), with this
                agent's own runs up to now; p50/p95 within 2 % (``docs/ha.md``). Without a
                bucket (or without JetStream) ``"cluster"`` gives the local figures.

        Returns:
            An :class:`OperationStats` (all zero for a type with no runs).

        Raises:
            InvalidArgument: ``scope`` is neither, or ``name`` is given with ``"cluster"``.
        """
        if scope != "local":
            if scope != "cluster":
                raise InvalidArgument("scope", scope, "must be 'local' or 'cluster'")
            if name is not None:
                raise InvalidArgument("name", name, "the cluster's figures are per type: give no name")
            cluster = self.cluster
            if cluster is not None and not cluster.disabled:
                self._drain(operation_type)
                return cluster.stats(operation_type)
        self._drain(operation_type)
        with self._lock:
            if name is None:
                cached = self._stats_cache.get(operation_type)
                if cached is not None:
                    return cached
            result = self._compute(operation_type, name)
            if name is None:
                self._stats_cache[operation_type] = result
            return result

    def _compute(self, typ: str, name: str | None) -> OperationStats:
        if name is None:
            f = self._figures.get(typ)
            if f is None:
                f = Figures()
            timed_ = f.timed
            n_timed = f.done + f.exceeded
            return OperationStats(
                operation_type=typ,
                name=None,
                count=n_timed + f.failed,
                done=f.done,
                failed=f.failed,
                exceeded=f.exceeded,
                interrupted=f.exceeded - f.late,
                late=f.late,
                p50=quantile(timed_, 0.5) if timed_ else 0.0,
                p95=quantile(timed_, 0.95) if timed_ else 0.0,
                max=timed_[-1] if timed_ else 0.0,
                on_time_rate=f.done / n_timed if n_timed else 0.0,
            )
        samples = self.samples(typ, name)
        done = failed = exceeded = interrupted = late = 0
        used: list[float] = []
        for s in samples:
            if s.outcome == "done":
                done += 1
                used.append(s.beats_used)
            elif s.outcome == "exceeded":
                exceeded += 1
                used.append(s.beats_used)
                if s.exceeded_kind == "late":
                    late += 1
                else:
                    interrupted += 1
            else:
                failed += 1
        used.sort()
        timed = done + exceeded
        return OperationStats(
            operation_type=typ,
            name=name,
            count=len(samples),
            done=done,
            failed=failed,
            exceeded=exceeded,
            interrupted=interrupted,
            late=late,
            p50=quantile(used, 0.5) if used else 0.0,
            p95=quantile(used, 0.95) if used else 0.0,
            max=used[-1] if used else 0.0,
            on_time_rate=done / timed if timed else 0.0,
        )

    def profile(self, operation_type: str) -> tuple[float, float] | None:
        """The ``(min, max)`` profile of a type, or None."""
        return self.profiles.get(operation_type)

    def suggest(self, operation_type: str, name: str | None = None) -> float:
        """The budget ``"auto"`` would give a run of this type now, in beats.

        Args:
            operation_type: the type.
            name: learn from this name's runs only (``"auto"`` itself uses the whole type).

        Returns:
            The budget in beats.

        Raises:
            InvalidArgument: the type has no profile and too little history.
        """
        return self.resolve(operation_type, name)[0]

    def resolve(self, operation_type: str, name: str | None = None) -> tuple[float, str]:
        """The budget ``"auto"`` gives now and where it came from (``"profile"`` or ``"history"``).

        Raises:
            InvalidArgument: the type has no profile and too little history.
        """
        self._drain(operation_type)
        if name is None:
            hit = self._suggest_cache.get(operation_type)
            if hit is not None:
                return hit
        with self._lock:
            cluster = self.cluster
            if name is None and self.scope == "cluster" and cluster is not None and not cluster.disabled:
                st = cluster.stats(operation_type)
            else:
                cached = self._stats_cache.get(operation_type) if name is None else None
                # drained above: no second drain
                st = cached if cached is not None else self._compute(operation_type, name)
            prof = self.profiles.get(operation_type)
            if st.timed < self.min_samples:
                if prof is None:
                    raise InvalidArgument(
                        "beats",
                        "auto",
                        f"operation type {operation_type!r} has no budget profile and"
                        f" {st.timed} of {self.min_samples} runs recorded: give a number of beats"
                        " or a profile (BackbeatConfig(budget_profiles=...))",
                    )
                result = (prof[1], "profile")
            else:
                floor = max(prof[0], FLOOR_BEATS) if prof is not None else FLOOR_BEATS
                beats = max(floor, round_up_quarter(st.p95 * self.margin))
                result = (beats, "history")
                if prof is not None and beats > prof[1] and operation_type not in self._outside_reported:
                    self._outside_reported.add(operation_type)
                    self._error(
                        f"{operation_type} needs {beats:g} beats, above its profile"
                        f" {prof[0]:g}-{prof[1]:g} (p95 {st.p95:.2f} beats over {st.timed} runs)"
                    )
            if name is None:
                self._suggest_cache[operation_type] = result
            return result

    def sync_cluster(self, timeout: float = 5.0) -> bool:
        """Take in finished runs and merge them into the cluster's bucket now, waiting for it.

        The integration does this once a bar by itself (and at ``stop()``); call it to read
        the cluster's figures fresh (a test, a report).

        Args:
            timeout: seconds to wait at most.

        Returns:
            True if every type's key was read and, where this agent had new runs, written;
            False without a ``history_bucket``, when not connected, or on a failure (in ``errors``).
        """
        cluster = self.cluster
        if cluster is None:
            return False
        self._drain()
        return cluster.sync(timeout)

    def _cluster_changed(self, operation_type: str) -> None:
        """The cluster's figures of a type changed: ``"auto"`` resolves it again (any thread)."""
        if self.scope == "cluster":
            self._suggest_cache.pop(operation_type, None)

    # -- fixed budgets below history -----------------------------------------------

    def _check_below(self) -> None:
        """Fixed budgets below their type's p50 (>= min_samples runs): logged once per (type, budget)."""
        with self._lock:
            candidates = self._candidates
            if not candidates:
                return
            self._candidates = set()
            for typ, budget in candidates:
                st = self.stats(typ)
                if st.timed < self.min_samples:
                    continue  # checked again when it has enough runs
                self._below_checked.add((typ, budget))
                if budget < st.p50:
                    self._below.add((typ, budget))
                    if self.log is not None:
                        try:
                            self.log.warn(
                                f"BACKBEAT budget of {budget:g} beats for {typ} is below what its runs"
                                f" take (p50 {st.p50:.2f} beats over {st.timed} runs): many will run out"
                            )
                        except Exception:
                            pass

    @property
    def budgets_below_history(self) -> int:
        """How many (type, fixed budget) pairs were found below their type's p50 (health key)."""
        self._drain()
        self._check_below()
        with self._lock:
            return len(self._below)

    def clear(self) -> None:
        """Forget every sample, in memory and in the file (other processes keep what they loaded)."""
        with self._lock:
            self._pending.clear()
            self._samples.clear()
            self._unwritten.clear()
            self._stats_cache.clear()
            self._figures.clear()
            self._suggest_cache.clear()
            self._outside_reported.clear()
            self._below_checked.clear()
            self._below.clear()
            self._candidates.clear()
        with self._db_lock:
            if self._db is not None and os.getpid() == self._pid:
                try:
                    self._db.execute("DELETE FROM samples")
                except sqlite3.Error as exc:
                    self._error(f"budget history: clearing {self.path} failed: {exc}")

    def __repr__(self) -> str:
        where = self.path or "memory"
        return f"<BudgetHistory {where} keep={self.keep} min_samples={self.min_samples}>"
