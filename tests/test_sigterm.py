"""``Integration.stop()`` from a SIGTERM handler (how Kubernetes stops a pod), in subprocesses.

A Python signal handler runs on the main thread between two bytecodes of
whatever it was doing: here, a loop of ``start/complete_p2p_operation``,
``track_operation`` blocks and ``@beat_budget`` calls, so the handler often runs
while that thread holds the operation registry's lock. Each trial sends SIGTERM
from outside at a random moment and must end on its own, within a timeout that
turns a hang into a failure, with every operation's final claim delivered.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from loguru import logger
    import backbeat_sync as bb
    from backbeat_sync.errors import BackbeatError

    logger.remove()
    mode = sys.argv[1]
    cfg = bb.BackbeatConfig(cluster_id="sig", agent_id="a", nats_url=f"local://sig-{os.getpid()}",
                            tempo_bpm=6000)
    integ = bb.Integration(cfg, node_id="n1")
    started, finals = set(), set()

    def seen(claim):
        started.add(claim.task_id)
        if claim.state in ("done", "failed"):
            finals.add(claim.task_id)

    integ.start()
    integ.on_claim(seen)
    if mode == "plain":
        signal.signal(signal.SIGTERM, lambda *a: integ.stop())
    elif mode == "exit":  # stop, then leave at once (the exception unwinds whatever it interrupted)
        def handler(*a):
            integ.stop()
            sys.exit(0)
        signal.signal(signal.SIGTERM, handler)
    else:
        integ.stop_on_signals(signal.SIGTERM)

    @bb.beat_budget(50, integration=integ)
    def budgeted(n):
        return n + 1

    print("ready", flush=True)
    i = 0
    try:
        while integ.running:
            i += 1
            try:
                integ.start_p2p_operation(f"op-{i}", "election", 5)
                integ.update_p2p_operation_phase(f"op-{i}", "executing", 2)
                integ.complete_p2p_operation(f"op-{i}", 3)
                with bb.track_operation(f"t-{i}", "dht_store", beats=50, integration=integ):
                    budgeted(i)
            except BackbeatError:
                break
    except SystemExit:
        pass
    integ.stop()  # waits for the stop the handler started
    started.discard("chorus-p2p-health")
    finals.discard("chorus-p2p-health")
    print("stopped", integ.state.value, len(started), len(started - finals), flush=True)
    """
)

TRIALS = 30
TIMEOUT = 60.0


def _trial(seed: int, tmp: str) -> tuple[int, str, str, bool]:
    mode = ("helper", "plain", "exit")[seed % 3]
    rng = random.Random(seed)
    p = subprocess.Popen(
        [sys.executable, tmp, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        # A random moment of the loop (the child's own pace: it waits on nothing).
        try:
            p.wait(rng.uniform(0.02, 0.4))
        except subprocess.TimeoutExpired:
            pass
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=TIMEOUT)
        return p.returncode, out, err, False
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return -1, out, err, True


def test_stop_from_sigterm_handler_never_hangs(tmp_path) -> None:
    """30 trials (three handler shapes), a SIGTERM at a random moment each: no hang, no final lost."""
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda s: _trial(s, str(script)), range(TRIALS)))
    hangs = [i for i, r in enumerate(results) if r[3]]
    assert hangs == [], f"trials {hangs} hung (stop() from the SIGTERM handler deadlocked)"
    for i, (rc, out, err, _) in enumerate(results):
        assert rc == 0, f"trial {i}: exit {rc}\n{out}\n{err}"
        assert "Traceback" not in err, f"trial {i}:\n{err}"
        words = out.split()
        assert words[-4:-2] == ["stopped", "stopped"], out
        operations, without_final = int(words[-2]), int(words[-1])
        assert operations > 0
        assert without_final == 0, f"trial {i}: {without_final} of {operations} operations had no final claim"


def test_stop_from_library_threads_and_budgeted_code_returns(tmp_path) -> None:
    """stop() from an on_beat callback, an on_warning callback and a budgeted call: each returns, no raise."""
    script = tmp_path / "threads.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading
            from loguru import logger
            import backbeat_sync as bb

            logger.remove()

            def make(name):
                cfg = bb.BackbeatConfig(cluster_id="c", agent_id=name, nats_url=f"local://stop-{name}",
                                        tempo_bpm=1200)
                integ = bb.Integration(cfg, node_id="n1")
                integ.start()
                return integ

            def stopper(integ, done):
                def stop(*args):
                    try:
                        integ.stop()
                    except BaseException as exc:  # stop() must not raise
                        print("raised", type(exc).__name__, exc, flush=True)
                    done.set()
                return stop

            # from the callback thread
            a, done_a = make("beat"), threading.Event()
            a.on_beat(stopper(a, done_a))
            assert done_a.wait(20)
            # from the budget callback thread
            b, done_b = make("warn"), threading.Event()
            with bb.track_operation("w", "t", beats=100, warn_at=(0.01,), integration=b,
                                    on_warning=stopper(b, done_b)):
                assert done_b.wait(20)
            # from inside a budgeted call, on a worker thread
            c, done_c = make("call"), threading.Event()
            work = bb.beat_budget(100, integration=c)(stopper(c, done_c))
            threading.Thread(target=work).start()
            assert done_c.wait(20)
            for integ in (a, b, c):
                integ.stop()
                print(integ.config.agent_id, integ.state.value, flush=True)
            """
        ),
        encoding="utf-8",
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "raised" not in done.stdout
    assert done.stdout.split() == ["beat", "stopped", "warn", "stopped", "call", "stopped"]


def test_stop_runs_at_once_outside_library_code_and_is_honoured_inside_start() -> None:
    """From plain code stop() is done when it returns; called inside start() (by the user's logger) it
    is handed over, and the integration stops as soon as start() has finished."""
    from backbeat_sync import BackbeatConfig, Integration
    from backbeat_sync._reentry import inside_library

    assert not inside_library()
    integration = Integration(BackbeatConfig(nats_url="local://stop-now", tempo_bpm=600), node_id="n1")
    integration.start()
    integration.stop()
    assert integration.state.value == "stopped"

    class StopOnStart:
        """A user logger that stops the integration when it hears that it started."""

        def __init__(self) -> None:
            self.target: Integration | None = None

        def info(self, msg: str) -> None:
            if "integration started" in msg and self.target is not None:
                self.target.stop()

        def warn(self, msg: str) -> None:
            pass

        def error(self, msg: str) -> None:
            pass

    log = StopOnStart()
    cfg = BackbeatConfig(nats_url="local://stop-inside", tempo_bpm=600)
    inside = Integration(cfg, node_id="n1", logger=log)
    log.target = inside
    inside.start()  # the logger's stop() runs inside start(): asked for, then done at its end
    assert inside.state.value == "stopped"
