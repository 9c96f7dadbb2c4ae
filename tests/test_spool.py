"""The spool (``BackbeatConfig.spool_path``): finals NATS did not confirm by stop() survive to the next run.

The files on their own, then real nats-servers with a raw nats-py subscriber on
the other side: a server killed before ``stop()``, brought back, and a new
integration of the same agent that delivers what the first could not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from backbeat_sync import BackbeatConfig, ConfigError, Integration
from backbeat_sync._time import ManualTime
from backbeat_sync.claims import ClaimFactory
from backbeat_sync.operations import OperationPhase
from backbeat_sync.protocol import parse_status_claim
from backbeat_sync.signing import SigningKey, Verifier, generate_private_key
from backbeat_sync.transport.nats.spool import Spool, SpoolError

from .natsserver import AsyncRunner, NatsServer, Witness
from .support import wait_until

CLUSTER = "spool"
AGENT = "agent-s"
NODE = "12D3KooWSpool"


def done_claim(task: str) -> Any:
    factory = ClaimFactory(CLUSTER, AGENT, NODE, ManualTime())
    return factory.make(task, "election", OperationPhase.COMPLETED, 3, 0, 5, None, 4, None)


def spool_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".")) if directory.exists() else []


# -- the files ---------------------------------------------------------------------------


def test_spool_files_round_trip_and_are_per_agent(tmp_path: Path) -> None:
    """Written claims read back equal; another agent's spool in the same directory is not read."""
    spool = Spool(str(tmp_path / "s"), CLUSTER, AGENT)
    other = Spool(str(tmp_path / "s"), CLUSTER, "agent-t")
    claims = [("backbeat.status.spool.agent-s", done_claim(f"op-{k}"), f"id-{k}") for k in range(3)]
    first = spool.write(claims[:2])
    second = spool.write(claims[2:])
    other.write([("backbeat.status.spool.agent-t", done_claim("theirs"), None)])
    assert first != second
    assert [first, second] == spool.files()
    loaded, files, problems = spool.load()
    assert ([], [first, second]) == (problems, files)
    assert [(s, c.to_dict(), i) for s, c, i in claims] == [(s, c.to_dict(), i) for s, c, i in loaded]
    assert (tmp_path / "s" / first.name).stat().st_mode & 0o077 == 0  # only the owner reads claims
    assert Spool.remove(files) == []
    assert spool.files() == []
    assert len(other.files()) == 1


def test_a_damaged_spool_line_is_skipped_and_named(tmp_path: Path) -> None:
    """A line that is not a claim is reported with its file and line number; the others load."""
    spool = Spool(str(tmp_path), CLUSTER, AGENT)
    path = spool.write([("s.t", done_claim("good"), "id-good")])
    old_line = json.dumps({"subject": "s.t", "claim": done_claim("older").to_dict(signed=False)})
    path.write_text(
        path.read_text() + '{"subject": "s.t", "claim": {"type": "nope"}}\nnot json\n' + old_line + "\n"
    )
    (tmp_path / f".{spool.prefix}x.tmp").write_text("half a file")  # a writer that died: ignored
    loaded, files, problems = spool.load()
    # a line from before msg_id was kept loads, with no id (worked out from the claim when sent)
    assert [(c.task_id, i) for _, c, i in loaded] == [("good", "id-good"), ("older", None)]
    assert [path] == files
    assert len(problems) == 2
    assert "line 2" in problems[0]
    assert "line 3" in problems[1]


def test_a_spool_that_cannot_be_written_raises_spool_error(tmp_path: Path) -> None:
    """A spool path that is a file is a SpoolError naming the directory; nothing is left behind."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match="cannot write a spool file in"):
        Spool(str(blocker), CLUSTER, AGENT).write([("s.t", done_claim("x"), None)])


def test_spool_path_comes_from_the_environment() -> None:
    """CHORUS_BACKBEAT_SPOOL_PATH sets spool_path; an empty one is a ConfigError naming the variable."""
    assert (
        BackbeatConfig.from_env({"CHORUS_BACKBEAT_SPOOL_PATH": "/var/spool/bb"}).spool_path == "/var/spool/bb"
    )
    with pytest.raises(ConfigError) as info:
        BackbeatConfig.from_env({"CHORUS_BACKBEAT_SPOOL_PATH": ""})
    assert info.value.field == "CHORUS_BACKBEAT_SPOOL_PATH"


# -- through a real server ----------------------------------------------------------------


def config(url: str, spool: Path, **kw: Any) -> BackbeatConfig:
    return BackbeatConfig(
        cluster_id=CLUSTER,
        agent_id=kw.pop("agent_id", AGENT),
        nats_url=url,
        spool_path=str(spool),
        flush_timeout=0.5,
        reconnect_wait=0.05,
        **kw,
    )


def done_for(witness: Witness, task: str) -> list[dict[str, Any]]:
    return [d for d in witness.dicts() if d.get("task_id") == task and d.get("state") == "done"]


def finish_while_the_server_is_down(server: NatsServer, cfg: BackbeatConfig, task: str) -> dict[str, Any]:
    """Start, kill the server, complete ``task`` (queued, never sent), stop: returns the transport's stats."""
    integration = Integration(cfg, node_id=NODE)
    with integration:
        integration.start_p2p_operation(task, "election", 5)
        if integration.get_health()["connected"]:
            wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="the start claim sent")
        server.kill()
        wait_until(lambda: not integration.get_health()["connected"], what="the outage")
        integration.complete_p2p_operation(task, 3)
    errors = integration.get_health()["errors"]
    assert any("spooled to" in e for e in errors), errors
    stats: dict[str, Any] = integration.transport.stats()  # type: ignore[union-attr]
    return stats


@pytest.mark.nats
def test_a_final_lost_at_stop_is_sent_exactly_once_by_the_next_integration(
    nats_server: NatsServer, nats_runner: AsyncRunner, tmp_path: Path
) -> None:
    """Server killed before stop(): the done claim is spooled, sent once by the next run, the file removed."""
    spool = tmp_path / "spool"
    signing = generate_private_key()
    cfg = config(nats_server.url, spool, signing_key=signing)
    stats = finish_while_the_server_is_down(nats_server, cfg, "op-1")
    assert (stats["claims_spooled"], stats["claims_dropped"]) == (1, 0)
    assert len(spool_files(spool)) == 1
    nats_server.start()
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    with Integration(cfg, node_id=NODE) as second:
        witness.wait_for(lambda ds: any(d.get("task_id") == "op-1" for d in ds), what="the spooled claim")
        wait_until(lambda: spool_files(spool) == [], what="the spool file to go")
        assert second.transport.stats()["claims_unspooled"] == 1  # type: ignore[union-attr]
    assert spool_files(spool) == []
    done = done_for(witness, "op-1")
    assert len(done) == 1
    assert (done[0]["agent_id"], done[0]["node_id"], done[0]["peer_count"]) == (AGENT, NODE, 3)
    raw = next(m for m in witness.messages if b'"op-1"' in m)
    witness.close()
    assert (
        Verifier.from_keys([SigningKey.load(signing).public_text()]).verify(parse_status_claim(raw)) == "ok"
    )


@pytest.mark.nats
def test_a_spool_is_kept_while_the_server_stays_away_and_merged(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A second run that cannot reach the server either spools the old finals with its own, in one file."""
    spool = tmp_path / "spool"
    cfg = config(nats_server.url, spool, connect_in_background=True)
    finish_while_the_server_is_down(nats_server, cfg, "op-1")
    integration = Integration(cfg, node_id=NODE)
    with integration:
        integration.start_p2p_operation("op-2", "election", 5)
        integration.fail_p2p_operation("op-2", "no quorum")
    stats = integration.transport.stats()  # type: ignore[union-attr]
    # op-2's start claim is intermediate: never spooled, so counted as dropped.
    assert (stats["claims_unspooled"], stats["claims_spooled"], stats["claims_dropped"]) == (1, 2, 1)
    files = spool_files(spool)
    assert len(files) == 1
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [(x["claim"]["task_id"], x["claim"]["state"]) for x in lines] == [
        ("op-1", "done"),
        ("op-2", "failed"),
    ]


@pytest.mark.nats
def test_another_agent_does_not_send_a_spool(
    nats_server: NatsServer, nats_runner: AsyncRunner, tmp_path: Path
) -> None:
    """The spool is per agent: an integration with another agent id leaves it for its owner."""
    spool = tmp_path / "spool"
    finish_while_the_server_is_down(nats_server, config(nats_server.url, spool), "op-1")
    nats_server.start()
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    with Integration(config(nats_server.url, spool, agent_id="agent-t"), node_id=NODE) as other:
        other.start_p2p_operation("theirs", "election", 3)
        other.complete_p2p_operation("theirs", 1)
        witness.wait_for(lambda ds: bool([d for d in ds if d.get("task_id") == "theirs"]), what="their claim")
    assert done_for(witness, "op-1") == []
    witness.close()
    assert len(spool_files(spool)) == 1


@pytest.mark.nats
def test_an_unwritable_spool_counts_the_final_as_dropped(nats_server: NatsServer, tmp_path: Path) -> None:
    """If the spool cannot be written, stop() says so and the final is counted in claims_dropped."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    integration = Integration(config(nats_server.url, blocker), node_id=NODE)
    with integration:
        integration.start_p2p_operation("op-1", "election", 5)
        nats_server.kill()
        wait_until(lambda: not integration.get_health()["connected"], what="the outage")
        integration.complete_p2p_operation("op-1", 3)
    health = integration.get_health()
    assert any("not spooled: cannot write a spool file" in e for e in health["errors"])
    assert health["claims_dropped"] >= 1


EXIT_SCRIPT = """
import os, signal, sys, time
from backbeat_sync import BackbeatConfig, Integration
cfg = BackbeatConfig(cluster_id={cluster!r}, agent_id={agent!r}, nats_url={url!r},
                     spool_path={spool!r}, flush_timeout=0.5, reconnect_wait=0.05)
integration = Integration(cfg, node_id="n")
integration.start()
integration.start_p2p_operation("exit-op", "election", 5)
os.kill({pid}, signal.SIGKILL)
while integration.get_health()["connected"]:
    time.sleep(0.01)
integration.complete_p2p_operation("exit-op", 2)
print("queued", flush=True)
"""


@pytest.mark.nats
def test_the_exit_hook_spools_too(nats_server: NatsServer, nats_runner: AsyncRunner, tmp_path: Path) -> None:
    """A process that exits without stop() while the server is down leaves the final in the spool."""
    spool = tmp_path / "spool"
    assert nats_server.proc is not None
    code = textwrap.dedent(
        EXIT_SCRIPT.format(
            cluster=CLUSTER, agent=AGENT, url=nats_server.url, spool=str(spool), pid=nats_server.proc.pid
        )
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    files = spool_files(spool)
    assert len(files) == 1
    assert [json.loads(line)["claim"]["task_id"] for line in files[0].read_text().splitlines()] == ["exit-op"]
    nats_server.proc.wait()
    nats_server.start()
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    with Integration(config(nats_server.url, spool), node_id=NODE):
        witness.wait_for(lambda ds: any(d.get("task_id") == "exit-op" for d in ds), what="the spooled claim")
        wait_until(lambda: spool_files(spool) == [], what="the spool file to go")
    assert len(done_for(witness, "exit-op")) == 1
    witness.close()
