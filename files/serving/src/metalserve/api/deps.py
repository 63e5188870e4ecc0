"""What the routes need, as FastAPI dependencies: ``replica: ReplicaDep`` in a signature.

The state lives on ``app.state`` (set by ``create_app``), so routes are plain module functions.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from metalserve.errors import ApiError
from metalserve.replica import Replica
from metalserve.settings import ServeSettings


async def get_replica(request: Request) -> Replica:
    replica: Replica = request.app.state.replica
    return replica


async def get_settings(request: Request) -> ServeSettings:
    settings: ServeSettings = request.app.state.settings
    return settings


ReplicaDep = Annotated[Replica, Depends(get_replica)]
SettingsDep = Annotated[ServeSettings, Depends(get_settings)]


async def require_admin(
    replica: ReplicaDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """The admin bearer token, or 401; 404 while no token file is configured."""
    if replica.admin_token is None:
        raise ApiError(404, "the admin API is disabled (no admin token file configured)")
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), replica.admin_token.encode()
    ):
        raise ApiError(
            401,
            "a valid admin bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


# For a router's or route's ``dependencies=[AdminAuth]``: checked before the body is validated.
AdminAuth = Depends(require_admin)
