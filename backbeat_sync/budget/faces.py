"""The two faces of the one engine: ``@beat_budget`` (and ``execute_with_beat_budget``)
and ``track_operation``; and :func:`precise_mode`.

Both faces make a :class:`~.tracker.Tracker` (a decorated call only when something
needs one) and arm it with the protocol of :mod:`.arming`.
"""

from __future__ import annotations

import inspect
import time
from asyncio import _get_running_loop
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, Protocol, TypeVar, cast

import attrs
import wrapt

from .._reentry import lock_free
from .._runtime import RUNTIME, WATCHDOG
from .._time import SYSTEM_TIME
from .._watchdog import current_slot, thread_state
from ..errors import BudgetOnEventLoop, IntegrationNotStarted, InvalidArgument
from ..protocol import check_wire_id
from ..workflow import CURRENT, check_id, check_ids
from .arming import next_seq, unshield
from .flow import arm_child
from .settings import (
    CACHED_NUMBERS,
    DEFAULT_WARN_AT,
    HOST_TYPES,
    BudgetSettings,
    OnExhaust,
    block_settings,
    check_host,
)
from .tracker import Block, Tracker, materialize

if TYPE_CHECKING:
    from .host import BudgetHost

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = [
    "CallHook",
    "PreciseMode",
    "beat_budget",
    "execute_with_beat_budget",
    "precise_mode",
    "track_operation",
]

P = ParamSpec("P")
R = TypeVar("R")
#: An engine: ``run(wrapped, instance, args, kwargs)``, wrapt's wrapper signature.
Engine = Callable[[Callable[..., Any], Any, Any, Any], Any]
Priority = Literal["critical", "high", "normal", "low"]
_monotonic: Final = time.monotonic
_new: Final = object.__new__
#: Read once per decorated call: the context's open operation (docs/workflows.md).
_cv_get: Final = CURRENT.get


class CallHook(Protocol):
    """Sees every decorated call of an integration (``backbeat_sync.otel`` with ``spans="all"``).

    At most one is set, as ``RUNTIME.call_hook`` (process-wide state lives in ``_runtime``).
    """

    def wants(self, integration: BudgetHost) -> bool:
        """Whether to take this call (False for the inner run of a call it took)."""
        ...

    def call(
        self,
        run: Engine,
        settings: BudgetSettings,
        integration: BudgetHost,
        wrapped: Callable[..., Any],
        instance: Any,
        args: Any,
        kwargs: Any,
    ) -> Any:
        """Run the call, as ``run(wrapped, instance, args, kwargs)``, with whatever it adds around it."""
        ...


def _log_fallback(what: str, integration: BudgetHost | None = None) -> None:
    """Say once that budgets run plainly: to ``integration``'s logger if one was named."""
    RUNTIME.log_fallback(what, None if integration is None else integration.log)


def _refuse_unbudgetable(what: str, target: Any) -> None:
    """Raise TypeError for an ``async def`` or generator function: its body runs outside the call.

    Raises:
        TypeError: ``target`` is an async function, an async generator or a generator function.
    """
    # a callable object: look at its __call__ (an ``async def __call__`` is a coroutine too)
    call = None if inspect.isroutine(target) else inspect.getattr_static(type(target), "__call__", None)
    for fn in (target, call):
        if fn is None:
            continue
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"{what} cannot budget async function {getattr(target, '__qualname__', target)!r}:"
                " the budget would end when the coroutine is created, not when it finishes"
            )
        if inspect.isgeneratorfunction(fn):
            raise TypeError(
                f"{what} cannot budget generator function {getattr(target, '__qualname__', target)!r}:"
                " its body runs after the call returns, outside the budget"
            )


class PreciseMode:
    """Returned by :func:`precise_mode`; as a context manager it restores the previous setting."""

    def __init__(self, previous: float | None) -> None:
        self._previous = previous

    def __enter__(self) -> PreciseMode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        WATCHDOG.precise_interval = self._previous
        WATCHDOG.notify_only()


def precise_mode(enabled: bool = True, *, switch_interval: float = 0.0005) -> PreciseMode:
    """Opt in to more punctual interrupts, at a small cost in throughput.

    A busy thread gives up the GIL one switch interval (``sys.getswitchinterval()``,
    5 ms by default) after the watchdog asks for it, so an interrupt lands about
    that late. In precise mode the watchdog lowers the switch interval to
    ``switch_interval`` while a budget event is less than 15 ms away, and restores
    the previous value after. The switch interval is process-wide: other code
    sees it too while it is lowered.

    Args:
        enabled: turn precise mode on (default) or off.
        switch_interval: the interval used near an event, in seconds (> 0).

    Returns:
        A handle: ``with precise_mode(): ...`` turns it on for the block only.

    Raises:
        InvalidArgument: ``switch_interval`` is not a number > 0.
    """
    if (
        isinstance(switch_interval, bool)
        or not isinstance(switch_interval, (int, float))
        or switch_interval <= 0
    ):
        raise InvalidArgument("switch_interval", switch_interval, "must be a number of seconds > 0")
    handle = PreciseMode(WATCHDOG.precise_interval)
    WATCHDOG.precise_interval = float(switch_interval) if enabled else None
    WATCHDOG.notify_only()
    return handle


# -- the two faces ----------------------------------------------------------------------


def _runner(settings: BudgetSettings) -> Engine:
    """The engine behind ``@beat_budget`` and ``execute_with_beat_budget``: one light tracker per call.

    Returns ``run(wrapped, instance, args, kwargs)`` (wrapt's wrapper signature).
    The integration is resolved at each call.

    This path is kept short on purpose (issue 7: a few hundred nanoseconds; a plain
    function's wrapper calls it straight from its ``__call__``: see
    :func:`_budgeted_function`), so it inlines
    the arming ``Tracker.__enter__`` does (reading the start, then
    :func:`.arming.arm`): a Python call costs about 50 ns here. The inlined lines
    below are the same steps in the same order; change them together.
    Leaving goes through ``Tracker.leave``, as a block's exit does, except in the
    common case (nobody looked at the call: its entry is still plain).
    """
    fixed = settings.integration
    strict = settings.strict
    name = settings.name
    first = settings.first_beats
    runtime = RUNTIME
    rec = settings.log.append

    @lock_free  # runs user code; holds no library lock itself (see Integration.stop)
    def run(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        integration = fixed if fixed is not None else runtime.default
        # One load says both "running" and "where the beat is" (None unless running).
        clock = None if integration is None else integration.budget_clock
        if clock is None:
            if integration is not None:
                integration.refuse_if_forked()
            if strict:
                raise IntegrationNotStarted(f"@beat_budget(strict=True) on {name}")
            if not runtime.fallback_logged:
                _log_fallback(f"{name}()", integration)
            return wrapped(*args, **kwargs)
        hook = runtime.call_hook
        if hook is not None and hook.wants(integration):  # backbeat_sync.otel, spans="all"
            return hook.call(run, settings, integration, wrapped, instance, args, kwargs)
        try:
            slot = thread_state.slot
        except AttributeError:
            slot = current_slot()
        # The call is armed as a plain entry (see ThreadSlot.live): its tracker is made
        # only if something needs it; its start position is kept as the clock state and
        # the time it was read at (Tracker.start_pos works it out).
        # -- reading the start (as Tracker.__enter__ does), inlined
        state = clock.anchor
        source = clock.time_source
        if source is SYSTEM_TIME:
            now = t_in = _monotonic()
        else:
            t_in = source.monotonic()
            now = _monotonic()
        seq = next_seq()
        hint = _cv_get()
        e: list[Any] = [None, settings, integration, state, t_in, hint]
        # -- arming.arm(slot, seq, e, now, first * state[2]), inlined
        live = slot.live
        # The shield as the call finds it. Each exit below raises it from this value, not
        # by one: an exception unwinding many frames (a RecursionError through nested
        # budgets) can stop an inner call's exit code before it lowers the shield, and
        # a shield left raised would keep every later budget of the thread from
        # interrupting. The first exit that completes puts it back.
        shield = slot.shield
        live[seq] = e
        if hint is not None and hint.slot is not slot:
            arm_child(slot, e, hint, now)  # the child of an operation in another thread
        elif now + first * state[2] < WATCHDOG.next_wake:
            slot.shield = shield + 1
            WATCHDOG.notify()
            unshield(slot)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            slot.shield = shield + 1
            err = materialize(slot, seq, e).leave(slot, exc, None)
            if err is not None:
                raise err  # noqa: B904 - chained implicitly to exc, as if raised inside the call
            raise
        # Leaving. ``del`` (unlike a ``pop`` call) is followed by no eval-breaker check,
        # nor is anything up to the shield below, so no asynchronous exception can land
        # between winning the entry and raising the shield: the common case (the thread's
        # only budget, never looked at) returns with no shield at all.
        try:
            del live[seq]
        except KeyError:  # the watchdog won it: it is deciding, or has decided, how to deliver
            slot.shield = shield + 1
            err = materialize(slot, seq, e).leave(slot, None, result)
        else:
            if e[0] is None and not live and slot.shield == shield:
                # History: one deque append; the beat thread works out the beats used.
                # ``t_in is now`` (one float read for both) is the system clock's case.
                rec((e, clock.anchor, _monotonic() if t_in is now else source.monotonic()))
                return result
            slot.shield = shield + 1
            try:
                err = materialize(slot, seq, e).leave(slot, None, result, won=True)
            except BaseException:  # as in Tracker.__exit__: failed half-way, cleaned up later
                t = e[0]
                if t is not None and t.announced and not t.finished and seq not in live:
                    t.done = True
                    live[seq] = [t]
                raise
        if err is not None:
            raise err
        return result

    return run


@lock_free
def execute_with_beat_budget(
    integration: BudgetHost | None,
    beats: float | Literal["auto"],
    fn: Callable[..., R],
    *args: Any,
    operation_type: str | None = None,
    **kwargs: Any,
) -> R:
    """Run ``fn(*args, **kwargs)`` within a budget of ``beats`` beats (the seed's call).

    Args:
        integration: the integration (None: the process default).
        beats: the budget, in beats (> 0), or ``"auto"`` (learned from the history of
            ``operation_type``; see ``docs/learning.md``).
        fn: what to run.
        *args: positional arguments for ``fn``.
        operation_type: the claims' and the history's operation type (needed for ``"auto"``;
            default ``"budget"``). Not passed on to ``fn``.
        **kwargs: keyword arguments for ``fn``.

    Returns:
        What ``fn`` returns.

    Raises:
        BeatBudgetExceeded: the budget ran out while ``fn`` ran.
        InvalidArgument: ``beats`` is not a number > 0 or ``"auto"``, ``"auto"`` without an
            ``operation_type``, an ``"auto"`` type with no profile and too little history,
            or ``fn`` is not callable, or
            ``integration`` is not an Integration.
        TypeError: ``fn`` is an ``async def`` or generator function (as ``@beat_budget`` refuses).
    """
    if not callable(fn):
        raise InvalidArgument("fn", fn, "must be callable")
    _refuse_unbudgetable("execute_with_beat_budget", getattr(fn, "__func__", fn))
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    if isinstance(beats, str):
        if beats != AUTO:
            raise InvalidArgument("beats", beats, 'must be a finite number of beats > 0 or "auto"')
        if operation_type is None:
            raise InvalidArgument("operation_type", None, 'execute_with_beat_budget("auto", ...) needs one')
        base = BudgetSettings(_PLACEHOLDER, operation_type=operation_type, name=name, integration=integration)
        return cast(R, _auto_runner(base, None)(fn, None, args, kwargs))
    settings = BudgetSettings(
        beats,
        operation_type="budget" if operation_type is None else operation_type,
        name=name,
        integration=integration,
    )
    return cast(R, _runner(settings)(fn, None, args, kwargs))


#: ``"auto"``: the budget is resolved from the history at each run (``docs/learning.md``).
AUTO: Final = "auto"
#: The beats of an ``"auto"`` decoration's base settings (replaced at each call; never a budget).
_PLACEHOLDER: Final = 1.0
#: Runners of resolved ``"auto"`` budgets kept per decoration (cleared when full).
_AUTO_RUNNERS_MAX: Final = 64


def _auto_beats(integration: BudgetHost, operation_type: str, profile: str | None) -> tuple[float, str]:
    """The budget of an automatic run now and its source (``"profile"`` or ``"history"``)."""
    history = integration.history
    if profile is None:
        return history.resolve(operation_type)
    prof = history.profile(profile)
    if prof is None:
        known = ", ".join(sorted(history.profiles))
        raise InvalidArgument("profile", profile, f"no budget profile of that name (known: {known})")
    return prof[1], "profile"


def _auto_runner(base: BudgetSettings, profile: str | None) -> Engine:
    """The engine behind ``@beat_budget("auto")`` and ``@beat_budget(profile=...)``.

    At each call it resolves the budget (from the integration's history, or the
    profile's max) and runs the call in the fixed-budget runner of that budget:
    the same engine, with settings made once per distinct budget.
    """
    fixed = base.integration
    typ = base.operation_type
    runtime = RUNTIME
    plain = _runner(base)  # no integration running: the fallback (or strict's refusal)
    runners: dict[tuple[Any, float, str], Engine] = {}

    def run(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        integration = fixed if fixed is not None else runtime.default
        if integration is None or integration.budget_clock is None:
            return plain(wrapped, instance, args, kwargs)
        beats, source = _auto_beats(integration, typ, profile)
        key = (integration, beats, source)
        runner = runners.get(key)
        if runner is None:
            if len(runners) >= _AUTO_RUNNERS_MAX:
                runners.clear()
            settings = attrs.evolve(base, beats=beats, budget_source=source, integration=integration)
            runner = runners[key] = _runner(settings)
        return runner(wrapped, instance, args, kwargs)

    return run


def _block_auto(beats: str, operation_type: Any, integration: BudgetHost | None) -> tuple[float, str]:
    """``track_operation(beats="auto")``: the budget now, from the history of the integration to run it."""
    if beats != AUTO:
        raise InvalidArgument("beats", beats, 'must be a finite number of beats > 0 or "auto"')
    if not isinstance(operation_type, str) or not operation_type:
        raise InvalidArgument("operation_type", operation_type, "must be a non-empty string")
    resolved = integration if integration is not None else RUNTIME.default
    if resolved is None or resolved.budget_clock is None:
        return _PLACEHOLDER, "fixed"  # runs plainly (or strict refuses): no budget is used
    return resolved.history.resolve(operation_type)


def track_operation(
    operation_id: str,
    operation_type: str,
    *,
    beats: float | Literal["auto"],
    peers: int = 0,
    integration: BudgetHost | None = None,
    on_exhaust: OnExhaust = "interrupt",
    warn_at: Iterable[float] | None = DEFAULT_WARN_AT,
    data: Any = None,
    manual_phases: bool = False,
    on_warning: Callable[[Tracker, float], Any] | None = None,
    strict: bool = False,
    priority: Priority = "normal",
    depends_on: Iterable[str] | None = None,
    correlation_id: str | None = None,
    parent_id: str | None = None,
) -> Tracker:
    """Track a block as the seed's explicit operation, with a beat budget.

    Entering registers the operation (STARTED, claimed) and moves it to EXECUTING
    (claimed) unless ``manual_phases``; leaving normally completes it (``done``
    claimed); leaving by an exception fails it with the exception as reason, and
    the exception propagates. With no started integration the block runs plainly
    (logged once) and the handle's methods do nothing.

    Args:
        operation_id: unique id (the claims' ``task_id``).
        operation_type: ``election``, ``dht_store``, ``pubsub_sync``, ``peer_discovery`` or a user type.
        beats: the budget, in beats (> 0), or ``"auto"`` (from the type's history, resolved
            now; see ``docs/learning.md``).
        peers: initial peer count.
        integration: the integration (None: the process default).
        on_exhaust: ``"interrupt"`` (raise :class:`BeatBudgetExceeded` inside the block),
            ``"raise_after"`` (raise it when the block ends) or ``"warn"`` (claim and log).
        warn_at: fractions of the budget at which a warning is claimed and ``on_warning`` runs.
        data: kept with the operation.
        manual_phases: stay in STARTED; move phases with ``op.set_phase``.
        on_warning: ``on_warning(op, fraction)``, on the budget callback thread.
        strict: raise :class:`IntegrationNotStarted` instead of running plainly.
        priority: ``critical``, ``high``, ``normal`` or ``low``: its claims go first in
            each beat's sweep (critical, high), or are coalesced first under pressure (low).
        depends_on: ids of operations it depends on: while any of them is active in
            this integration, it claims ``waiting`` (see :meth:`Tracker.wait_for`).
        correlation_id: continue a workflow started elsewhere (another agent's ``op.correlation_id``).
        parent_id: the enclosing operation's id, when it runs elsewhere.

    Returns:
        The tracker, a context manager (``with track_operation(...) as op:``).

    Raises:
        InvalidArgument: an argument is out of range; ``"auto"`` for a type with no profile
            and too little history; ``integration``
            is not an Integration.
        IntegrationNotStarted: ``strict`` and no started integration.
        BudgetOnEventLoop: called on the thread of a running asyncio event loop (with a
            started integration): the budget's exception would hit whichever task runs;
            budget the work in a thread (``await asyncio.to_thread(fn)``).
    """
    source = "fixed"
    kind = type(beats)
    if kind is str:  # cheaper than isinstance on this hot path; mypy does not narrow it
        beats, source = _block_auto(cast(str, beats), operation_type, integration)
        kind = type(beats)
    if type(operation_id) is not str or not operation_id or len(operation_id) > 64:  # 64 chars fit 256 bytes
        check_wire_id("operation_id", operation_id)
        operation_id = str(operation_id)
    if type(peers) is not int or peers < 0:
        if isinstance(peers, bool) or not isinstance(peers, int) or peers < 0:
            raise InvalidArgument("peers", peers, "must be an integer >= 0")
        peers = int(peers)
    opts = None
    if depends_on is not None or correlation_id is not None or parent_id is not None:
        opts = (
            check_id("parent_id", parent_id),
            check_id("correlation_id", correlation_id),
            () if depends_on is None else check_ids("depends_on", depends_on),
        )
    settings = None
    key: tuple[Any, ...] | None = None
    if on_warning is None and kind in CACHED_NUMBERS:
        key = (beats, operation_type, on_exhaust, warn_at, strict, manual_phases, priority, source)
        try:
            settings = RUNTIME.block_settings[key]  # a subscript: cheaper than .get() (it hits)
        except KeyError:  # first seen: checked below, then cached
            pass
        except TypeError:  # an unhashable warn_at (a list): checked every time
            key = None
    if settings is None:
        settings = block_settings(
            key,
            beats,
            operation_type,
            on_exhaust,
            warn_at,
            on_warning,
            strict,
            manual_phases,
            source,
            priority,
        )
    if integration is not None:
        if type(integration) not in HOST_TYPES:
            check_host(integration)
        resolved: BudgetHost | None = integration
    else:
        resolved = RUNTIME.default
    if resolved is None or resolved.budget_clock is None:
        if resolved is not None:
            resolved.refuse_if_forked()
        resolved = None
        if strict:
            raise IntegrationNotStarted("track_operation(strict=True) needs a started integration")
        _log_fallback(f"operation {operation_id}", integration)
    elif _get_running_loop() is not None:
        raise BudgetOnEventLoop(operation_id)
    # Tracker.__init__'s stores, inlined (the constructor's call costs ~60 ns on the block's
    # path, a fifth of what workflows add to it); change them together. And Block's two own
    # slots (``exhausted``, ``_opts``): a slot read without a value would raise.
    t = _new(Block)
    t.settings = settings
    t.integration = resolved
    t.seq = next_seq()
    t.op_id = operation_id
    t.data = data
    t.peers = peers
    t.announced = t.done = t.finished = t.exhausted = False
    t._token = None
    t._opts = opts
    return t


def beat_budget(
    beats: float | Literal["auto"] | None = None,
    *,
    profile: str | None = None,
    integration: BudgetHost | None = None,
    operation_type: str | None = None,
    on_exhaust: OnExhaust = "interrupt",
    warn_at: Iterable[float] | None = DEFAULT_WARN_AT,
    name: str | None = None,
    on_warning: Callable[[Tracker, float], Any] | None = None,
    strict: bool = False,
    priority: Priority = "normal",
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Give every call of the decorated function a budget of ``beats`` beats.

    Works on functions, methods, classmethods and staticmethods (via wrapt); the
    signature survives. Each call runs in a fresh tracker: it is claimed only if
    it is still running at a beat, gets a warning, runs out or fails. The
    integration is resolved at call time; with none started the call runs
    plainly (logged once), or raises with ``strict=True``.

    Args:
        beats: the budget, in beats (> 0), or ``"auto"``: resolved at each call from the
            history of ``operation_type`` (its profile's max until it has 20 runs; see
            ``docs/learning.md``).
        profile: instead of ``beats``: the max of this budget profile (resolved at each call,
            so ``BackbeatConfig(budget_profiles=...)`` counts); ``operation_type`` defaults to it.
        integration: the integration (None: the process default).
        operation_type: the claims' ``operation_type`` (default ``"budget"``, or ``profile``).
        on_exhaust: ``"interrupt"``, ``"raise_after"`` or ``"warn"`` (see :func:`track_operation`).
        warn_at: fractions of the budget at which a warning is claimed.
        name: operation id prefix (default: the function's qualified name); ids are ``{name}-{n}``.
        on_warning: ``on_warning(tracker, fraction)``, on the budget callback thread.
        strict: raise :class:`IntegrationNotStarted` when no integration is started.
        priority: ``critical``, ``high``, ``normal`` or ``low`` (see :func:`track_operation`).

    Returns:
        The decorator.

    Raises:
        TypeError: (at decoration) the target is an ``async def`` or generator function.
        InvalidArgument: an argument is out of range; neither or both of ``beats`` and
            ``profile``; (at a call) ``"auto"`` for a type with no profile and too little
            history, or an unknown ``profile``; ``integration``
            is not an Integration.

    Example:
        >>> from backbeat_sync import beat_budget
        >>> @beat_budget(3)
        ... def store(key: str, value: bytes) -> int:
        ...     return len(value)
        >>> store("k", b"abc")   # no integration started: runs plainly
        3
    """
    automatic = beats == AUTO if isinstance(beats, str) else False
    if isinstance(beats, str) and not automatic:
        raise InvalidArgument("beats", beats, 'must be a finite number of beats > 0 or "auto"')
    if profile is not None:
        if beats is not None:
            raise InvalidArgument("profile", profile, "give beats or a profile, not both")
        if not isinstance(profile, str) or not profile:
            raise InvalidArgument("profile", profile, "must be the name of a budget profile")
        automatic = True
        if operation_type is None:
            operation_type = profile
    elif beats is None:
        raise InvalidArgument("beats", None, 'give a number of beats, "auto", or profile=')
    base = BudgetSettings(
        _PLACEHOLDER if automatic else beats,
        operation_type="budget" if operation_type is None else operation_type,
        on_exhaust=on_exhaust,
        warn_at=warn_at,
        on_warning=on_warning,
        name=name,
        strict=strict,
        integration=integration,
        priority=priority,
    )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        target = getattr(func, "__func__", func)
        _refuse_unbudgetable("@beat_budget", target)
        if not callable(target):
            raise TypeError(f"@beat_budget needs a function, not {type(func).__name__}")
        settings = base if base.name else attrs.evolve(base, name=getattr(target, "__qualname__", "call"))
        # strict must always check (and raise); wrapt tests a list's truth in C (its stubs
        # only name bool-like objects, hence Any)
        gate: Any = None if settings.strict else RUNTIME.budgets_on
        engine = _auto_runner(settings, profile) if automatic else _runner(settings)
        if inspect.isfunction(func):  # a plain function (a method too, while in its class body)
            return cast("Callable[P, R]", _budgeted_function(func, engine, gate))
        return cast("Callable[P, R]", wrapt.decorator(enabled=gate)(engine)(func))

    return decorate


def _budgeted_function(
    func: Callable[..., Any], engine: Engine, gate: Any
) -> wrapt.FunctionWrapper[..., Any]:
    """``wrapt.FunctionWrapper(func, engine, enabled=gate)`` whose direct call skips wrapt's probe.

    wrapt's C ``FunctionWrapper.__call__``, for a wrapper of a plain function called
    unbound (a function, not a method looked up on an instance), asks the function
    for ``__self__`` (in case it wraps a bound method), and a function has none: an
    ``AttributeError`` is made and cleared on every call, about 400 ns, three
    quarters of what a pass-through wrapt decorator costs per call (wrapt 2.5,
    CPython 3.11; ``docs/performance.md``). For a plain function the answer is known
    at decoration (it has no ``__self__``), so this subclass's ``__call__`` does what
    wrapt's then does (the gate, then ``engine(func, None, args, kwargs)``) without
    asking. Everything else is wrapt's: binding as a method (``__get__`` makes wrapt's
    bound wrapper, which calls ``engine`` with the instance), introspection
    (``__wrapped__``, ``__name__``, ``__doc__``, the signature), ``enabled``.

    A subclass must name its bound wrapper type (``__bound_function_wrapper__``) for
    wrapt's ``__get__`` to find it without a failed lookup of its own (see below).

    The class is made per decorated function so that ``__call__`` reads ``func``,
    ``engine`` and ``gate`` from its closure: attributes of a Python subclass of wrapt's
    proxy cost ~90 ns each to read (through the proxy's ``__getattr__`` machinery).
    It costs ~2 KiB and ~10 us per decorated function, once, at decoration.
    """
    if gate is None:  # strict: always the engine (it raises when no integration runs)

        def __call__(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            return engine(func, None, args, kwargs)

    else:

        def __call__(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            if gate:  # RUNTIME.budgets_on: a list, true while budgets can run (as wrapt tests it)
                return engine(func, None, args, kwargs)
            return func(*args, **kwargs)

    cls = type(
        "BudgetedFunction",
        (wrapt.FunctionWrapper,),
        {
            "__call__": __call__,
            "__module__": __name__,
            # wrapt's __get__ (a method looked up on an instance) asks a subclass for its bound
            # wrapper type, and without this one it asks in vain: an AttributeError made and
            # cleared on every lookup, about 450 ns (the C FunctionWrapper itself is not asked).
            "__bound_function_wrapper__": wrapt.BoundFunctionWrapper,
        },
    )
    return cast("wrapt.FunctionWrapper[..., Any]", cls(func, engine, enabled=gate))
