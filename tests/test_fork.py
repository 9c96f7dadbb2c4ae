"""Fork safety (issue 10, items 1 and 8): a fork child resets the library's process state.

Every scenario runs in a fresh interpreter (a subprocess with a timeout, so a hang
is a failure): ``os.fork`` by hand, a ``multiprocessing`` fork-context pool, and a
gunicorn-style pre-fork of four workers on a real nats-server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .natsserver import AsyncRunner, NatsServer, Witness

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

ROOT = Path(__file__).resolve().parent.parent
#: A hang in a scenario turns into a failure after this long.
TIMEOUT = 120

PRELUDE = '''
import os, sys, threading, time, traceback
import backbeat_sync as bb

def spin_forever():
    while True:
        pass

def refused(call):
    """True if call() raises ForkedIntegration naming this child and the fork."""
    try:
        call()
    except bb.ForkedIntegration as exc:
        text = str(exc)
        return "fork" in text and str(os.getpid()) in text and isinstance(exc, bb.BackbeatError)
    return False
'''


def run_script(tmp_path: Path, body: str, *args: str) -> str:
    """Run PRELUDE + body in a fresh interpreter; return its stdout (fail on a non-zero exit)."""
    script = tmp_path / "scenario.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_os_fork_child_refuses_the_parents_integration_and_budgets_with_its_own(tmp_path: Path) -> None:
    """In an os.fork() child the inherited integration refuses every call (claims are never
    silently lost), the default is cleared, no library thread runs; a child integration gets
    working budgets, and the parent's keep working."""
    out = run_script(
        tmp_path,
        """
        cfg = bb.BackbeatConfig(cluster_id="fork", agent_id="parent", nats_url="local://fork-parent",
                                tempo_bpm=600)
        parent = bb.Integration(cfg, node_id="p")
        parent.start()

        @bb.beat_budget(2)
        def spin():
            spin_forever()

        @bb.beat_budget(2, integration=parent)
        def pinned():
            return "ran"

        try:
            spin()
        except bb.BeatBudgetExceeded:
            print("parent interrupted before fork")
        parent.start_p2p_operation("parent-op", "dht_store", 5)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                calls = {
                    "start": lambda: parent.start_p2p_operation("child-op", "dht_store", 3),
                    "update": lambda: parent.update_p2p_operation_phase("parent-op", "executing", 1),
                    "complete": lambda: parent.complete_p2p_operation("parent-op", 1),
                    "fail": lambda: parent.fail_p2p_operation("parent-op", "x"),
                    "health": parent.get_health,
                    "execute": lambda: parent.execute_with_beat_budget(1, lambda: None),
                    "track": lambda: bb.track_operation("t", "t", beats=1, integration=parent),
                    "decorated": pinned,
                    "start_again": parent.start,
                    "on_beat": lambda: parent.on_beat(print),
                    "on_claim": lambda: parent.on_claim(print),
                    "note": lambda: parent.emit_operation_note("parent-op", "x"),
                    "wait": parent.wait_for_beat,
                }
                print("refused:", sorted(k for k, call in calls.items() if refused(call)))
                print("default:", bb.get_default_integration())
                parent.stop()  # the parent's: nothing to do here, and no hang
                print("threads:", sorted(t.name for t in threading.enumerate()))
                own = bb.BackbeatConfig(cluster_id="fork", agent_id="child", nats_url="local://fork-parent",
                                        tempo_bpm=600)
                with bb.Integration(own, node_id="c") as child:
                    print("child default is its own:", bb.get_default_integration() is child)
                    try:
                        spin()
                    except bb.BeatBudgetExceeded as exc:
                        print("child interrupted:", exc.beats_used >= 2)
                    child.start_p2p_operation("child-op", "dht_store", 3)
                    child.complete_p2p_operation("child-op", 1)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child exit:", os.waitstatus_to_exitcode(status))
        try:
            spin()
        except bb.BeatBudgetExceeded:
            print("parent interrupted after fork")
        parent.complete_p2p_operation("parent-op", 1)
        parent.stop()
        """,
    )
    assert "parent interrupted before fork" in out
    assert (
        "refused: ['complete', 'decorated', 'execute', 'fail', 'health', 'note', 'on_beat', 'on_claim',"
        " 'start', 'start_again', 'track', 'update', 'wait']" in out
    )
    assert "default: None" in out
    assert "threads: ['MainThread']" in out
    assert "child default is its own: True" in out
    assert "child interrupted: True" in out
    assert "child exit: 0" in out
    assert "parent interrupted after fork" in out


@pytest.mark.parametrize("held", ["registry", "ops"], ids=["registry-lock", "ops-lock"])
def test_a_child_leaving_a_block_the_parent_entered_never_hangs_on_a_parents_lock(
    tmp_path: Path, held: str
) -> None:
    """A fork inside a ``track_operation`` block, while another parent thread holds a library
    lock (the registry's, or the budget engine's ops lock: the beat thread or the watchdog
    holds them in service), leaves the lock held for ever in the child. Leaving the block
    there (normally, or by an exception: the engine's slower path) must not wait for it:
    the operation is the parent's, and the child makes no claim for it."""
    out = run_script(
        tmp_path,
        """
        from backbeat_sync.budget.arming import ops_lock
        cfg = bb.BackbeatConfig(cluster_id="fk", agent_id="fk1", nats_url="local://fork-held", tempo_bpm=600)
        integration = bb.Integration(cfg, node_id="n1")
        claims = []
        integration.on_claim(lambda c: claims.append((os.getpid(), c.task_id, c.state)))
        integration.start()
        lock = integration.registry.lock if sys.argv[1] == "registry" else ops_lock
        held, release = threading.Event(), threading.Event()

        def holder():
            with lock:
                held.set()
                release.wait()

        for how in ("normally", "by an exception"):
            pid = -1
            try:
                with bb.track_operation(f"op-{how[:2]}", "t", beats=1000):
                    th = threading.Thread(target=holder)
                    th.start()
                    held.wait()
                    pid = os.fork()
                    if pid == 0 and how != "normally":
                        raise KeyError("in the child")
                    if pid:
                        release.set()
            except KeyError:
                pass
            if pid == 0:
                print(f"child left the block {how}", flush=True)
                os._exit(0)
            th.join()
            held.clear()
            release.clear()
            end = time.monotonic() + 20
            while time.monotonic() < end and os.waitpid(pid, os.WNOHANG)[0] == 0:
                time.sleep(0.05)
            else:
                if time.monotonic() >= end:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    print(f"child HUNG leaving the block {how}", flush=True)
        integration.stop()
        print("parent claims from children:", [c for c in claims if c[0] != os.getpid()])
        print("parent done: ", sorted({(c[1], c[2]) for c in claims if c[2] == "done"}))
        """,
        held,
    )
    assert "HUNG" not in out, out
    assert "child left the block normally" in out
    assert "child left the block by an exception" in out
    assert "parent claims from children: []" in out
    assert "parent done:  [('op-by', 'done'), ('op-no', 'done')]" in out


def test_multiprocessing_fork_pool_workers_budget_with_their_own_integration(tmp_path: Path) -> None:
    """A multiprocessing pool (fork start method) made while an integration runs: each task
    is refused the inherited default and budgets on an integration of its own."""
    out = run_script(
        tmp_path,
        """
        import multiprocessing

        cfg = bb.BackbeatConfig(cluster_id="pool", agent_id="parent", nats_url="local://pool-parent",
                                tempo_bpm=600)
        parent = bb.Integration(cfg, node_id="p")
        parent.start()

        @bb.beat_budget(2)
        def spin():
            spin_forever()

        def task(i):
            inherited = refused(lambda: parent.start_p2p_operation(f"x-{i}", "t", 1))
            own = bb.BackbeatConfig(cluster_id="pool", agent_id=f"task-{i}",
                                    nats_url=f"local://pool-{os.getpid()}-{i}", tempo_bpm=600)
            with bb.Integration(own, node_id=f"n{i}"):
                try:
                    spin()
                    interrupted = False
                except bb.BeatBudgetExceeded:
                    interrupted = True
            return inherited, interrupted

        if __name__ == "__main__":
            with multiprocessing.get_context("fork").Pool(2) as pool:
                results = pool.map(task, range(6), chunksize=1)
            print("results:", results)
            parent.stop()
        """,
    )
    assert "results: " + repr([(True, True)] * 6) in out


def test_prefork_workers_budget_and_claim_on_nats(nats_server: NatsServer, tmp_path: Path) -> None:
    """Gunicorn-style: the master starts an integration (preload), forks 4 workers; each refuses
    the master's, starts its own on NATS, runs budgets and claims; every claim arrives."""
    runner = AsyncRunner()
    witness = Witness(runner, nats_server.url, "backbeat.status.prefork.>")
    try:
        out = run_script(
            tmp_path,
            """
            url = sys.argv[1]
            master = bb.Integration(
                bb.BackbeatConfig(cluster_id="prefork", agent_id="master", nats_url=url, tempo_bpm=600),
                node_id="m")
            master.start()

            @bb.beat_budget(2)
            def spin():
                spin_forever()

            def worker(i):
                assert refused(lambda: master.start_p2p_operation(f"w{i}-x", "t", 1))
                cfg = bb.BackbeatConfig(cluster_id="prefork", agent_id=f"worker-{i}", nats_url=url,
                                        tempo_bpm=600)
                with bb.Integration(cfg, node_id=f"w{i}"):
                    for k in range(3):
                        bb.get_default_integration().start_p2p_operation(f"w{i}-op-{k}", "dht_store", 3)
                        bb.get_default_integration().complete_p2p_operation(f"w{i}-op-{k}", 1)
                    with bb.track_operation(f"w{i}-block", "dht_store", beats=50) as op:
                        op.check()
                    try:
                        with bb.track_operation(f"w{i}-spin", "dht_store", beats=2, warn_at=None):
                            spin_forever()
                    except bb.BeatBudgetExceeded:
                        pass
                    try:
                        spin()
                        return False
                    except bb.BeatBudgetExceeded:
                        return True

            pids = []
            for i in range(4):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = 0 if worker(i) else 2
                    except BaseException:
                        traceback.print_exc()
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                pids.append(pid)
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
            print("worker exits:", codes)
            master.start_p2p_operation("master-op", "dht_store", 3)
            master.complete_p2p_operation("master-op", 1)
            master.stop()
            """,
            nats_server.url,
        )
        assert "worker exits: [0, 0, 0, 0]" in out

        def final(msgs: list[dict[str, object]]) -> dict[str, str]:
            return {str(m["task_id"]): str(m["state"]) for m in msgs if m["state"] in ("done", "failed")}

        expected = {f"w{i}-op-{k}": "done" for i in range(4) for k in range(3)}
        expected.update({f"w{i}-block": "done" for i in range(4)})
        expected.update({f"w{i}-spin": "failed" for i in range(4)})
        expected["master-op"] = "done"
        witness.wait_for(
            lambda msgs: all(final(msgs).get(k) == v for k, v in expected.items()),
            timeout=60,
            what="every worker's final claims",
        )
        agents = {str(m["agent_id"]) for m in witness.dicts()}
        assert {"master", "worker-0", "worker-1", "worker-2", "worker-3"} <= agents
        assert not any(str(m["task_id"]).endswith("-x") for m in witness.dicts())
    finally:
        witness.close()
        runner.close()
