"""The relay's admin routes on pbxcore's admin stack: the old route-table shape, the directory reload route.

SHIM: relay/service.py still hands :func:`serve_admin` its routes as ``path →
zero-argument callable`` answering ``(content type, body[, status])``; the lead
moves its route table to :data:`pbxcore.admin.Routes` (``(method, path) →
async handler``) when the shell is rewritten, and this module shrinks to the
relay's own route handlers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import trio

from pbxcore.admin import AdminAnswer, AdminRequest, Handler, Routes
from pbxcore.admin import serve_admin as serve_routes
from pbxcore.config import Listen

# A route of the old shape answers (content type, body), or (content type, body, status).
LegacyRoute = Callable[[], tuple[str, str] | tuple[str, str, int]]
DIRECTORY_RELOAD = "/v1/directory/reload"  # POST: the relay reads the PBX directory now


async def serve_admin(
    host: str, port: int, routes: Mapping[str, LegacyRoute | Handler],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SHIM: serve ``routes`` on ``host:port``; a key "/path" is a legacy GET route, a
    key "METHOD /path" a :data:`pbxcore.admin.Handler`. ``task_status`` gets the port."""
    table: dict[tuple[str, str], Handler] = {}
    for key, route in routes.items():
        if key.startswith("/"):
            table[("GET", key)] = _legacy(route)  # type: ignore[arg-type]
        else:
            method, _, path = key.partition(" ")
            table[(method, path)] = route  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        bound: str = await nursery.start(_serve, Listen(host, port), table)
        task_status.started(int(bound.rpartition(":")[2]))


async def _serve(listen: Listen, table: Routes, task_status: trio.TaskStatus[str]) -> None:
    await serve_routes("admin", listen, table, task_status=task_status)


def _legacy(route: LegacyRoute) -> Handler:
    async def handler(request: AdminRequest) -> AdminAnswer:
        answer = route()
        status = answer[2] if len(answer) == 3 else 200
        return AdminAnswer(status, answer[1], answer[0])

    return handler


def as_json(obj: object) -> tuple[str, str]:
    """SHIM: a legacy route's JSON answer."""
    return "application/json", json.dumps(obj, indent=1) + "\n"


def directory_reload_route(
    reload: Callable[[], Awaitable[tuple[int, int]]], state_dir: Path, pbx_count: Callable[[], int],
) -> Handler:
    """POST /v1/directory/reload: read the PBX directory now (``reload()``, the relay's
    ``reload_directory(force=True)``) and answer once it is applied, with the state
    directory it was read from, so that ``pbx-relay pbx add`` can tell a relay that
    reads another directory (``{"state_dir", "pbx_count", "added", "removed"}``)."""

    async def handler(request: AdminRequest) -> AdminAnswer:
        added, removed = await reload()
        return AdminAnswer.json({"state_dir": str(state_dir.resolve()), "pbx_count": pbx_count(),
                                 "added": added, "removed": removed})

    return handler
