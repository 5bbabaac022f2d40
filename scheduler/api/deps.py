"""Dependencies: the services of this process, and the caller's organisation from its API key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from facegate.settings import Settings
from scheduler.api.problems import Problem
from scheduler.galleries import GalleryService
from scheduler.keys import AuthenticationError, KeyStore, Principal
from scheduler.service import JobService


@dataclass
class Services:
    settings: Settings
    jobs: JobService
    galleries: GalleryService
    keys: KeyStore


def services(request: Request) -> Services:
    return request.app.state.services


def principal(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key", description="API key: fg_<id>_<secret>")] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """The organisation behind the API key (X-API-Key, or Authorization: Bearer). Never a request field."""
    token = x_api_key
    if token is None and authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    challenge = {"WWW-Authenticate": 'Bearer realm="facegate"'}
    if not token:
        raise Problem(401, "Authentication required", "send your API key in the X-API-Key header",
                      kind="unauthenticated", headers=challenge)
    try:
        return services(request).keys.authenticate(token)
    except AuthenticationError as exc:
        raise Problem(401, "Authentication failed", str(exc), kind="unauthenticated", headers=challenge) from None


ServicesDep = Annotated[Services, Depends(services)]
PrincipalDep = Annotated[Principal, Depends(principal)]
