"""The S3 archive bucket's Object Lock and lifecycle, checked (and set when allowed) once at the
bucket check of `S3ArchiveStore`.

Object Lock (`IOTMETER_ARCHIVE_OBJECT_LOCK_DAYS` > 0): a bucket iotmeter creates gets Object
Lock and a default retention of that many days in governance mode, so no object can be
overwritten or deleted in that time without the `s3:BypassGovernanceRetention` permission. A
bucket that exists without Object Lock is used anyway with a warning (and `object lock: missing`
in the health detail): refusing to start would stop the whole raw archive over a second line of
defence (every write is already write-once, `If-None-Match: *`), and turning Object Lock on for
an existing bucket (versioning first, irreversibly) is its owner's decision, not the app's.

Retention (`IOTMETER_ARCHIVE_RETENTION_DAYS` > 0): the bucket must hold a lifecycle rule that
expires every object (the archive uses the whole bucket: keys begin with the device id) after
that many days, rounded up to whole days (S3 counts whole days from each object's creation).
When none does, iotmeter puts its own rule (`iotmeter-archive-retention`) beside the bucket's
other rules; when S3 refuses (no permission, not implemented) a warning names what to configure.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from iotmeter.config import env_name

if TYPE_CHECKING:
    from iotmeter.storage.archive.s3 import S3ArchiveStore

logger = logging.getLogger(__name__)

RULE_ID = "iotmeter-archive-retention"
_VENDOR_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)
_NO_LIFECYCLE = frozenset({"NoSuchLifecycleConfiguration", "404"})
_NO_LOCK = frozenset({"ObjectLockConfigurationNotFoundError", "404", "NotImplemented", "501"})


def _code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class LockState:
    description: str
    """`off`, `governance 30 d`, `enabled without default retention`, `missing`, `unknown`."""
    enabled: bool
    """Object Lock is on: S3 then demands Content-MD5 (or a checksum) on every upload."""


def retention_rule_days(retention_days: float) -> int:
    """Whole days for an S3 Expiration (at least 1, never sooner than asked)."""
    return max(1, math.ceil(retention_days))


def _whole_bucket(rule: dict[str, Any]) -> bool:
    """Whether a lifecycle rule applies to every object (no prefix, tag or size filter)."""
    if rule.get("Prefix"):  # the older form, without Filter
        return False
    rule_filter = rule.get("Filter")
    return rule_filter is None or rule_filter in ({}, {"Prefix": ""})


def _expiry_days(rule: dict[str, Any]) -> int | None:
    if rule.get("Status") != "Enabled" or not _whole_bucket(rule):
        return None
    days = rule.get("Expiration", {}).get("Days")
    return int(days) if days is not None else None


class BucketPolicies:
    """Object Lock and lifecycle of one store's bucket."""

    def __init__(self, store: S3ArchiveStore) -> None:
        self.store = store
        self.client = store.client
        self.bucket = store.bucket

    def _where(self) -> str:
        return f"S3 archive at {self.store.endpoint_url} (bucket {self.bucket})"

    async def set_default_retention(self) -> LockState:
        """On a bucket just created with Object Lock: the default retention rule."""
        days = self.store.object_lock_days
        try:
            await self.client.put_object_lock_configuration(
                Bucket=self.bucket,
                ObjectLockConfiguration={
                    "ObjectLockEnabled": "Enabled",
                    "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": days}},
                },
            )
        except _VENDOR_ERRORS as exc:
            logger.warning(
                "%s: Object Lock is on but its default retention (%d days, governance) "
                "could not be set (%s): set it on the bucket",
                self._where(),
                days,
                _code(exc),
            )
            return LockState("enabled without default retention", True)
        logger.info("%s: Object Lock on, governance mode, %d days", self._where(), days)
        return LockState(f"governance {days} d", True)

    async def check_object_lock(self) -> LockState:
        """On a bucket that existed: read its Object Lock; warn when one was asked for and
        the bucket has none (or another retention)."""
        wanted = self.store.object_lock_days
        try:
            response = await self.client.get_object_lock_configuration(Bucket=self.bucket)
        except _VENDOR_ERRORS as exc:
            if _code(exc) in _NO_LOCK:
                if wanted > 0:
                    logger.warning(
                        "%s: %s=%d, but the bucket exists without Object Lock, which can only "
                        "be enabled when a bucket is created (or by its owner: versioning, "
                        "then PutObjectLockConfiguration). Archived objects are still "
                        "write-once, but not locked.",
                        self._where(),
                        env_name("archive_object_lock_days"),
                        wanted,
                    )
                    return LockState("missing", False)
                return LockState("off", False)
            logger.warning("%s: cannot read its Object Lock (%s)", self._where(), _code(exc))
            return LockState("unknown", False)
        configuration = response.get("ObjectLockConfiguration", {})
        if configuration.get("ObjectLockEnabled") != "Enabled":
            return LockState("missing" if wanted > 0 else "off", False)
        retention = configuration.get("Rule", {}).get("DefaultRetention", {})
        if not retention:
            if wanted > 0:
                return await self.set_default_retention()
            return LockState("enabled without default retention", True)
        days = retention.get("Days")
        if days is None and retention.get("Years") is not None:
            days = int(retention["Years"]) * 365
        state = LockState(f"{str(retention.get('Mode', '')).lower()} {days} d", True)
        if wanted > 0 and (retention.get("Mode") != "GOVERNANCE" or days != wanted):
            logger.warning(
                "%s: the bucket's default retention is %s, not governance %d d as %s asks; "
                "the bucket's own rule stays",
                self._where(),
                state.description,
                wanted,
                env_name("archive_object_lock_days"),
            )
        return state

    async def check_lifecycle(self) -> None:
        """Make sure a rule expires the archive after the retention (see the module)."""
        if self.store.retention_days <= 0:
            return
        wanted = retention_rule_days(self.store.retention_days)
        try:
            response = await self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)
            rules: list[dict[str, Any]] = list(response.get("Rules", []))
        except _VENDOR_ERRORS as exc:
            if _code(exc) not in _NO_LIFECYCLE:
                self._lifecycle_refused("GetBucketLifecycleConfiguration", exc, wanted)
                return
            rules = []
        expiries = {rule.get("ID", "?"): _expiry_days(rule) for rule in rules}
        sooner = {name: days for name, days in expiries.items() if days and days < wanted}
        if sooner:
            logger.warning(
                "%s: lifecycle rule(s) %s expire archived objects sooner than %s=%s",
                self._where(),
                ", ".join(f"{name} ({days} d)" for name, days in sooner.items()),
                env_name("archive_retention_days"),
                self.store.retention_days,
            )
        if wanted in expiries.values():
            return
        rule: dict[str, Any] = {
            "ID": RULE_ID,
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "Expiration": {"Days": wanted},
        }
        if self.store.object_lock != "off":
            # Versioned (locked) bucket: expiry only adds a delete marker; the old version
            # goes a day later, once its lock has run out.
            rule["NoncurrentVersionExpiration"] = {"NoncurrentDays": 1}
        rules = [other for other in rules if other.get("ID") != RULE_ID] + [rule]
        try:
            await self.client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": rules}
            )
        except _VENDOR_ERRORS as exc:
            self._lifecycle_refused("PutBucketLifecycleConfiguration", exc, wanted)
            return
        logger.info(
            "%s: lifecycle rule %s expires archived objects after %d days",
            self._where(),
            RULE_ID,
            wanted,
        )

    def _lifecycle_refused(self, operation: str, exc: BaseException, days: int) -> None:
        logger.warning(
            "%s: %s refused (%s), so iotmeter cannot make the archive expire: configure a "
            "lifecycle rule on the bucket that expires every object after %d days (%s), or "
            "set %s=0 to keep everything",
            self._where(),
            operation,
            _code(exc),
            days,
            env_name("archive_retention_days"),
            env_name("archive_retention_days"),
        )
