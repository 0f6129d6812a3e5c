"""Device credentials and topic rules in the embedded (amqtt) broker.

Two amqtt plugins share one `DeviceAccess`: `DeviceAuthPlugin` decides at CONNECT who a client
is (iotmeter's service account, or a device by password or by client certificate) and
`DeviceTopicPlugin` lets a device publish, subscribe and receive only on its own topics
(`iotmeter.devicelink.acl`). amqtt builds plugins itself from the broker config dict, so the
shared object travels in each plugin's `Config` dataclass (`{"access": <DeviceAccess>}`): amqtt
hands plugin values to `dacite`, which keeps an object of the declared class as it is.

No cache of successful password checks here: a device connects once per session, and the
registry's `CredentialCheck` is the one place that knows when a credential changes (it keeps its
own short cache for reconnect storms), so a second cache would only delay a rotation.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from iotmeter.devicelink import acl
from iotmeter.devicelink.certificates import device_id_from_certificate, serial_hex
from iotmeter.devicelink.credentials import SERVICE_USERNAME

if TYPE_CHECKING:
    from amqtt.session import Session

logger = logging.getLogger(__name__)

PRINCIPAL_ATTRIBUTE = "iotmeter.principal"
"""Key in amqtt's `Session.attributes` (storage the session keeps for plugins)."""


class CredentialCheck(Protocol):
    """The device registry, as the embedded broker asks it at CONNECT."""

    async def device_password_ok(self, device_id: str, password: str) -> bool:
        """True when the device exists, has a credential, and this is its password."""
        ...

    async def certificate_revoked(self, serial_hex: str) -> bool:
        """True when iotmeter revoked the device certificate with this serial (lower-case hex,
        no leading zeros: `iotmeter.devicelink.certificates.serial_hex`)."""
        ...


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an authenticated broker session is."""

    device_id: str | None
    """None: iotmeter's own service account, which may do anything."""
    method: str
    """`password`, `certificate` or `service` (for logs)."""


SERVICE = Principal(None, "service")


class DeviceAccess:
    """Identifies broker clients and applies the device topic rules (shared by both plugins)."""

    def __init__(
        self,
        check: CredentialCheck,
        service_password: str,
        device_cas: Sequence[x509.Certificate] = (),
    ) -> None:
        self.check = check
        self.service_password = service_password
        """The password of iotmeter's own account (`SERVICE_USERNAME`)."""
        self.device_cas = tuple(device_cas)
        """Device certificates count only when one of these CAs issued them (none: never)."""

    async def identify(self, session: Session) -> Principal | None:
        """Who the client of this CONNECT is; None when it must be refused."""
        certificate = self._client_certificate(session)
        if certificate is not None:
            return await self._identify_by_certificate(session, certificate)
        username, password = session.username, session.password
        if username == SERVICE_USERNAME:
            if password is not None and hmac.compare_digest(
                password.encode(), self.service_password.encode()
            ):
                return SERVICE
            return self._refuse(session, "wrong service account password")
        if username is None or not acl.valid_device_username(username, session.client_id):
            return self._refuse(session, "username and client id must both be the device id")
        if not password:
            return self._refuse(session, "no password and no client certificate")
        if not await self.check.device_password_ok(username, password):
            return self._refuse(session, "unknown device, no credential, or wrong password")
        return self._with_allowed_will(session, Principal(username, "password"))

    def may(self, principal: Principal, action: Action, topic: str) -> bool:
        """Whether this client may publish, subscribe or receive on `topic`."""
        if principal.device_id is None:
            return True
        if action == Action.PUBLISH:
            return acl.device_may_publish(principal.device_id, topic)
        # A device's subscribe filters are exact topic names, so they also bound what it
        # receives (a second line behind the SUBSCRIBE check).
        if action in (Action.SUBSCRIBE, Action.RECEIVE):
            return acl.device_may_subscribe(principal.device_id, topic)
        return False

    def _client_certificate(self, session: Session) -> x509.Certificate | None:
        """The client's certificate, when it presented one that the device CA issued."""
        if not self.device_cas or session.ssl_object is None:
            return None
        # The TLS listener verified the chain (amqtt: CERT_OPTIONAL with the device CA file as
        # its only trust anchors); the signature check keeps a listener set up otherwise honest.
        der = session.ssl_object.getpeercert(binary_form=True)
        if not der:
            return None
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        for ca in self.device_cas:
            try:
                certificate.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return certificate
        return None

    async def _identify_by_certificate(
        self, session: Session, certificate: x509.Certificate
    ) -> Principal | None:
        common_name = device_id_from_certificate(certificate.public_bytes(Encoding.DER))
        if common_name is None:
            return self._refuse(session, "client certificate without one common name")
        if session.username is not None and session.username != common_name:
            return self._refuse(session, "username differs from the certificate's common name")
        if not acl.valid_device_username(common_name, session.client_id):
            return self._refuse(session, "client id must be the certificate's common name")
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return self._refuse(session, "client certificate outside its validity")
        serial = serial_hex(certificate)
        if await self.check.certificate_revoked(serial):
            return self._refuse(session, f"client certificate {serial} is revoked")
        # amqtt has no other place for the identity a certificate proves: its logs and any
        # later plugin read the username.
        session.username = common_name
        return self._with_allowed_will(session, Principal(common_name, "certificate"))

    def _with_allowed_will(self, session: Session, principal: Principal) -> Principal | None:
        # amqtt 0.12.1 publishes a will without asking the topic plugins: check it here.
        if session.will_flag and not (
            session.will_topic is not None
            and self.may(principal, Action.PUBLISH, session.will_topic)
        ):
            return self._refuse(session, "will topic outside the device's own topics")
        return principal

    @staticmethod
    def _refuse(session: Session, reason: str) -> None:
        logger.info(
            "embedded broker refused client %s (username %s) from %s: %s",
            _shown(session.client_id),
            _shown(session.username),
            session.remote_address,
            reason,
        )


def _shown(value: str | None) -> str:
    """A client-chosen string for a log line: quoted, escaped, and short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def principal_of(session: Session | None) -> Principal | None:
    """The identity `DeviceAuthPlugin` gave this session at its last CONNECT, if any."""
    if session is None:
        return None
    principal = session.attributes.get(PRINCIPAL_ATTRIBUTE)
    return principal if isinstance(principal, Principal) else None


# amqtt ships no type information: its base classes are `Any` to mypy.
class DeviceAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt auth plugin: the service account, or a device with its own credentials."""

    @dataclass
    class Config:
        access: DeviceAccess

    async def authenticate(self, *, session: Session) -> bool:
        # A session kept from an earlier connection (clean session off) keeps its attributes:
        # forget the old identity before judging the new CONNECT.
        session.attributes.pop(PRINCIPAL_ATTRIBUTE, None)
        access: DeviceAccess = self.context.config.access
        try:
            principal = await access.identify(session)
        except Exception:
            # amqtt would let the error escape its connection handler: refuse, and say why.
            logger.exception(
                "embedded broker: checking client %s failed; refusing it",
                _shown(session.client_id),
            )
            return False
        if principal is None:
            return False
        session.attributes[PRINCIPAL_ATTRIBUTE] = principal
        logger.debug(
            "embedded broker: client %s is %s (%s)",
            _shown(session.client_id),
            principal.device_id or SERVICE_USERNAME,
            principal.method,
        )
        return True


class DeviceTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic plugin: devices reach only their own topics; needs `DeviceAuthPlugin`."""

    @dataclass
    class Config:
        access: DeviceAccess

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        principal = principal_of(session)
        if principal is None or topic is None or action is None:
            return False
        access: DeviceAccess = self.context.config.access
        allowed = access.may(principal, action, topic)
        if not allowed and action != Action.RECEIVE:
            logger.info(
                "embedded broker: device %r may not %s %s",
                principal.device_id,
                action.value,
                _shown(topic),
            )
        return allowed


def access_plugins(access: DeviceAccess) -> dict[str, dict[str, Any]]:
    """The `plugins` entries of an amqtt broker config that enforce `access`."""
    return {
        f"{__name__}.{DeviceAuthPlugin.__name__}": {"access": access},
        f"{__name__}.{DeviceTopicPlugin.__name__}": {"access": access},
    }


def guarded_broker(config: dict[str, Any], access: DeviceAccess) -> Any:
    """An amqtt broker that also keeps retained messages to the topics each client may read.

    amqtt 0.12.1 hands a connecting client the retained messages of every topic filter any
    client ever subscribed to, without asking the topic plugins (at each connect,
    `Broker._handle_client_session` calls `_publish_retained_messages_for_subscription` for
    every filter in its table): device A would get device B's retained configuration and
    status. No plugin hook runs there, so the one method is overridden (a private one: amqtt is
    pinned below 0.13, and tests/integration/test_embedded_broker_auth.py fails if it changes).
    """
    from amqtt.broker import Broker

    class _GuardedBroker(Broker):  # type: ignore[misc]
        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session
        ) -> None:
            principal = principal_of(session)
            if principal is None or not access.may(principal, Action.SUBSCRIBE, subscription[0]):
                return
            await super()._publish_retained_messages_for_subscription(subscription, session)

    return _GuardedBroker(config)
