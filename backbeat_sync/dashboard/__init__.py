"""A live web dashboard of a BACKBEAT cluster (the ``dashboard`` extra: Starlette and uvicorn).

``backbeat-sync dashboard --nats URL --cluster C`` serves it; in code::

    from backbeat_sync.dashboard import Dashboard

    with Dashboard(config, listen="127.0.0.1:8080") as dashboard:
        print(dashboard.url)

See docs/observability.md.
"""

from __future__ import annotations

from ._demo import DemoAgents
from ._server import Dashboard, parse_listen, read_auth
from ._state import DashboardState

__all__ = ["Dashboard", "DashboardState", "DemoAgents", "parse_listen", "read_auth"]
