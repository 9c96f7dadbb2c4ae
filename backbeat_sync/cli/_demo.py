"""``backbeat-sync demo``: a sample agent runs the seed's four flows under beat budgets."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from .. import (
    BackbeatConfig,
    BeatBudgetExceeded,
    BeatFrame,
    Integration,
    OperationPhase,
    StatusClaim,
    beat_budget,
    track_operation,
)
from ._base import EXIT_NO_BEAT, EXIT_OK, PROG, Command, Out, port, positive_int, require_extra, tempo
from ._render import Screen, print_table
from ._view import ClusterView

DEMO_CLUSTER: Final = "backbeat-demo"
DEMO_AGENT: Final = "demo-agent"
DEMO_NODE: Final = "12D3KooWDemoAgent"


@attrs.define
class _Outcome:
    flow: str
    outcome: str  # "done", "stopped" (budget), "failed"
    beats_used: float
    detail: str = ""


#: flow name -> (API shown in the summary, beat budget)
_FLOWS: Final = {
    "election": ("track_operation", 5),
    "dht_store": ("track_operation", 3),
    "pubsub_sync": ("@beat_budget", 2),
    "peer_discovery": ("@beat_budget", 3),
}


class _Demo:
    """A sample agent: each bar, the seed's four flows run in threads under beat budgets."""

    def __init__(self, args: argparse.Namespace, out: Out) -> None:
        self.args = args
        self.out = out
        overrides: dict[str, Any] = {
            "cluster_id": args.cluster or DEMO_CLUSTER,
            "agent_id": DEMO_AGENT,
            "tempo_bpm": args.tempo,
            "bar_length": args.bar,
        }
        if args.nats:
            overrides["nats_url"] = args.nats
        if args.connect_timeout is not None:
            overrides["connect_timeout"] = args.connect_timeout
        self.config = BackbeatConfig.from_env(defaults={"nats_url": f"local://{DEMO_CLUSTER}"}, **overrides)
        self.view = ClusterView(self.config.cluster_id)
        self.results: list[_Outcome] = []
        self._lock = threading.Lock()
        self._beat = threading.Condition()
        self._last_beat: BeatFrame | None = None
        self._round = 0
        self._screen: Screen | None = None
        self.integration: Integration | None = None

    # -- callbacks (the integration's callback thread) ---------------------------------

    def _on_beat(self, frame: BeatFrame) -> None:
        lines = self.view.frame(frame)
        if self._screen is not None:
            self._screen.lines(lines)
        with self._beat:
            self._last_beat = frame
            self._beat.notify_all()

    def _on_claim(self, claim: StatusClaim) -> None:
        lines = self.view.claim(claim)
        if self._screen is not None:
            self._screen.lines(lines)

    def _wait_beat(self, predicate: Callable[[BeatFrame], bool], timeout: float) -> bool:
        with self._beat:
            return self._beat.wait_for(
                lambda: self._last_beat is not None and predicate(self._last_beat), timeout
            )

    # -- the four flows ------------------------------------------------------------------

    def _beats(self, n: float) -> float:
        assert self.integration is not None
        return n * self.integration.clock.beat_duration

    def _busy(self, beats: float) -> None:
        """Plain blocking work, in short slices (a budget can interrupt it between two)."""
        end = time.monotonic() + self._beats(beats)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.005))

    def _flows(self) -> dict[str, Callable[[int], object]]:
        integration = self.integration

        def election(r: int) -> object:
            with track_operation(
                f"election-{r}",
                "election",
                beats=5,
                integration=integration,
                manual_phases=True,
                data={"candidates": 3, "quorum": 2},
            ) as op:
                op.set_phase(OperationPhase.CONNECTING, peers=3)
                op.sleep(self._beats(0.75))
                op.set_phase(OperationPhase.NEGOTIATING, peers=3)
                op.sleep(self._beats(1.25))
                op.set_phase(OperationPhase.EXECUTING, peers=3)
                op.sleep(self._beats(0.75))
            return "leader elected"

        def dht_store(r: int) -> object:
            with track_operation(
                f"dht-store-k{r}",
                "dht_store",
                beats=3,
                peers=3,
                integration=integration,
                data={"key": f"k{r}"},
            ) as op:
                op.sleep(self._beats(0.5))
                op.set_phase(OperationPhase.EXECUTING, peers=5)
                op.sleep(self._beats(1.25))
            return "stored"

        @beat_budget(2, integration=integration, operation_type="pubsub_sync", name="pubsub-sync")
        def sync_topic(topic: str) -> int:
            self._busy(1.0)
            return 3

        @beat_budget(3, integration=integration, operation_type="peer_discovery", name="peer-discovery")
        def discover_peers(target: int) -> list[str]:
            peers = []
            for n in range(target):  # 10 peers at half a beat each: 5 beats, over its budget of 3
                self._busy(0.5)
                peers.append(f"peer-{n}")
            return peers

        return {
            "election": election,
            "dht_store": dht_store,
            "pubsub_sync": lambda r: sync_topic(f"chorus/tasks/{r}"),
            "peer_discovery": lambda r: discover_peers(10),
        }

    def _run_flow(self, name: str, fn: Callable[[int], object], r: int) -> None:
        assert self.integration is not None
        clock = self.integration.clock
        start = clock.budget_position()
        try:
            fn(r)
        except BeatBudgetExceeded as exc:
            how = "late" if exc.late else "interrupted"
            outcome = _Outcome(name, "stopped", exc.beats_used, f"{how} at {exc.beats_used:.2f} beats")
        except Exception as exc:  # the demo must finish and report, whatever a flow does
            outcome = _Outcome(
                name, "failed", clock.budget_position() - start, f"{type(exc).__name__}: {exc}"
            )
        else:
            outcome = _Outcome(name, "done", clock.budget_position() - start)
        with self._lock:
            self.results.append(outcome)

    # -- the run ---------------------------------------------------------------------

    def _footer(self) -> str:
        with self._lock:
            stopped = sum(1 for o in self.results if o.outcome == "stopped")
            done = sum(1 for o in self.results if o.outcome == "done")
        return (
            f"round {self._round}/{self.args.bars}  ·  operations done {done}, stopped by budget {stopped}"
            "  ·  Ctrl-C to stop"
        )

    def run(self) -> int:
        args, cfg = self.args, self.config
        where = "the in-process pulse" if cfg.is_local else cfg.masked_url
        seconds = args.bars * args.bar * 60.0 / args.tempo
        self.out.line(
            f"{PROG} demo: agent {cfg.agent_id} in cluster {cfg.cluster_id} on {where}, {args.tempo:g} BPM,"
            f" {args.bars} bar(s) of {args.bar} beats (about {seconds:.0f} s)"
        )
        pulse = None
        if not cfg.is_local and not args.no_pulse:
            from ..pulse import Pulse

            sign = None
            if cfg.signing_key is not None:
                from ..signing import SigningKey

                sign = SigningKey.load(cfg.signing_key, cfg.signing_key_id).sign_frame
            pulse = Pulse(cfg, tempo_bpm=args.tempo, bar_length=args.bar, sign=sign)
            pulse.start()
        try:
            return self._run_agent()
        finally:
            if pulse is not None:
                pulse.stop()

    def _run_agent(self) -> int:
        args = self.args
        integration = self.integration = Integration(self.config, node_id=DEMO_NODE)
        integration.on_beat(self._on_beat)
        integration.on_claim(self._on_claim)
        server = None
        with integration:
            self.out.logs_open.set()
            if args.metrics_port is not None:
                server = integration.serve_metrics(args.metrics_port)
                self.out.line(f"metrics: {server.url}")
            try:
                flows = self._flows()
                spb = 60.0 / args.tempo
                with Screen(
                    self.out, self.view, f"backbeat-sync demo · {self.config.cluster_id}", self._footer
                ) as screen:
                    self._screen = screen
                    if not self._wait_beat(lambda f: True, max(5.0, 4 * spb)):
                        print(
                            f"{PROG} demo: no beat on {self.config.beat_subject_for()}:"
                            " is a pulse running (drop --no-pulse)?",
                            file=sys.stderr,
                        )
                        return EXIT_NO_BEAT
                    for r in range(1, args.bars + 1):
                        self._round = r
                        self._run_round(flows, r, spb)
                    last = self._last_beat.beat_index if self._last_beat is not None else 0
                    self._wait_beat(lambda f: f.beat_index > last, 2 * spb)
                    self._screen = None
                self.out.logs_open.clear()  # what a normal stop logs is not news
                health = integration.get_health()
            finally:
                if server is not None:
                    server.close()
        self._summary(health)
        return EXIT_OK

    def _run_round(self, flows: dict[str, Callable[[int], object]], r: int, spb: float) -> None:
        threads = [
            threading.Thread(target=self._run_flow, args=(name, fn, r), name=f"demo-{name}-{r}", daemon=True)
            for name, fn in flows.items()
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 12 * spb + 2.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _summary(self, health: Mapping[str, Any]) -> None:
        rows = []
        for name, (api, budget) in _FLOWS.items():
            mine = [o for o in self.results if o.flow == name]
            used = [o.beats_used for o in mine]
            mean = f"{sum(used) / len(used):.2f}" if used else "-"
            rows.append(
                [
                    name,
                    api,
                    budget,
                    len(mine),
                    sum(1 for o in mine if o.outcome == "done"),
                    sum(1 for o in mine if o.outcome == "stopped"),
                    sum(1 for o in mine if o.outcome == "failed"),
                    mean,
                ]
            )
        self.out.line()
        print_table(
            self.out,
            "Operations",
            [
                "flow",
                "API",
                "budget",
                "runs",
                "done",
                "stopped",
                "failed",
                "beats used",
            ],
            rows,
        )
        figures: list[list[Any]] = [
            ["beats received", health.get("beats_received")],
            ["missed beats", health.get("missed_beats")],
            ["tempo (BPM)", f"{health.get('current_tempo', 0):g}"],
            ["measured (BPM)", f"{health.get('measured_bpm', 0.0):.2f}"],
            ["tempo drift", health.get("tempo_drift")],
            ["claims emitted", health.get("claims_emitted")],
            ["local degradation", health.get("local_degradation")],
        ]
        from ..metrics import EXHAUSTION_KEYS  # a plain mapping; prometheus-client is not needed

        figures.append(["budget warnings", health.get("budget_warnings", 0)])
        for (mode, outcome), key in EXHAUSTION_KEYS.items():
            if health.get(key):
                figures.append([f"budgets exhausted ({mode}, {outcome})", health[key]])
        self.out.line()
        print_table(self.out, "Agent health", ["figure", "value"], figures)
        stopped = [o for o in self.results if o.outcome == "stopped"]
        failed = [o for o in self.results if o.outcome == "failed"]
        self.out.line()
        if stopped:
            self.out.line(
                f"{len(stopped)} overrunning operation(s) stopped by their budget"
                f" ({stopped[0].flow}: {stopped[0].detail}); BeatBudgetExceeded was raised in its own thread."
            )
        for o in failed:
            self.out.line(f"unexpected failure in {o.flow}: {o.detail}")
        self.out.line(
            "Next: docs/quickstart.md, and examples/decorate_functions.py to budget your own function."
        )


def _cmd_demo(args: argparse.Namespace, out: Out) -> int:
    """``demo``: a sample agent runs the seed's four flows under budgets, with a live view and a summary."""
    if args.metrics_port is not None:
        require_extra("prometheus_client", "prometheus", "--metrics-port")
    demo = _Demo(args, out)
    return demo.run()


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tempo", type=tempo, default=120.0, metavar="BPM", help="beats per minute (default 120)")
    p.add_argument("--bar", type=positive_int, default=4, metavar="N", help="beats per bar (default 4)")
    p.add_argument("--bars", type=positive_int, default=8, metavar="N", help="bars to run (default 8)")
    p.add_argument("--no-pulse", action="store_true", help="with --nats: follow a pulse that already runs")
    p.add_argument("--metrics-port", type=port, metavar="PORT", help="serve Prometheus metrics on PORT")


COMMAND: Final = Command(
    name="demo",
    help="run a sample agent: four operation flows, budgets, a live view, a summary",
    epilog="""examples:
  backbeat-sync demo                         # in-process pulse, 120 BPM, 8 bars
  backbeat-sync demo --bars 2 --tempo 240    # shorter and faster
  backbeat-sync demo --nats nats://localhost:4222          # the same on a real server
  backbeat-sync demo --metrics-port 9464     # and serve Prometheus metrics meanwhile

The demo never joins your real cluster: it uses --cluster (default backbeat-demo),
and on a real server it runs its own pulse for that cluster unless --no-pulse.""",
    add_arguments=_arguments,
    run=_cmd_demo,
    nats_default="local://, the in-process pulse",
    quiet_logs=True,
)
