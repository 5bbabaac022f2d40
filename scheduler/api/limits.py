"""Request size limit as ASGI middleware: refuses a body over the limit, declared or streamed, with 413."""

from __future__ import annotations

import json

from scheduler.api.problems import MEDIA_TYPE, PROBLEM_TYPE_BASE


class BodyTooLarge(Exception):
    pass


class RequestSizeLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        seen = 0
        exceeded = False
        replaced = False

        async def counting_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message) -> None:
            # Whatever the app made of the cut-off body (a parser's 400, say), the answer is 413.
            nonlocal replaced
            if exceeded:
                if not replaced and message["type"] == "http.response.start":
                    replaced = True
                    await self._too_large(scope, send)
                return
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not replaced:
                replaced = True
                await self._too_large(scope, send)

    async def _too_large(self, scope, send) -> None:
        body = json.dumps({"type": PROBLEM_TYPE_BASE + "too-large", "title": "Request too large", "status": 413,
                           "detail": f"the request body is over the limit of {self.max_bytes} bytes",
                           "instance": scope.get("path", "")}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
