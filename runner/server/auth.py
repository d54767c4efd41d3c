"""API keys (`server.api_keys`): one rule for every route of `t2i-serve`, and the bind-address check.

With keys set, every request (the form, the JSON job API, A1111's `/sdapi/v1/*`, OpenAI's `/v1/*`, the docs) must
carry one of them, as OpenAI clients send it (`Authorization: Bearer KEY`) or as A1111 clients and browsers send
`--api-auth` credentials (HTTP Basic, the key as the password, any user name). Open are only the page assets under
`/static/` and the OpenAI image URLs, whose unguessable expiring tokens are handed out to authenticated requests.
Without keys the server must listen on a loopback address only (`t2i-serve` refuses to start otherwise).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from omegaconf import DictConfig
from starlette.responses import JSONResponse, Response

from ..common.errors import ConfigError, first_line
from ..config.validate import string_list
from .openai_api import FILES_PREFIX, OPENAI_PREFIX, error_response
from .owner import owner_of, reset_owner, set_owner

REALM = "t2i-serve"


def is_open(path: str) -> bool:
    """Page assets and image links need no key; a path with `..` is never taken for one of them."""
    if ".." in path.split("/"):
        return False
    return path.startswith("/static/") or (path.startswith(FILES_PREFIX) and "/" not in path[len(FILES_PREFIX):])


def api_keys(cfg: DictConfig) -> tuple[str, ...]:
    """`server.api_keys` as a tuple; an empty key is a config error (it would let an empty password in)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        keys = string_list("server.api_keys", cfg.server.get("api_keys"))
    except OmegaConfBaseException as exc:  # e.g. ${oc.env:T2I_API_KEY} while that variable is not set
        raise ConfigError(f"server.api_keys: {first_line(exc)}") from exc
    for i, key in enumerate(keys):
        if not key.strip():
            raise ConfigError(f"server.api_keys[{i}] is empty; give a secret string (e.g. from "
                              "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return tuple(keys)


def is_loopback(host: str) -> bool:
    """True when `host` (an address or a name) reaches this machine only: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().strip("[]")
    if not name:
        return False  # "" binds every interface
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, keys: tuple[str, ...]) -> None:
    """Refuse to serve without keys on an address other machines can reach."""
    if not keys and not is_loopback(host):
        raise ConfigError(f"--host {host} is reachable from other machines and server.api_keys is empty: anyone "
                          "there could generate images and read this server's outputs; set server.api_keys=[KEY] "
                          "(clients send it as a Bearer token or Basic-auth password), or bind 127.0.0.1")


def presented_key(authorization: str) -> str | None:
    """The key in an Authorization header: `Bearer KEY`, or `Basic base64(user:KEY)`."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            _, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password if sep else None
    return None


def key_matches(key: str, keys: tuple[str, ...]) -> bool:
    """Compare in constant time against every key (no early exit that would time which one is close)."""
    given = key.encode()
    return sum(hmac.compare_digest(given, k.encode()) for k in keys) > 0


class ApiKeyMiddleware:
    """ASGI middleware: a request without a valid key gets 401 in its API's error format."""

    def __init__(self, app: Callable[..., Awaitable[None]], keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys or is_open(path):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = presented_key(headers.get("authorization", ""))
        if key is not None and key_matches(key, self.keys):
            token = set_owner(owner_of(key))  # what this request queues and sees is this key's
            try:
                await self.app(scope, receive, send)
            finally:
                reset_owner(token)
            return
        await self.refusal(path, key)(scope, receive, send)

    @staticmethod
    def refusal(path: str, key: str | None) -> Response:
        if path.startswith(OPENAI_PREFIX):  # the openai package raises AuthenticationError on this
            if key is None:
                return error_response(401, "You didn't provide an API key. Send it as `Authorization: Bearer KEY` "
                                           "(the openai client's api_key).", {"WWW-Authenticate": "Bearer"})
            shown = key[:3] + "*" * max(0, min(len(key) - 7, 20)) + key[-4:] if len(key) > 8 else "***"
            return error_response(401, f"Incorrect API key provided: {shown}. This server's keys are its "
                                       "server.api_keys.", {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
        message = ("this server needs an API key: send `Authorization: Bearer KEY`, or HTTP Basic auth with the "
                   "key as the password" if key is None else "incorrect API key (server.api_keys)")
        return JSONResponse({"detail": message}, status_code=401,
                            headers={"WWW-Authenticate": f'Basic realm="{REALM}"'})
