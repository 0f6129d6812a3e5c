"""The bytes of an export stream: rows, cursor records and the end line, in CSV or NDJSON.

CSV: a header line `device_id,field,ts,value`, then rows; after every batch a line
`# cursor=<cursor>`, and last `# end rows=<n>`. No row starts with `#` (device ids cannot), so
`pandas.read_csv(..., comment="#")` and similar readers skip those lines. NDJSON: one object per
row `{"device_id", "field", "ts", "value"}`, after every batch `{"cursor": "..."}`, and last
`{"end": true, "rows": n}`. A download without its end line was cut: resume it with `after=`
and the last cursor it holds. A failure after the answer began (its status already sent) is an
error line (`# error ...` or `{"error": {"message"}}`) and no end line.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Literal

import orjson

from iotmeter.api.timerange import format_time
from iotmeter.storage.archive.base import ArchivedMessage

ExportFormat = Literal["csv", "ndjson"]
MEDIA_TYPES: dict[ExportFormat, str] = {
    "csv": "text/csv; charset=utf-8",
    "ndjson": "application/x-ndjson",
}


def encode_rows(device_id: str, rows: Sequence[tuple[int, str, float]], form: ExportFormat) -> str:
    """Rows as CSV lines or NDJSON lines. Device ids and field names never need quoting or
    escaping (their alphabets hold no comma, quote or backslash); values are finite floats."""
    lines: list[str] = []
    append = lines.append
    last_epoch_us = -1
    ts = ""
    if form == "csv":
        for epoch_us, field, value in rows:
            if epoch_us != last_epoch_us:
                ts, last_epoch_us = format_time(epoch_us), epoch_us
            append(f"{device_id},{field},{ts},{value!r}\n")
    else:
        head = f'{{"device_id":"{device_id}","field":"'
        for epoch_us, field, value in rows:
            if epoch_us != last_epoch_us:
                ts, last_epoch_us = format_time(epoch_us), epoch_us
            append(f'{head}{field}","ts":"{ts}","value":{value!r}}}\n')
    return "".join(lines)


CSV_HEADER = "device_id,field,ts,value\n"


def cursor_record(cursor: str, form: ExportFormat) -> str:
    return f"# cursor={cursor}\n" if form == "csv" else f'{{"cursor":"{cursor}"}}\n'


def end_record(rows: int, form: ExportFormat) -> str:
    """The last line of a complete export: without it, the download was cut."""
    return f"# end rows={rows}\n" if form == "csv" else f'{{"end":true,"rows":{rows}}}\n'


def error_record(message: str, form: ExportFormat) -> str:
    """A failure after the answer began (its status is sent): the stream ends without `end`."""
    if form == "csv":
        return "# error " + " ".join(message.split()) + "\n"
    return orjson.dumps({"error": {"message": message}}).decode() + "\n"


def encode_raw_line(message: ArchivedMessage) -> bytes:
    """One archived message as an NDJSON line whose `document` is the archived bytes unchanged.

    `{"key": ..., "ts": ..., "document": <the document>}`: the document (the JSON object that
    `GET /api/v1/raw/{key}` answers, payload inside) is spliced in byte for byte and comes last,
    so its exact bytes are the line from just after `"document":` up to the closing `}`. A
    document that could not stand on one line that way (one holding a line break, e.g. a
    pretty-printed payload, or not UTF-8 JSON) is sent as `"document_base64"` (standard base64
    of the bytes) instead.
    """
    head = orjson.dumps({"key": message.key, "ts": format_time(message.epoch_us)})[:-1]
    body = message.body
    if b"\n" not in body and b"\r" not in body:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            return head + b',"document":' + body + b"}\n"
    encoded = base64.b64encode(body).decode("ascii")
    return head + b',"document_base64":"' + encoded.encode("ascii") + b'"}\n'
