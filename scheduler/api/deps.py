"""Dependencies: the services of this process, and the caller: an organisation's API key, or a named user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

from facegate.settings import Settings
from scheduler.api.problems import Problem
from scheduler.console.sessions import COOKIE, SessionStore
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
    # The console's sign-in sessions (scheduler/console): its cookie signs the user in to the API as well.
    sessions: SessionStore


def services(request: Request) -> Services:
    return request.app.state.services


# FastAPI's own schemes read the credentials, and put every way of sending them in the OpenAPI document.
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                              description="API key: fg_<id>_<secret>")
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="The same API key as a bearer token")
BASIC = HTTPBasic(auto_error=False, scheme_name="basic", realm="facegate",
                  description="A named user of an organisation: username and password (`facegate user add`)")


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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
    if not token and basic is None and (session := services(request).sessions.get(request.cookies.get(COOKIE))):
        # The console's own requests (its script and images): the signed-in user. A cookie is sent by the
        # browser whoever made the page, so a request that changes anything must also carry the session's
        # CSRF token, which only the console's pages hold.
        if request.method not in SAFE_METHODS and not session.csrf_matches(request.headers.get("X-CSRF-Token")):
            raise Problem(403, "Refused", "a request signed in with the console's session cookie must send the "
                          "session's CSRF token in the X-CSRF-Token header", kind="csrf-refused")
        return session.principal
    if not token:
        raise Problem(401, "Authentication required", "send your API key in the X-API-Key header, or a user's "
                      "name and password (HTTP Basic)", kind="unauthenticated", headers=challenge)
    try:
        return services(request).keys.authenticate(token)
    except AuthenticationError as exc:
        raise Problem(401, "Authentication failed", str(exc), kind="unauthenticated", headers=challenge) from None


ServicesDep = Annotated[Services, Depends(services)]
PrincipalDep = Annotated[Principal, Depends(principal)]
