"""The spool: final claims that no server confirmed by ``stop()``, kept on disk for the next run.

With ``BackbeatConfig(spool_path=DIR)``, the final claims (``done``/``failed``)
still unconfirmed when ``stop()`` (or the exit hook) gives up are written to a
new file in ``DIR``; the next NATS integration of the same cluster and agent
reads every such file when it starts, sends those claims first, and removes
the files once the server has confirmed all of them. Intermediate claims are
never spooled: a later claim of the same operation says more.

Files are named ``backbeat-spool.{cluster_id}.{agent_id}.{unique}.jsonl``
(both ids are subject tokens, so they hold no ``.`` and no ``/``), written to a
temporary name, synced and renamed, so a reader sees a whole file or none, and
each writer makes its own file: two integrations of one agent never overwrite
each other's. One line per claim: ``{"subject": ..., "claim": {...}, "msg_id": ...}``,
the claim as its unsigned JSON object (it is signed again when it is sent) and the
``Nats-Msg-Id`` it was first sent with (a claims stream keeps one copy of each id: a
copy that reached the stream before the stop is not stored twice; files without
``msg_id``, from before, get the id worked out from the claim).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from ...errors import ProtocolError
from ...protocol import StatusClaim, canonical_json

__all__ = ["Spool", "SpoolError", "Spooled"]

SUFFIX = ".jsonl"
#: A spooled final claim: its subject, the claim, and the ``Nats-Msg-Id`` it was sent with.
Spooled = tuple[str, StatusClaim, str | None]


class SpoolError(OSError):
    """The spool directory or a spool file cannot be written."""


class Spool:
    """The spool files of one agent in one directory.

    Args:
        directory: the spool directory (created on the first write).
        cluster_id: the cluster.
        agent_id: the agent.
    """

    def __init__(self, directory: str, cluster_id: str, agent_id: str) -> None:
        self.directory = Path(directory)
        self.prefix = f"backbeat-spool.{cluster_id}.{agent_id}."

    def files(self) -> list[Path]:
        """This agent's spool files, oldest name first (no temporary files)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SpoolError(f"cannot list spool directory {self.directory}: {exc.strerror}") from None
        return sorted(self.directory / n for n in names if n.startswith(self.prefix) and n.endswith(SUFFIX))

    def load(self) -> tuple[list[Spooled], list[Path], list[str]]:
        """Read every spool file of this agent.

        Returns:
            ``(claims, files, problems)``: the ``(subject, claim, msg_id)`` triples in file
            order (``msg_id`` None in a file from before it was kept), the files they came
            from, and one line per unreadable file or line (those lines are skipped; a
            file with one is still removed once the rest is confirmed).

        Raises:
            SpoolError: the directory cannot be listed.
        """
        claims: list[Spooled] = []
        problems: list[str] = []
        files = self.files()
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"cannot read spool file {path}: {exc}")
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    subject = item["subject"]
                    if not isinstance(subject, str) or not subject:
                        raise ValueError("no subject")
                    claim = StatusClaim.from_dict(item["claim"])
                    msg_id = item.get("msg_id")
                    if msg_id is not None and (not isinstance(msg_id, str) or not msg_id):
                        raise ValueError(f"bad msg_id {msg_id!r}")
                except (ValueError, KeyError, TypeError, AttributeError, ProtocolError) as exc:
                    problems.append(f"spool file {path} line {number} skipped: {exc}")
                    continue
                claims.append((subject, claim, msg_id))
        return claims, files, problems

    def write(self, claims: Sequence[Spooled]) -> Path:
        """Write ``claims`` (``(subject, claim, msg_id)``) to a new spool file (atomically:
        whole or not at all).

        Returns:
            The file written.

        Raises:
            SpoolError: the directory or the file cannot be written (nothing is left behind).
        """
        unique = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        final = self.directory / f"{self.prefix}{unique}{SUFFIX}"
        tmp = self.directory / f".{self.prefix}{unique}.tmp"
        lines = b"".join(
            canonical_json({"subject": s, "claim": claim.to_dict(signed=False), "msg_id": msg_id}) + b"\n"
            for s, claim, msg_id in claims
        )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise SpoolError(f"cannot write a spool file in {self.directory}: {exc.strerror}") from None
        _sync_directory(self.directory)
        return final

    @staticmethod
    def remove(files: Sequence[Path]) -> list[str]:
        """Remove ``files`` (already gone is fine).

        Returns:
            One line per file that could not be removed.
        """
        problems = []
        for path in files:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cannot remove spool file {path}: {exc.strerror}")
        return problems


def _sync_directory(directory: Path) -> None:
    """Make the rename durable where the platform allows it (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
