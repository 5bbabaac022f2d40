"""Dependencies: the services of this process, and the caller: an organisation's API key, or a named user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

from facegate.settings import Settings
from scheduler.api.problems import Problem
from scheduler.galleries import GalleryService
from scheduler.keys import AuthenticationError, KeyStore, Principal
from scheduler.service import JobService
from scheduler.users import UserStore


@dataclass
class Services:
    settings: Settings
    jobs: JobService
    galleries: GalleryService
    keys: KeyStore
    users: UserStore


def services(request: Request) -> Services:
    return request.app.state.services


# FastAPI's own schemes read the credentials, and put every way of sending them in the OpenAPI document.
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                              description="API key: fg_<id>_<secret>")
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="The same API key as a bearer token")
BASIC = HTTPBasic(auto_error=False, scheme_name="basic", realm="facegate",
                  description="A named user of an organisation: username and password (`facegate user add`)")


def principal(
    request: Request,
    x_api_key: Annotated[str | None, Depends(API_KEY_HEADER)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
    basic: Annotated[HTTPBasicCredentials | None, Depends(BASIC)] = None,
) -> Principal:
    """The organisation behind the API key (X-API-Key, or Authorization: Bearer), or the named user (and
    its organisation and roles) of Authorization: Basic. Never a request field."""
    token = x_api_key or (bearer.credentials.strip() if bearer is not None else None)
    if not token and basic is not None:
        try:
            return services(request).users.authenticate(basic.username, basic.password)
        except AuthenticationError as exc:
            raise Problem(401, "Authentication failed", str(exc), kind="unauthenticated",
                          headers={"WWW-Authenticate": 'Basic realm="facegate"'}) from None
    challenge = {"WWW-Authenticate": 'Bearer realm="facegate"'}
    if not token:
        raise Problem(401, "Authentication required", "send your API key in the X-API-Key header, or a user's "
                      "name and password (HTTP Basic)", kind="unauthenticated", headers=challenge)
    try:
        return services(request).keys.authenticate(token)
    except AuthenticationError as exc:
        raise Problem(401, "Authentication failed", str(exc), kind="unauthenticated", headers=challenge) from None


ServicesDep = Annotated[Services, Depends(services)]
PrincipalDep = Annotated[Principal, Depends(principal)]
