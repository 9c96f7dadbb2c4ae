"""Least-privilege NATS, signed pulses on a real server, and no secret in any output."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nkeys  # type: ignore[import-untyped]
import pytest
from loguru import logger

from backbeat_sync import BackbeatConfig, BackbeatConnectionError, Integration
from backbeat_sync.protocol import parse_status_claim
from backbeat_sync.pulse import Pulse
from backbeat_sync.signing import SigningKey, Verifier, generate_private_key

from .natsserver import TOKEN, AsyncRunner, NatsServer, Witness, make_tls_files
from .support import wait_until

pytestmark = pytest.mark.nats

CLUSTER = "secure"
AGENT_PW = "agent-pw-Zq81"
PULSE_PW = "pulse-pw-Lk22"
MONITOR_PW = "monitor-pw-Vb93"

#: The server config docs/nats.md shows: each principal gets only what it needs.
LEAST_PRIVILEGE = f"""
authorization {{
  users = [
    {{
      user: agent-a, password: "{AGENT_PW}",
      permissions: {{
        publish:   {{ allow: ["backbeat.status.{CLUSTER}.agent-a", "_INBOX.>"] }},
        subscribe: {{ allow: ["backbeat.beat.{CLUSTER}", "_INBOX.>"] }}
      }}
    }},
    {{
      user: pulse, password: "{PULSE_PW}",
      permissions: {{ publish: {{ allow: ["backbeat.beat.{CLUSTER}"] }}, subscribe: {{ deny: [">"] }} }}
    }},
    {{
      user: monitor, password: "{MONITOR_PW}",
      permissions: {{ publish: {{ deny: [">"] }}, subscribe: {{ allow: ["backbeat.>", "_INBOX.>"] }} }}
    }}
  ]
}}
"""


class ConfiguredServer(NatsServer):
    """A NatsServer started with a configuration file (for permissions)."""

    def __init__(self, binary: str, workdir: Path, conf: str) -> None:
        super().__init__(binary, workdir)
        self.conf = self.workdir / "server.conf"
        self.conf.write_text(conf)

    def _args(self) -> list[str]:
        return [*super()._args(), "-c", str(self.conf)]


@pytest.fixture
def locked_server(nats_binary: str, tmp_path: Path) -> ConfiguredServer:
    server = ConfiguredServer(nats_binary, tmp_path / "locked", LEAST_PRIVILEGE)
    server.start()
    yield server  # type: ignore[misc]
    server.kill()


def url(server: NatsServer, user: str, password: str) -> str:
    return f"nats://{user}:{password}@127.0.0.1:{server.port}"


def test_agent_works_under_least_privilege(locked_server: ConfiguredServer, nats_runner: AsyncRunner) -> None:
    """An agent allowed only its own status subject and the beat subject follows beats and claims."""
    witness = Witness(nats_runner, url(locked_server, "monitor", MONITOR_PW), "backbeat.status.>")
    pulse_cfg = BackbeatConfig(
        cluster_id=CLUSTER, agent_id="pulse", nats_url=url(locked_server, "pulse", PULSE_PW)
    )
    agent_cfg = BackbeatConfig(
        cluster_id=CLUSTER, agent_id="agent-a", nats_url=url(locked_server, "agent-a", AGENT_PW)
    )
    with Pulse(pulse_cfg, tempo_bpm=1200), Integration(agent_cfg, node_id="n-a") as agent:
        wait_until(lambda: agent.clock.has_beat, what="a beat under least privilege")
        agent.start_p2p_operation("dht-store-k", "dht_store", 3)
        agent.complete_p2p_operation("dht-store-k", 2)
        witness.wait_for(lambda ds: any(d["state"] == "done" for d in ds), what="done claim")
        assert not any("Permissions Violation" in e for e in agent.get_health()["errors"])
    witness.close()


def test_publishing_outside_permissions_shows_in_errors(locked_server: ConfiguredServer) -> None:
    """An agent whose status subject is not allowed is refused by the server, and health says so."""
    cfg = BackbeatConfig(
        cluster_id=CLUSTER, agent_id="agent-b", nats_url=url(locked_server, "agent-a", AGENT_PW)
    )
    with Integration(cfg, node_id="n-b") as agent:
        agent.start_p2p_operation("op", "election", 3)
        wait_until(
            lambda: any("permissions violation" in e.lower() for e in agent.get_health()["errors"]),
            what="the server's refusal in errors",
        )


def user_seed() -> bytes:
    """A fresh NATS user nkey seed (``SU...``)."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def test_an_nkey_seed_authenticates_and_another_is_refused(nats_binary: str, tmp_path: Path) -> None:
    """A user nkey seed (given as a string or as a seed file) connects to a server that knows its
    public key, and claims go out; another seed is an authorization violation, never shown."""
    seed = user_seed()
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    conf = f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}'
    server = ConfiguredServer(nats_binary, tmp_path / "nkey", conf)
    server.start()
    seed_file = tmp_path / "agent.nk"
    seed_file.write_bytes(seed)
    try:
        for secret in (seed.decode(), str(seed_file)):
            cfg = BackbeatConfig(
                cluster_id=CLUSTER, agent_id="agent-nk", nats_url=server.url, nkey_seed=secret
            )
            with Integration(cfg, node_id="n-nk") as agent:
                assert agent.get_health()["connected"] is True
                agent.start_p2p_operation("nk-op", "election", 3)
                agent.complete_p2p_operation("nk-op", 1)
                wait_until(lambda: agent.get_health()["claims_published"] >= 2, what="claims with an nkey")
        other = user_seed().decode()
        cfg = BackbeatConfig(cluster_id=CLUSTER, agent_id="agent-nk", nats_url=server.url, nkey_seed=other)
        with pytest.raises(BackbeatConnectionError) as info:
            Integration(cfg, node_id="n-nk").start()
        assert info.value.cause == "authorization violation"
        assert other not in str(info.value)
        assert other not in repr(cfg)
    finally:
        server.kill()


def test_signed_pulse_on_nats(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """A Pulse with a signing key is followed by an agent that trusts it; a forger's frames are dropped."""
    key = SigningKey.load(generate_private_key())
    forger = SigningKey.load(generate_private_key(), key_id=key.key_id)
    base = BackbeatConfig(cluster_id="signed", agent_id="a", nats_url=nats_server.url)
    agent_cfg = base.evolve(trusted_pulse_keys=(key.public_text(),))
    with Integration(agent_cfg, node_id="n") as agent:
        with Pulse(base.evolve(agent_id="forger"), tempo_bpm=1200, sign=forger.sign_frame):
            wait_until(lambda: agent.get_health().get("forged_frames", 0) >= 3, what="forged frames")
        assert agent.get_health()["beats_received"] == 0
        with Pulse(base.evolve(agent_id="pulse"), tempo_bpm=1200, sign=key.sign_frame):
            wait_until(lambda: agent.get_health()["beats_received"] >= 3, what="signed beats")
    assert Verifier.from_keys([key.public_text()]).key_ids == [key.key_id]


def test_no_secret_in_any_output(nats_server_userpass: NatsServer, nats_runner: AsyncRunner) -> None:
    """Logs, health, claims, exceptions and reprs of a run with credentials and keys hold no secret."""
    from .natsserver import PASSWORD, USER

    signing = generate_private_key()
    secrets = [PASSWORD, signing.split(":", 1)[1]]
    out = io.StringIO()
    logger.enable("backbeat_sync")
    sink = logger.add(out, level="DEBUG", format="{message} {extra}")
    seen: list[str] = []
    server_url = f"nats://{USER}:{PASSWORD}@127.0.0.1:{nats_server_userpass.port}"
    witness = Witness(nats_runner, server_url, "backbeat.status.>")
    try:
        cfg = BackbeatConfig(
            cluster_id="c",
            agent_id="a",
            signing_key=signing,
            nats_url=server_url,
        )
        seen.append(repr(cfg))
        with Integration(cfg, node_id="n") as agent:
            seen.append(repr(agent))
            agent.on_claim(lambda c: seen.append(c.encode().decode()))
            agent.start_p2p_operation("op", "election", 3)
            agent.fail_p2p_operation("op", "because")
            witness.wait_for(lambda ds: len(ds) >= 2, what="two claims on the wire")
            seen.append(str(agent.get_health()))
        bad = cfg.evolve(
            nats_url=f"nats://{USER}:wrong-{PASSWORD}@127.0.0.1:{nats_server_userpass.port}",
            connect_timeout=30.0,  # refused at once; a busy machine must not turn it into a timeout
        )
        with pytest.raises(Exception) as info:
            Integration(bad, node_id="n").start()
        seen.append(str(info.value))
        seen.append(repr(info.value))
    finally:
        logger.remove(sink)
        logger.disable("backbeat_sync")
    text = "\n".join(seen) + out.getvalue()
    assert "authorization violation" in str(info.value).lower()
    for secret in secrets:
        assert secret not in text
    signer = SigningKey.load(signing)
    wire = [parse_status_claim(d) for d in list(witness.messages)]
    witness.close()
    assert [Verifier.from_keys([signer.public_text()]).verify(c) for c in wire[:2]] == ["ok", "ok"]


class RecordingProxy:
    """A TCP relay on a free loopback port in front of ``target_port``; keeps every byte clients sent.

    What a client wrote is what crossed the wire in clear (or TLS records, which
    never hold the token as plain text).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._thread = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._thread.start()

    def client_bytes(self) -> bytes:
        with self._lock:
            return bytes(self.sent)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self._sockets:
            s.close()


@pytest.fixture
def proxy_to_token_server(nats_server_token: NatsServer) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(nats_server_token.port)
    yield proxy
    proxy.close()


def test_tls_url_refuses_a_plain_server_and_never_sends_the_token(
    proxy_to_token_server: RecordingProxy,
) -> None:
    """tls:// against a server without TLS fails at start() saying so; the token never crosses the wire."""
    proxy = proxy_to_token_server
    cfg = BackbeatConfig(
        cluster_id=CLUSTER,
        agent_id="agent-a",
        nats_url=f"tls://127.0.0.1:{proxy.port}",
        token=TOKEN,
        connect_timeout=60.0,  # refused at once: only a bug waits for this
    )
    began = time.monotonic()
    with pytest.raises(BackbeatConnectionError) as info:
        Integration(cfg, node_id="n").start()
    assert time.monotonic() - began < 30.0
    assert "does not offer TLS" in info.value.cause
    assert "tls://" in str(info.value)
    assert proxy.client_bytes() == b""  # not even CONNECT: nothing at all was written
    # The recorder sees a token when one is sent: the same server over nats:// gets it in clear.
    with Integration(cfg.evolve(nats_url=f"nats://127.0.0.1:{proxy.port}"), node_id="n") as agent:
        assert agent.get_health()["connected"] is True
    assert TOKEN.encode() in proxy.client_bytes()


def test_tls_url_refuses_a_reconnect_to_a_plain_server(nats_binary: str, tmp_path: Path) -> None:
    """A tls:// agent whose server comes back without TLS stays disconnected, says why, sends no token."""
    ca, cert, key = make_tls_files(tmp_path / "tls")
    server = NatsServer(nats_binary, tmp_path / "srv", token=TOKEN, tls=(cert, key))
    server.start()
    proxy = RecordingProxy(server.port)
    cfg = BackbeatConfig(
        cluster_id=CLUSTER,
        agent_id="agent-a",
        nats_url=f"tls://127.0.0.1:{proxy.port}",
        token=TOKEN,
        tls_ca=str(ca),
        reconnect_wait=0.05,
    )
    try:
        with Integration(cfg, node_id="n") as agent:
            assert agent.get_health()["connected"] is True
            assert TOKEN.encode() not in proxy.client_bytes()  # sent, but inside TLS
            server.stop()
            server.tls = None  # the same port, now in clear
            server.start()
            wait_until(
                lambda: any("does not offer TLS" in e for e in agent.get_health()["errors"]),
                what="the refusal in errors",
            )
            assert agent.get_health()["connected"] is False
            names = [c.get("name") for c in server.monitor("connz")["connections"]]
            assert "agent-a" not in names  # the relay's socket may be open: no CONNECT came through it
        assert TOKEN.encode() not in proxy.client_bytes()
    finally:
        proxy.close()
        server.kill()


def test_tls_url_upgrades_a_server_that_offers_tls_without_requiring_it(
    nats_binary: str, tmp_path: Path
) -> None:
    """tls:// against a server with allow_non_tls still talks TLS (nats-py alone would stay in clear)."""
    ca, cert, key = make_tls_files(tmp_path / "tls")
    conf = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\nallow_non_tls: true\n'
    server = ConfiguredServer(nats_binary, tmp_path / "optional-tls", conf)
    server.start()
    try:
        cfg = BackbeatConfig(
            cluster_id=CLUSTER, agent_id="agent-a", nats_url=f"tls://127.0.0.1:{server.port}", tls_ca=str(ca)
        )
        with Integration(cfg, node_id="n") as agent:
            assert agent.get_health()["connected"] is True
            conns = {c.get("name"): c for c in server.monitor("connz")["connections"]}
            assert conns["agent-a"].get("tls_version")
    finally:
        server.kill()


def test_tls_url_refuses_a_plain_server_for_the_pulse_too(proxy_to_token_server: RecordingProxy) -> None:
    """A Pulse (backbeat-sync pulse) on tls:// gets the same refusal: every NATS link checks the INFO."""
    proxy = proxy_to_token_server
    cfg = BackbeatConfig(
        cluster_id=CLUSTER, agent_id="pulse", nats_url=f"tls://127.0.0.1:{proxy.port}", token=TOKEN
    )
    pulse = Pulse(cfg, tempo_bpm=120)
    with pytest.raises(BackbeatConnectionError, match="does not offer TLS"):
        pulse.start()
    pulse.stop()
    assert proxy.client_bytes() == b""
