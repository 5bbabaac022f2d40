"""Dependencies: the services of this process, and the caller's organisation from its API key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

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


# FastAPI's own schemes read the key, and put both ways of sending it in the OpenAPI document.
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                              description="API key: fg_<id>_<secret>")
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="The same API key as a bearer token")


def principal(
    request: Request,
    x_api_key: Annotated[str | None, Depends(API_KEY_HEADER)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
) -> Principal:
    """The organisation behind the API key (X-API-Key, or Authorization: Bearer). Never a request field."""
    token = x_api_key or (bearer.credentials.strip() if bearer is not None else None)
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
