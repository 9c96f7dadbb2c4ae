"""Budget history: what budgeted runs really took, the seed's budget profiles, and ``"auto"``.

Every finished budgeted run (a ``@beat_budget`` call, a ``track_operation``
block, a ``start_p2p_operation`` ... complete/fail, ``execute_with_beat_budget``)
becomes a :class:`Sample`. The caller's thread only appends a small record to
an in-memory queue; a library thread (the integration's beat thread) turns the
records into samples and, with ``BackbeatConfig(history_path=...)``, writes
them to a SQLite file. :meth:`BudgetHistory.stats` and
:meth:`BudgetHistory.suggest` drain the queue first, so they see every run that
has finished, written or not.

The rule for ``"auto"`` (see ``docs/learning.md``): with fewer than
``min_samples`` runs of a type that ended done or exceeded, the budget is the
profile's max; else ``p95 * margin`` rounded up to a quarter beat, never below
the profile's min (or 0.25 without a profile).
"""

from .cluster import ClusterHistory, history_key
from .core import BudgetHistory
from .records import OperationStats, RunLog, Sample, new_run_log
from .rules import (
    DEFAULT_KEEP,
    DEFAULT_MARGIN,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_NAMES,
    DEFAULT_PROFILES,
    FLOOR_BEATS,
    OTHER_NAME,
    RUN_LOG_LIMIT,
    SCHEMA_VERSION,
    check_profiles,
    name_of,
    round_up_quarter,
)
from .sketch import Sketch

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_MARGIN",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_NAMES",
    "DEFAULT_PROFILES",
    "FLOOR_BEATS",
    "OTHER_NAME",
    "RUN_LOG_LIMIT",
    "SCHEMA_VERSION",
    "BudgetHistory",
    "ClusterHistory",
    "OperationStats",
    "RunLog",
    "Sample",
    "Sketch",
    "check_profiles",
    "history_key",
    "name_of",
    "new_run_log",
    "round_up_quarter",
]
