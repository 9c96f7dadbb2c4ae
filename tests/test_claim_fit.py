"""A claim always fits a message: ids refused past 256 bytes, reasons and notes truncated (marked).

Unit tests of the protocol helpers and the claim factory, the API refusal on the
in-process transport, and real nats-servers (default and a 4 KiB ``max_payload``)
with a raw nats-py subscriber on the other side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backbeat_sync import BackbeatConfig, ConfigError, Integration, InvalidArgument, track_operation
from backbeat_sync._time import ManualTime
from backbeat_sync.claims import ClaimFactory
from backbeat_sync.operations import OperationPhase
from backbeat_sync.protocol import (
    MAX_ID_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_REASON_BYTES,
    TRUNCATED,
    StatusClaim,
    check_wire_id,
    fit_text,
    parse_status_claim,
    shorten_notes,
)
from backbeat_sync.signing import SigningKey, Verifier, generate_private_key

from .natsserver import AsyncRunner, NatsServer, Witness
from .support import wait_until

CLUSTER = "fit"
NODE = "12D3KooWFit"
HUGE = "r" * 1_100_000


def local_config() -> BackbeatConfig:
    return BackbeatConfig(cluster_id=CLUSTER, agent_id="a", nats_url="local://fit?pulse=manual")


def failed_claim(reason: str) -> StatusClaim:
    factory = ClaimFactory(CLUSTER, "a", NODE, ManualTime())
    return factory.make("op", "election", OperationPhase.FAILED, 3, 0, 5, reason, 2, None)


# -- helpers ------------------------------------------------------------------------


def test_fit_text_keeps_what_fits_and_cuts_the_rest_on_a_character_boundary() -> None:
    """Text that fits is returned as is; longer text is cut to the byte limit and ends in the marker."""
    assert fit_text("abc", 12) == "abc"
    assert fit_text("é" * 100, 200) == "é" * 100
    cut = fit_text("é" * 100, 51)  # 51 - 12 = 39 bytes: 19 whole characters
    assert cut == "é" * 19 + TRUNCATED
    assert len(cut.encode()) <= 51


def test_check_wire_id_refuses_more_than_256_bytes_and_says_how_many() -> None:
    """256 bytes pass (whatever the characters); 257 are refused with a short message."""
    check_wire_id("operation_id", "x" * MAX_ID_BYTES)
    check_wire_id("operation_id", "é" * (MAX_ID_BYTES // 2))
    with pytest.raises(InvalidArgument) as info:
        check_wire_id("operation_id", "é" * (MAX_ID_BYTES // 2) + "x")
    assert "257 bytes" in str(info.value)
    assert "at most 256 bytes" in str(info.value)
    with pytest.raises(InvalidArgument, match="at most 256"):
        check_wire_id("operation_id", "x" * 1_000_000)
    assert len(str(info.value)) < 200
    with pytest.raises(InvalidArgument, match="non-empty"):
        check_wire_id("operation_type", "")


def test_shorten_notes_gives_up_at_least_the_bytes_asked_for() -> None:
    """Cutting notes by the overflow (JSON escapes included) always makes the encoding short enough."""
    claim = failed_claim('\x00\n"\\é\U0001f600a' * 200)  # escaped six-fold, two-fold, multi-byte
    data = claim.encode()
    for over in (1, 100, 2000):
        shorter = shorten_notes(claim, over)
        assert shorter is not None
        assert len(data) - over - 6 <= len(shorter.encode()) <= len(data) - over  # enough, and no more
        assert shorter.notes.endswith(TRUNCATED)
    assert shorten_notes(claim, len(data)) is None


# -- the claim factory ------------------------------------------------------------------


@pytest.mark.parametrize("char", ["r", "\x00", "\U0001f600"])
def test_a_failed_claim_with_a_huge_reason_fits_a_message(char: str) -> None:
    """A 1.1 M-character reason (plain, six-fold escaped, or 4-byte) is cut: the claim parses on the wire."""
    claim = failed_claim(char * 1_100_000)
    data = claim.encode()
    assert len(data) <= MAX_MESSAGE_BYTES
    parsed = parse_status_claim(data)
    assert parsed.state == "failed"
    assert parsed.notes.startswith("P2P operation failed: " + char)
    assert parsed.notes.endswith(TRUNCATED + " (type: election)")
    reason = parsed.notes[len("P2P operation failed: ") : -len(TRUNCATED + " (type: election)")]
    assert len(reason.encode()) <= MAX_REASON_BYTES


def test_a_short_reason_is_not_marked() -> None:
    """A reason that fits is claimed as given (the seed's format)."""
    assert failed_claim("timeout").notes == "P2P operation failed: timeout (type: election)"


def test_a_node_id_over_256_bytes_is_a_config_error() -> None:
    """The node id goes into every claim: Integration refuses one over 256 bytes, naming node_id."""
    with pytest.raises(ConfigError, match="node_id"):
        Integration(local_config(), node_id="n" * 257)
    Integration(local_config(), node_id="n" * 256)


# -- the API --------------------------------------------------------------------------


def test_an_operation_id_or_type_over_256_bytes_is_refused_at_the_api() -> None:
    """start_p2p_operation and track_operation refuse a long id or type (InvalidArgument); nothing starts."""
    with Integration(local_config(), node_id=NODE) as integration:
        with pytest.raises(InvalidArgument, match="operation_id"):
            integration.start_p2p_operation("x" * 1_000_000, "election", 3)
        with pytest.raises(InvalidArgument, match="operation_type"):
            integration.start_p2p_operation("op", "t" * 257, 3)
        with (
            pytest.raises(InvalidArgument, match="operation_id"),
            track_operation("y" * 257, "dht_store", beats=3, integration=integration),
        ):
            pass
        assert integration.get_health()["active_operations"] == 0
        integration.start_p2p_operation("x" * 256, "election", 3)
        assert integration.get_health()["active_operations"] == 1


# -- real servers -----------------------------------------------------------------------


class SmallPayloadServer(NatsServer):
    """A nats-server whose max_payload is ``limit`` bytes (set in a config file)."""

    def __init__(self, binary: str, workdir: Path, limit: int) -> None:
        super().__init__(binary, workdir)
        self.conf = self.workdir / "server.conf"
        self.conf.write_text(f"max_payload: {limit}\n")

    def _args(self) -> list[str]:
        return [*super()._args(), "-c", str(self.conf)]


@pytest.fixture
def small_server(nats_binary: str, tmp_path: Path) -> Any:
    server = SmallPayloadServer(nats_binary, tmp_path / "small", 4096)
    server.start()
    yield server
    server.kill()


def nats_config(url: str, **kw: Any) -> BackbeatConfig:
    return BackbeatConfig(cluster_id=CLUSTER, agent_id="a", nats_url=url, **kw)


@pytest.mark.nats
def test_a_huge_failure_reason_reaches_a_server_with_a_small_max_payload(
    small_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """fail_p2p_operation("x", "r" * 1_100_000), max_payload 4 KiB: a signed, truncated `failed` arrives."""
    witness = Witness(nats_runner, small_server.url, "backbeat.status.>")
    signing = generate_private_key()
    with Integration(nats_config(small_server.url, signing_key=signing), node_id=NODE) as integration:
        integration.start_p2p_operation("x", "election", 5)
        integration.fail_p2p_operation("x", HUGE)
        witness.wait_for(lambda ds: any(d.get("state") == "failed" for d in ds), what="the failed claim")
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="confirmation")
        health = integration.get_health()
    assert health["claims_dropped"] == 0
    assert any("truncated to fit the server's limit of 4096 bytes" in e for e in health["errors"])
    raw = next(m for m in witness.messages if b'"failed"' in m)
    witness.close()
    assert len(raw) <= 4096
    claim = parse_status_claim(raw)
    assert (claim.task_id, claim.state, claim.phase) == ("x", "failed", "failed")
    assert claim.notes.startswith("P2P operation failed: rrrr")
    assert claim.notes.endswith(TRUNCATED)
    assert Verifier.from_keys([SigningKey.load(signing).public_text()]).verify(claim) == "ok"


@pytest.mark.nats
def test_a_huge_failure_reason_on_a_default_server_fits_64_kib(
    nats_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """With the default 1 MB max_payload the reason is cut to 8 KiB: the claim is one receivable message."""
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    with Integration(nats_config(nats_server.url), node_id=NODE) as integration:
        integration.start_p2p_operation("x", "election", 5)
        integration.fail_p2p_operation("x", HUGE)
        witness.wait_for(lambda ds: any(d.get("state") == "failed" for d in ds), what="the failed claim")
        health = integration.get_health()
    assert health["claims_dropped"] == 0
    raw = next(m for m in witness.messages if b'"failed"' in m)
    witness.close()
    assert len(raw) <= MAX_MESSAGE_BYTES
    assert parse_status_claim(raw).notes.endswith(TRUNCATED + " (type: election)")
