"""TLS of iotmeter's own MQTT clients (`mqtts://` broker URLs)."""

from __future__ import annotations

import ssl
from pathlib import Path


def mqtt_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the broker against `ca_file` (`IOTMETER_MQTT_CA_FILE`), else the system's CAs.
    Reads files: call it at start-up, or in a thread."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
