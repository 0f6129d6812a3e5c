"""Identifier rules shared by the API, the decoder and the stores."""

from __future__ import annotations

import re

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
DEVICE_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
# InfluxDB reserves `time` and names starting with `_`: no store gets them, so all keep the same.
FIELD_NAME_PATTERN = r"^(?!_|time$)[A-Za-z0-9_.\-]{1,64}$"

# "." and ".." would be path segments in archive keys and folders: never device ids.
DEVICE_ID_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.\-]{1,64}$")
DEVICE_TYPE_RE = re.compile(DEVICE_TYPE_PATTERN)
FIELD_NAME_RE = re.compile(FIELD_NAME_PATTERN)
