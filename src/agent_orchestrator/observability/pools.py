"""The database connection pool's use, read at each scrape in whatever process serves the
metrics (an API's `/metrics`, a worker's `WORKER_METRICS_PORT`): how many connections are
lent out and how many the pool may open. A pool that stays full makes requests and tasks
wait for a connection (`DB_POOL_SIZE`, docs/operations.md "Scale-out and capacity").

One collector for the process, over the pools of the states alive in it (tests run
several); SQLite's single held connection is not a pool and is not reported.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.pool import Pool, QueuePool

from agent_orchestrator.observability.metrics import PREFIX


class _PoolCollector(Collector):
    def __init__(self) -> None:
        self.pools: dict[int, tuple[QueuePool, int]] = {}

    def collect(self) -> Iterator[Metric]:
        in_use = idle = limit = 0
        for pool, most in list(self.pools.values()):
            in_use += pool.checkedout()
            idle += pool.checkedin()
            limit += most
        connections = GaugeMetricFamily(
            f"{PREFIX}_db_connections",
            "Database connections of this process's pool, lent out or idle",
            labels=["state"],
        )
        connections.add_metric(["in_use"], in_use)
        connections.add_metric(["idle"], idle)
        yield connections
        yield GaugeMetricFamily(
            f"{PREFIX}_db_connections_limit",
            "Most database connections this process's pool opens (pool size plus overflow)",
            value=limit,
        )


_COLLECTOR = _PoolCollector()
REGISTRY.register(_COLLECTOR)


def watch_pool(pool: Pool, limit: int) -> None:
    """Report `pool` until `forget_pool`; pools other than a QueuePool are left out."""
    if isinstance(pool, QueuePool):
        _COLLECTOR.pools[id(pool)] = (pool, limit)


def forget_pool(pool: Pool) -> None:
    _COLLECTOR.pools.pop(id(pool), None)
