"""``backbeat-sync dashboard``: serve a live web page of a cluster (the server is backbeat_sync.dashboard)."""

from __future__ import annotations

import argparse
import time
from typing import Final

from ._base import EXIT_OK, PROG, Command, Out, UsageError, config_from_args, require_extra

_EPILOG = """examples:
  backbeat-sync dashboard --nats nats://127.0.0.1:4222 --cluster chorus-dev
  backbeat-sync dashboard --nats local:// --demo      # sample agents inside, no server needed
  backbeat-sync dashboard --nats nats://... --listen 0.0.0.0:8080 --auth admin:/etc/backbeat/dash.pw

Then open the address it prints. It binds 127.0.0.1 unless --listen says otherwise."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], not {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100, not {text!r}")
    return int(text)


def _bpm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 6000.0:
        raise argparse.ArgumentTypeError(f"must be a tempo in (0, 6000] BPM, not {text!r}")
    return value


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:8080; 0.0.0.0:PORT serves every interface)",
    )
    p.add_argument(
        "--auth",
        metavar="USER:PASSWORD-FILE",
        help="require HTTP basic auth: USER, and the password on the first line of PASSWORD-FILE",
    )
    p.add_argument(
        "--demo", action="store_true", help="with --nats local://: run sample agents inside, to look around"
    )
    p.add_argument(
        "--demo-agents", type=_count, default=3, metavar="N", help="with --demo: how many agents (default 3)"
    )
    p.add_argument(
        "--tempo", type=_bpm, default=120.0, metavar="BPM", help="with --demo: the pulse's tempo (120)"
    )
    p.add_argument(
        "--warn-at",
        type=_fraction,
        default=0.75,
        metavar="F",
        help="share of a budget from which a bar turns red (default 0.75; a claimed budget warning too)",
    )


def _cmd_dashboard(args: argparse.Namespace, out: Out) -> int:
    """``dashboard``: serve the page until Ctrl-C (or SIGTERM)."""
    require_extra("starlette", "dashboard", "the dashboard")
    require_extra("uvicorn", "dashboard", "the dashboard")
    from ..dashboard import Dashboard, DemoAgents, read_auth

    config = config_from_args(args)

    if args.demo and not config.is_local:
        raise UsageError("--demo runs sample agents on the in-process bus: use it with --nats local://")
    if config.is_local and not args.demo:
        raise UsageError(
            "on local:// only agents in this process can be seen: add --demo, or give --nats nats://HOST:4222"
        )
    auth = read_auth(args.auth) if args.auth else None
    if args.demo:
        config = config.evolve(tempo_bpm=args.tempo)
    dashboard = Dashboard(
        config.evolve(agent_id=f"{config.agent_id}-dashboard"),
        listen=args.listen,
        auth=auth,
        warn_at=args.warn_at,
    )
    out.logs_open.set()
    dashboard.start()
    demo = DemoAgents(config, agents=args.demo_agents).start() if args.demo else None
    try:
        where = "sample agents inside" if demo else config.masked_url
        out.line(
            f"{PROG} dashboard: {dashboard.url} (cluster {config.cluster_id}, {where}). Ctrl-C stops it."
        )
        if dashboard.host != "127.0.0.1" and dashboard.host != "localhost":
            out.line(f"{PROG} dashboard: listening on {dashboard.host}:{dashboard.port}, as asked")
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    finally:
        out.logs_open.clear()
        if demo is not None:
            demo.stop()
        dashboard.stop()
    out.line(f"{PROG} dashboard: stopped")
    return EXIT_OK


COMMAND: Final = Command(
    name="dashboard",
    help="serve a live web page of a cluster: beat, agents, operations against their budgets",
    epilog=_EPILOG,
    add_arguments=_arguments,
    run=_cmd_dashboard,
)
