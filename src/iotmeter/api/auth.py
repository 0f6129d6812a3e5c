"""Who is calling, and may they: API keys and JWT bearer tokens, three roles.

Tokens come in headers only (`Authorization: Bearer …` or `X-API-Key`), never in cookies, so a
page in a browser cannot act with a user's credentials (no cross-site request can set them).

Roles, each including the ones below it: `viewer` reads everything except keys and the audit
log (a rule's backtest included, a POST that writes nothing); `operator` also writes devices,
configs and alerts; `admin` also manages keys and reads the audit log. What a request needs
follows from its method and path (`needed_role`), so a new route is covered without anyone
remembering to protect it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from iotmeter.api.deps import StateDep
from iotmeter.config import Settings
from iotmeter.db.base import utcnow
from iotmeter.errors import IotmeterError
from iotmeter.repositories.api_keys import KeyReader
from iotmeter.security.keys import Role, key_id_of, matches, usable
from iotmeter.state import AppState

logger = logging.getLogger(__name__)

ADMIN_PATHS = ("/api/v1/keys", "/api/v1/audit")
PRINCIPAL_SCOPE_KEY = "iotmeter.principal"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_ONLY_POST = re.compile(r"/api/v1/alert-rules/[^/]+/backtest")
"""POSTs that write nothing (a backtest takes its range as input): a viewer may send them."""
_HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
_PUBLIC_KEY_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key (`iotm_…`) or, when configured, a JWT.",
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="apiKey", description="An API key."
)


class Unauthorized(IotmeterError):
    status_code = 401
    code = "unauthorized"
    default_headers = MappingProxyType({"WWW-Authenticate": 'Bearer realm="iotmeter"'})


class Forbidden(IotmeterError):
    status_code = 403
    code = "forbidden"


@dataclass(frozen=True, slots=True)
class Principal:
    actor: str
    """How the audit log names the caller: `key:<key id> (<name>)`, `jwt:<subject>`,
    `anonymous` (auth off)."""
    role: Role


ANONYMOUS_ADMIN = Principal("anonymous", Role.admin)


def needed_role(method: str, path: str) -> Role:
    if path.startswith(ADMIN_PATHS):
        return Role.admin
    if method in SAFE_METHODS or (method == "POST" and READ_ONLY_POST.fullmatch(path)):
        return Role.viewer
    return Role.operator


async def authenticate(
    state: AppState, credentials: HTTPAuthorizationCredentials | None, api_key: str | None
) -> Principal:
    """The caller, or `Unauthorized` saying what is wrong with what was sent."""
    if state.settings.auth == "off":
        return ANONYMOUS_ADMIN
    token = api_key or (credentials.credentials if credentials is not None else None)
    if not token:
        raise Unauthorized(
            "authentication required: send an API key as `Authorization: Bearer <key>` or "
            "`X-API-Key: <key>` (the first start writes an admin key to "
            f"{state.settings.auth_bootstrap_file})"
        )
    key_id = key_id_of(token)
    if key_id is not None:
        return await _key_principal(state, key_id, token)
    if _jwt_configured(state.settings) and token.count(".") == 2:
        return _jwt_principal(state.settings, token)
    raise Unauthorized("the credentials are not an API key (iotm_…) or an accepted token")


async def _key_principal(state: AppState, key_id: str, token: str) -> Principal:
    cache = state.key_cache
    now = utcnow()
    cached = cache.get(key_id, token)
    if cached is not None:
        # Let a revocation notification already received be handled first: the loop reads the
        # socket in one pass, asyncpg schedules the callback for the next (key_cache.py).
        for _ in range(3):
            await asyncio.sleep(0)
        cached = cache.get(key_id, token)
    if cached is not None and usable(cached.expires_at, None, now):
        cache.used(key_id, now)
        return Principal(f"key:{key_id} ({cached.name})", Role[cached.role])
    generation = cache.generation
    async with state.database.reader() as connection:
        found = await KeyReader(connection).find(key_id)
    # The same message for every way a key fails: a caller learns nothing about which keys exist.
    if found is None or not matches(token, found[0]) or not usable(found[3], found[4], now):
        raise Unauthorized("the API key is unknown, revoked or expired")
    secret_hash, name, role, expires_at, _revoked = found
    cache.put(key_id, secret_hash, name, role, expires_at, generation=generation)
    cache.used(key_id, now)
    return Principal(f"key:{key_id} ({name})", Role[role])


def _jwt_configured(settings: Settings) -> bool:
    return settings.auth_jwt_secret is not None or settings.auth_jwt_public_key is not None


def _jwt_verification_key(settings: Settings) -> tuple[Any, list[str]]:
    if settings.auth_jwt_secret is not None:
        return settings.auth_jwt_secret.get_secret_value(), _HMAC_ALGORITHMS
    text = settings.auth_jwt_public_key or ""
    if "-----BEGIN" not in text:
        text = Path(text).read_text()
    return text, _PUBLIC_KEY_ALGORITHMS


def _jwt_principal(settings: Settings, token: str) -> Principal:
    key, algorithms = _jwt_verification_key(settings)
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=settings.auth_jwt_audience,
            issuer=settings.auth_jwt_issuer,
            options={
                "require": ["exp", "sub"],
                "verify_aud": settings.auth_jwt_audience is not None,
            },
            leeway=30,
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"the token was refused: {exc}") from None
    values = claims.get(settings.auth_jwt_role_claim)
    names = [values] if isinstance(values, str) else values if isinstance(values, list) else []
    roles = [
        Role[settings.auth_jwt_roles.get(name, name)]
        for name in names
        if isinstance(name, str) and settings.auth_jwt_roles.get(name, name) in Role.__members__
    ]
    if not roles:
        raise Forbidden(
            f"the token's {settings.auth_jwt_role_claim!r} claim names no role of iotmeter "
            "(admin, operator, viewer; see IOTMETER_AUTH_JWT_ROLES)"
        )
    return Principal(f"jwt:{str(claims['sub'])[:120]}", max(roles))


async def authorize(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> Principal:
    """The dependency every `/api/v1` route has: rate limits, authentication, the role."""
    client = request.client
    await state.rate_limits.check_address(client.host if client else "unknown")
    principal = await authenticate(state, credentials, api_key)
    await state.rate_limits.check_key(principal.actor)
    # In the request's own scope (the audit log reads it there): `request.state` can be a
    # dict shared by every request of a server.
    request.scope[PRINCIPAL_SCOPE_KEY] = principal
    needed = needed_role(request.method, request.url.path)
    if principal.role < needed:
        raise Forbidden(
            f"this needs the {needed.name} role; the credentials have {principal.role.name}"
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(authorize)]


async def optional_principal(request: Request, state: StateDep) -> Principal | None:
    """For public routes that tell more to a caller with credentials (`/ready`)."""
    if state.settings.auth == "off":
        return ANONYMOUS_ADMIN
    # Called, not declared as dependencies: a public route declares no security scheme.
    credentials = await bearer_scheme(request)
    api_key = await api_key_scheme(request)
    if credentials is None and not api_key:
        return None
    try:
        return await authenticate(state, credentials, api_key)
    except IotmeterError:
        return None


def warn_when_off(settings: Settings) -> None:
    if settings.auth == "off":
        logger.warning(
            "IOTMETER_AUTH=off: the API answers anyone who can reach it, with full rights. "
            "Use it only on a trusted machine with the API bound to loopback."
        )
