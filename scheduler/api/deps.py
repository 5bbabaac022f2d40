"""Dependencies: the services of this process, and the caller: an organisation's API key, or a named user."""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.requests import HTTPConnection
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

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
BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="facegate", charset="UTF-8"'}


def _bad_basic(why: str) -> Problem:
    return Problem(401, "Authentication failed", f"the Authorization: Basic credentials {why}",
                   kind="unauthenticated", headers=BASIC_CHALLENGE)


class Utf8HTTPBasic(HTTPBasic):
    """HTTP Basic read as UTF-8 (RFC 7617's charset="UTF-8", which the challenge announces): FastAPI's own
    decodes ASCII only, so a password such as "pässwörd" could never sign in. Credentials that are not
    base64, not UTF-8 or not `name:password` are a 401 that says which, never a 500."""

    async def __call__(self, request: HTTPConnection) -> HTTPBasicCredentials | None:  # type: ignore[override]
        authorization = request.headers.get("Authorization")
        scheme, param = get_authorization_scheme_param(authorization)
        if not authorization or scheme.lower() != "basic":
            return None
        try:
            data = b64decode(param, validate=True).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_basic('are not UTF-8 text (RFC 7617, charset="UTF-8")') from None
        except (binascii.Error, ValueError):
            raise _bad_basic("are not base64") from None
        username, separator, password = data.partition(":")
        if not separator:
            raise _bad_basic("are not of the form username:password")
        return HTTPBasicCredentials(username=username, password=password)


BASIC = Utf8HTTPBasic(auto_error=False, scheme_name="basic", realm="facegate",
                      description="A named user of an organisation: username and password (`facegate user add`), "
                                  "UTF-8")


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
                          headers=BASIC_CHALLENGE) from None
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


def job_id(job_id: str, request: Request, who: PrincipalDep) -> str:
    """The job a route's `{job_id}` names: its whole id or a unique prefix of it among the caller's
    organisation's jobs (JobService.resolve_job_id, the one resolver of the API, the CLI and the console)."""
    return services(request).jobs.resolve_job_id(job_id, who.organisation_id)


# Every route that takes a job id in its path takes it through this, so a prefix works wherever an id does.
JobIdDep = Annotated[str, Depends(job_id)]
