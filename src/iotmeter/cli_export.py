"""`iotmeter export`: stream a telemetry or raw export from a running iotmeter over HTTP.

The rows go to a file (or standard output) without the stream's cursor records; after every
cursor the file is flushed and `<file>.export-state` records the cursor and the file's length
at it. A cut download leaves that state behind: `--resume` truncates the file to the length
recorded (dropping a half-written row) and continues after the recorded cursor, so the file
ends up as one uninterrupted export would have written it. The state file goes once the
export is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

DEFAULT_URL = "http://127.0.0.1:8080"
STATE_SUFFIX = ".export-state"


class ExportFailed(Exception):
    """The export cannot go on; the message says what to do."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export",
        help="stream telemetry (or raw archived messages) from a running iotmeter to a file",
        description="Export over the HTTP API with a key; resumable with --resume.",
    )
    export.add_argument("device", nargs="*", help="device id(s); or --type")
    export.add_argument("--type", dest="device_type", help="every device of this type")
    export.add_argument("--fields", help="comma-separated field names (default all)")
    export.add_argument("--start", default="1970-01-01T00:00:00Z", help="RFC 3339 or like -7d")
    export.add_argument("--stop", default="now", help="RFC 3339, relative or now (default)")
    export.add_argument("--format", choices=("csv", "ndjson"), default="csv")
    export.add_argument(
        "--raw", action="store_true", help="the archived raw messages of one device (NDJSON)"
    )
    export.add_argument("-o", "--output", help="file to write (default standard output)")
    export.add_argument(
        "--resume",
        action="store_true",
        help="continue the cut export into --output from its last cursor",
    )
    export.add_argument("--after", help="start after this cursor (from a cut export's stderr)")
    export.add_argument(
        "--url",
        default=os.environ.get("IOTMETER_URL", DEFAULT_URL),
        help=f"iotmeter's address (IOTMETER_URL, default {DEFAULT_URL})",
    )
    export.add_argument(
        "--key",
        default=os.environ.get("IOTMETER_API_KEY"),
        help="API key (default IOTMETER_API_KEY); any role may export",
    )
    progress = export.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when standard error is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    export.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    export.set_defaults(handler=run, needs_settings=False)


def run(_settings: object, args: argparse.Namespace) -> int:
    try:
        request = _request(args)
        return _export(args, request)
    except ExportFailed as exc:
        print(f"iotmeter export: {exc}", file=sys.stderr)
        return 1


@dataclass
class Request:
    path: str
    params: dict[str, str]
    form: str

    def identity(self) -> dict[str, Any]:
        """What a state file must match to be resumed by this command."""
        return {"path": self.path, "params": self.params, "format": self.form}


def _request(args: argparse.Namespace) -> Request:
    devices: list[str] = args.device
    if args.raw:
        if len(devices) != 1 or args.device_type or args.fields:
            raise ExportFailed("--raw exports one device: give one device id (no --type, --fields)")
        return Request(
            f"/api/v1/devices/{quote(devices[0], safe='')}/raw/export",
            {"start": args.start, "stop": args.stop},
            "ndjson",
        )
    if bool(devices) == bool(args.device_type):
        raise ExportFailed("give device ids or --type, one of the two")
    params = {"start": args.start, "stop": args.stop, "format": args.format}
    if args.fields:
        params["fields"] = args.fields
    if args.device_type:
        return Request(
            "/api/v1/telemetry/export", {**params, "type": args.device_type}, args.format
        )
    if len(devices) == 1:
        return Request(
            f"/api/v1/devices/{quote(devices[0], safe='')}/telemetry/export", params, args.format
        )
    return Request(
        "/api/v1/telemetry/export", {**params, "device_ids": ",".join(devices)}, args.format
    )


@dataclass
class Progress:
    """Rows written, the last cursor and the output's length at it."""

    rows: int = 0
    cursor: str | None = None
    bytes_at_cursor: int = 0
    complete: bool = False
    started: float = field(default_factory=time.monotonic)


def _export(args: argparse.Namespace, request: Request) -> int:
    import httpx

    output_path = Path(args.output) if args.output else None
    state_path = Path(f"{args.output}{STATE_SUFFIX}") if args.output else None
    after: str | None = args.after
    append_at: int | None = None
    if args.resume:
        if output_path is None or state_path is None:
            raise ExportFailed("--resume needs --output (the file of the cut export)")
        state = _read_state(state_path, request)
        after, append_at = state["cursor"], int(state["bytes"])
    progress = Progress()
    headers = {"Accept": "*/*"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    params = dict(request.params)
    if after:
        params["after"] = after
    url = args.url.rstrip("/") + request.path
    show_bar = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(30.0, read=300.0)) as client,
            client.stream("GET", url, params=params, headers=headers) as response,
        ):
            if response.status_code != 200:
                raise ExportFailed(_error_text(response))
            output = _open_output(output_path, append_at)
            try:
                with ProgressBar(show_bar) as bar:
                    _copy(
                        response.iter_bytes(), output, request, progress, state_path, bar, append_at
                    )
            finally:
                if output is not sys.stdout.buffer:
                    output.close()
    except httpx.ConnectError as exc:
        raise ExportFailed(f"cannot reach {args.url} ({exc}); check --url") from exc
    except httpx.HTTPError as exc:
        _cut(progress, output_path, f"{type(exc).__name__}: {exc}")
        return 1
    if not progress.complete:
        _cut(progress, output_path, "the stream ended without its end line")
        return 1
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    if not args.quiet:
        seconds = max(time.monotonic() - progress.started, 1e-9)
        print(
            f"exported {progress.rows:,} rows in {seconds:.1f} s "
            f"({progress.rows / seconds:,.0f} rows/s)",
            file=sys.stderr,
        )
    return 0


def _read_state(state_path: Path, request: Request) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise ExportFailed(
            f"nothing to resume: {state_path} is missing (the export finished, or never "
            "received a cursor); run without --resume to export again"
        ) from None
    except ValueError:
        raise ExportFailed(f"{state_path} is damaged; run without --resume") from None
    if state.get("request") != request.identity():
        raise ExportFailed(
            f"{state_path} belongs to another export ({state.get('request')}); repeat that "
            "command with --resume, or run without --resume"
        )
    return state


def _open_output(path: Path | None, append_at: int | None) -> IO[bytes]:
    if path is None:
        return sys.stdout.buffer
    if append_at is None:
        return path.open("wb")
    output = path.open("r+b")
    # What came after the last cursor (a half row, or rows the cursor does not cover) goes.
    output.truncate(append_at)
    output.seek(append_at)
    return output


def _copy(
    chunks: Iterator[bytes],
    output: IO[bytes],
    request: Request,
    progress: Progress,
    state_path: Path | None,
    bar: ProgressBar,
    append_at: int | None,
) -> None:
    """Data lines to the output, cursor lines to the state file, until the end line."""
    csv = request.form == "csv"
    header_due = csv  # the first line of a CSV answer is its header
    written = append_at or 0
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        block: list[bytes] = []
        for line in lines:
            if header_due:
                header_due = False
                if append_at is None:  # a resumed file has its header
                    block.append(line)
                continue
            kind = _kind(line, csv)
            if kind == "row":
                block.append(line)
                progress.rows += 1
                continue
            written += _write(output, block)
            block = []
            if kind == "cursor":
                progress.cursor = _cursor_of(line, csv)
                progress.bytes_at_cursor = written
                output.flush()
                if state_path is not None:
                    _write_state(state_path, request, progress)
            elif kind == "end":
                progress.complete = True
            else:
                raise ExportFailed(f"the server reported: {line.decode(errors='replace')}")
        written += _write(output, block)
        bar.update(progress.rows)
    output.flush()


def _write(output: IO[bytes], lines: list[bytes]) -> int:
    if not lines:
        return 0
    data = b"\n".join(lines) + b"\n"
    output.write(data)
    return len(data)


def _kind(line: bytes, csv: bool) -> str:
    """`row`, `cursor`, `end` or `error`: what a line of the stream is."""
    if csv:
        if not line.startswith(b"#"):
            return "row"
        if line.startswith(b"# cursor="):
            return "cursor"
        return "end" if line.startswith(b"# end") else "error"
    if line.startswith(b'{"cursor":'):
        return "cursor"
    if line.startswith(b'{"end":'):
        return "end"
    return "error" if line.startswith(b'{"error":') else "row"


def _cursor_of(line: bytes, csv: bool) -> str:
    if csv:
        return line[len(b"# cursor=") :].decode("ascii").strip()
    cursor: str = json.loads(line)["cursor"]
    return cursor


def _write_state(path: Path, request: Request, progress: Progress) -> None:
    """The cursor and the output's length at it, replaced atomically."""
    state = {
        "request": request.identity(),
        "cursor": progress.cursor,
        "bytes": progress.bytes_at_cursor,
        "rows_at_cursor": progress.rows,
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)


def _cut(progress: Progress, output_path: Path | None, why: str) -> None:
    if output_path is not None and progress.cursor is not None:
        advice = "run the same command with --resume to go on"
    elif progress.cursor is not None:
        advice = f"run the same command with --after {progress.cursor} to go on"
    else:
        advice = "no cursor came yet: run the same command again"
    print(
        f"iotmeter export: the download was cut after {progress.rows:,} rows ({why}); {advice}",
        file=sys.stderr,
    )


def _error_text(response: Any) -> str:
    response.read()
    try:
        error = response.json()["error"]
        return f"HTTP {response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"


class ProgressBar:
    """Items done and their rate on standard error (rich), or nothing (also `iotmeter
    archive verify`'s)."""

    def __init__(self, enabled: bool, unit: str = "rows") -> None:
        self.enabled = enabled
        self.unit = unit
        self._progress: Any = None
        self._task: Any = None
        self._started = time.monotonic()

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress as Bar
            from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Bar(
                SpinnerColumn(),
                TextColumn("{task.completed:,} " + self.unit),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                refresh_per_second=4,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.unit, total=None, rate="")
            self._started = time.monotonic()
        return self

    def print(self, line: str) -> None:
        print(line, flush=True)

    def update(self, done: int) -> None:
        if self._progress is not None:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            rate = f"{done / elapsed:,.0f} {self.unit}/s"
            self._progress.update(self._task, completed=done, rate=rate)

    def __exit__(self, *_exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
