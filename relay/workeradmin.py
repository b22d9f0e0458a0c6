"""The parent's admin endpoint under ``run --workers N``: one address for operators, Prometheus and probes.

Each worker serves its own admin routes on a loopback port the kernel picks, which its
banner names and the parent reads (relay/workers.py). The parent serves ``admin.listen``
itself and answers from the workers:

- ``GET /metrics``: the parent's series (workers serving, restarts, ``worker_up`` per
  worker) and every worker's series with a ``worker="<i>"`` label added: one scrape
  target, each process's numbers kept apart (sum them in PromQL);
- ``GET /registry``: every worker's PBXs, each entry with its ``worker``: ``pbx-relay
  pbxs`` and ``pbx show`` see all of them;
- ``GET /healthz``: ``ok`` while the parent's loop runs (a dead worker is being
  restarted: that is the parent's job, not a reason to restart the unit);
- ``GET /readyz``: 200 once every worker serves and answers ready, else 503 naming them;
- ``POST /v1/directory/reload``: sent to every serving worker at once, answered once all
  have read the directory: a PBX added with ``pbx-relay pbx add`` is accepted by
  whichever worker its connection lands on (a worker being started reads it as it starts);
- ``GET /v1/workers``: index, pid, serving, admin addresses and starts of each worker.

With the embedded push service (``push.mode = "embedded"``) each worker's push service
serves its admin routes on a loopback port too, and the parent serves the push service's
``admin.listen`` (push.toml) the same way (:meth:`WorkerAdmin.push_routes`): ``/metrics``
(each worker's ``pbx_push_*`` series labelled ``worker``), ``/healthz``, ``/readyz``.

What it can be made to hold is pbxcore.admin's bound (64 connections, small requests);
each request fans out to at most N workers (``MAX_WORKERS``), each answer within
:data:`WORKER_TIMEOUT`; a worker that does not answer is left out of /metrics
(``worker_up`` 0) and /registry, and makes /readyz and a reload answer 503.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from pbxcore.admin import AdminAnswer, AdminRequest, Routes
from pbxcore.metrics import CONTENT_TYPE
from relay.admin import DIRECTORY_RELOAD

log = logging.getLogger("relay.workers")

# A worker answers its admin routes from memory in milliseconds; one that takes longer is
# busy or stuck, and the operator's command or the scrape should not wait on it.
WORKER_TIMEOUT = 5.0
WORKERS_ROUTE = "/v1/workers"


@dataclass(frozen=True)
class WorkerView:
    """What the parent knows of one worker when a request comes."""

    index: int
    pid: int | None
    serving: bool
    admin: str | None  # "127.0.0.1:port" once its banner named it
    starts: int
    push_admin: str | None = None  # its embedded push service's admin "127.0.0.1:port"


class Pool(Protocol):
    """The parent's worker pool as the admin routes read it."""

    restarts: int

    def views(self) -> list[WorkerView]: ...


@dataclass(frozen=True)
class Answer:
    """One worker's answer: the parsed JSON or text, or why there is none."""

    worker: WorkerView
    status: int = 0  # 0: no answer
    body: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


class WorkerAdmin:
    """The parent's admin routes, asking the workers with one HTTP client: the relay's
    (``service="relay"``, :meth:`routes`) or their push services' (``"push"``,
    :meth:`push_routes`)."""

    def __init__(self, pool: Pool, client: httpx.AsyncClient, service: str = "relay") -> None:
        self.pool = pool
        self.client = client
        self.service = service

    def routes(self) -> Routes:
        return {
            ("GET", "/metrics"): self.metrics,
            ("GET", "/registry"): self.registry,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
            ("POST", DIRECTORY_RELOAD): self.reload,
            ("GET", WORKERS_ROUTE): self.workers,
        }

    def push_routes(self) -> Routes:
        """The push service's admin routes (push/api.py admin_routes), for all workers."""
        return {
            ("GET", "/metrics"): self.metrics,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
        }

    def _address(self, view: WorkerView) -> str | None:
        return view.push_admin if self.service == "push" else view.admin

    # ---------------------------------------------------------------- asking
    async def _ask(self, method: str, path: str) -> list[Answer]:
        """``method path`` to every worker that serves, at once; one Answer per worker."""
        views = self.pool.views()
        answers: list[Answer] = [Answer(v, error="not serving") for v in views]

        async def one(i: int, view: WorkerView) -> None:
            try:
                resp = await self.client.request(method, f"http://{self._address(view)}{path}")
            except httpx.HTTPError as e:
                answers[i] = Answer(view, error=f"no answer ({type(e).__name__})")
                return
            answers[i] = Answer(view, resp.status_code, resp.text)

        async with trio.open_nursery() as nursery:
            for i, view in enumerate(views):
                if view.serving and self._address(view):
                    nursery.start_soon(one, i, view)
        return answers

    # ---------------------------------------------------------------- routes
    async def metrics(self, request: AdminRequest) -> AdminAnswer:
        answers = await self._ask("GET", "/metrics")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(answers, self.pool.restarts, f"pbx_{self.service}"))
        return AdminAnswer(200, generate_latest(registry), CONTENT_TYPE)

    async def registry(self, request: AdminRequest) -> AdminAnswer:
        rows: list[dict[str, Any]] = []
        for a in await self._ask("GET", "/registry"):
            if a.ok:
                rows += [dict(row, worker=a.worker.index) for row in json.loads(a.body)]
        return AdminAnswer.json(rows)

    async def healthz(self, request: AdminRequest) -> AdminAnswer:
        return AdminAnswer.text("ok")

    async def readyz(self, request: AdminRequest) -> AdminAnswer:
        missing = [f"worker {a.worker.index}: {a.error or a.body.strip() or a.status}"
                   for a in await self._ask("GET", "/readyz") if not a.ok]
        if missing:
            return AdminAnswer.text("; ".join(missing), 503)
        return AdminAnswer.text("ready")

    async def reload(self, request: AdminRequest) -> AdminAnswer:
        answers = [a for a in await self._ask("POST", DIRECTORY_RELOAD) if a.worker.serving]
        failed = [f"worker {a.worker.index}: {a.error or a.status}" for a in answers if not a.ok]
        if failed or not answers:
            log.warning("event=worker_reload_failed %s", "; ".join(failed) or "no worker serving")
            return AdminAnswer.text("; ".join(failed) or "no worker serving", 503)
        bodies = [json.loads(a.body) for a in answers]
        return AdminAnswer.json({
            "state_dir": bodies[0]["state_dir"], "pbx_count": max(b["pbx_count"] for b in bodies),
            "added": max(b["added"] for b in bodies), "removed": max(b["removed"] for b in bodies),
            "workers": len(bodies),
        })

    async def workers(self, request: AdminRequest) -> AdminAnswer:
        return AdminAnswer.json([v.__dict__ for v in self.pool.views()])


class _Merged:
    """A collector: the parent's own families, then each family of the workers' answers
    once, with every worker's samples labelled ``worker``."""

    def __init__(self, answers: Sequence[Answer], restarts: int, prefix: str = "pbx_relay") -> None:
        self.answers = answers
        self.restarts = restarts
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        yield from self._own()
        merged: dict[str, Metric] = {}
        for a in self.answers:
            if not a.ok:
                continue
            for family in text_string_to_metric_families(a.body):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for s in family.samples:
                    into.add_sample(s.name, dict(s.labels, worker=str(a.worker.index)), s.value, s.timestamp)
        yield from merged.values()

    def _own(self) -> Iterator[Metric]:
        p = self.prefix
        serving = GaugeMetricFamily(f"{p}_workers_serving", "Workers serving now (run --workers N)")
        serving.add_metric([], sum(a.worker.serving for a in self.answers))
        up = GaugeMetricFamily(f"{p}_worker_up", "1 when the worker answered this scrape",
                               labels=["worker"])
        for a in self.answers:
            up.add_metric([str(a.worker.index)], int(a.ok))
        restarts = CounterMetricFamily(f"{p}_worker_restarts",
                                       "Workers started again after they died or hung")
        restarts.add_metric([], self.restarts)
        yield from (serving, up, restarts)


def client() -> httpx.AsyncClient:
    """The parent's client of its workers' loopback admin ports."""
    return httpx.AsyncClient(timeout=WORKER_TIMEOUT, trust_env=False)

