"""The route table, assembled from each area's ``routes`` list according to the roles served."""

from __future__ import annotations

from collections.abc import Set

from starlette.routing import BaseRoute

from bilten.routes import (
    auth,
    bookings,
    events,
    holds,
    ops,
    realtime,
    tickets,
    users,
    venues,
    web,
)


def build(roles: Set[str]) -> list[BaseRoute]:
    """Operations endpoints are always served; the API areas and the web app that calls them
    only with the ``api`` role."""
    table: list[BaseRoute] = []
    if "api" in roles:
        # Routes are matched in order: the busiest come first (in a sale, booking requests).
        table += [
            *bookings.door,
            *events.routes,
            *holds.routes,
            *bookings.routes,
            *tickets.routes,
            *venues.routes,
            *auth.routes,
            *users.routes,
            *realtime.routes,
            *web.routes,
        ]
    if "realtime" in roles:
        table += realtime.socket_routes
    return [*table, *ops.routes]
