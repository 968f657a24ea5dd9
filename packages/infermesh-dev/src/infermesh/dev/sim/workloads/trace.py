"""JSONL trace files: replay recorded traffic through the routing simulator, or save a workload.

One JSON object per line, in arrival order. Reading validates every field and names the file,
line and field of the first bad one; nothing here opens sockets or looks at a clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from infermesh.dev.sim.route.strategy import SLO_TARGETS, SimRequest
from infermesh.dev.tokens import count_tokens

__all__ = ["TRACE_FIELDS", "TraceError", "parse_trace", "read_trace", "write_trace"]

TRACE_FIELDS = (
    "request_id",
    "arrival_s",
    "prompt_tokens",
    "prompt",
    "output_tokens",
    "prefix_group",
    "prefix_tokens",
    "prefix",
    "slo_class",
    "tenant",
    "session",
)
"""Known keys. `arrival_s` (seconds from the start), `output_tokens` and one of `prompt_tokens`
(a count) or `prompt` (text, counted with the emulators' tokenizer) are required. `prefix_tokens`
or `prefix` (text) says how much of the prompt is shared by every request of `prefix_group`."""


class TraceError(ValueError):
    """A trace line that cannot be replayed; the message names the file, line and field."""


def _field_error(where: str, field: str, expected: str, value: Any) -> TraceError:
    return TraceError(f"{where}: field {field!r}: expected {expected}, got {value!r}")


def _int_field(record: dict[str, Any], field: str, where: str, minimum: int) -> int:
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _field_error(where, field, f"an integer >= {minimum}", value)
    return value


def _str_field(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field, "")
    if not isinstance(value, str):
        raise _field_error(where, field, "a string", value)
    return value


def _token_count(
    record: dict[str, Any], count_field: str, text_field: str, where: str, *, required: bool
) -> int:
    if count_field in record:
        return _int_field(record, count_field, where, 0)
    if text_field in record:
        text = record[text_field]
        if not isinstance(text, str):
            raise _field_error(where, text_field, "a string", text)
        return count_tokens(text)
    if required:
        raise TraceError(f"{where}: missing field {count_field!r} (or {text_field!r} as text)")
    return 0


def _parse_record(record: Any, where: str, default_id: str) -> SimRequest:
    if not isinstance(record, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(TRACE_FIELDS))
    if unknown:
        raise TraceError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(TRACE_FIELDS)}")
    for required in ("arrival_s", "output_tokens"):
        if required not in record:
            raise TraceError(f"{where}: missing field {required!r}")
    arrival_s = record["arrival_s"]
    if (
        isinstance(arrival_s, bool)
        or not isinstance(arrival_s, int | float)
        or not math.isfinite(arrival_s)
        or arrival_s < 0
    ):
        raise _field_error(where, "arrival_s", "a finite number of seconds >= 0", arrival_s)
    prompt_tokens = _token_count(record, "prompt_tokens", "prompt", where, required=True)
    if prompt_tokens < 1:
        raise _field_error(where, "prompt_tokens", "at least 1 prompt token", prompt_tokens)
    prefix_tokens = _token_count(record, "prefix_tokens", "prefix", where, required=False)
    if prefix_tokens > prompt_tokens:
        raise _field_error(
            where, "prefix_tokens", f"at most the prompt's {prompt_tokens} tokens", prefix_tokens
        )
    prefix_group = _str_field(record, "prefix_group", where)
    if prefix_tokens and not prefix_group:
        raise TraceError(f"{where}: field 'prefix_group' is required when the prompt has a prefix")
    slo_class = record.get("slo_class", "standard")
    if slo_class not in SLO_TARGETS:
        raise _field_error(where, "slo_class", f"one of {', '.join(SLO_TARGETS)}", slo_class)
    request_id = _str_field(record, "request_id", where) or default_id
    return SimRequest(
        request_id=request_id,
        arrival_s=float(arrival_s),
        prompt_tokens=prompt_tokens,
        output_tokens=_int_field(record, "output_tokens", where, 1),
        prefix_group=prefix_group,
        prefix_tokens=prefix_tokens,
        slo_class=slo_class,
        tenant=_str_field(record, "tenant", where),
        session=_str_field(record, "session", where),
    )


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> Iterator[SimRequest]:
    """Requests of JSONL `lines` (blank lines skipped); raises TraceError at the first bad line.

    Arrival times must not decrease: a trace is replayed in order, as recorded.
    """
    last_arrival_s = 0.0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TraceError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        request = _parse_record(record, where, default_id=f"t{line_number}")
        if request.arrival_s < last_arrival_s:
            raise _field_error(
                where,
                "arrival_s",
                f"a time >= the previous line's {last_arrival_s}",
                record["arrival_s"],
            )
        last_arrival_s = request.arrival_s
        yield request


def read_trace(path: str | Path) -> list[SimRequest]:
    """Every request of the JSONL trace at `path`, validated before a simulation starts."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as lines:
            return list(parse_trace(lines, source=str(path)))
    except OSError as error:
        raise TraceError(f"{path}: cannot read the trace file ({error.strerror})") from None


def write_trace(path: str | Path, requests: Iterable[SimRequest]) -> int:
    """Write `requests` to `path` as JSONL that `read_trace` reads back unchanged; returns count."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as out:
        for request in requests:
            record: dict[str, Any] = {
                "request_id": request.request_id,
                "arrival_s": request.arrival_s,
                "prompt_tokens": request.prompt_tokens,
                "output_tokens": request.output_tokens,
                "slo_class": request.slo_class,
            }
            for field in ("prefix_group", "tenant", "session"):
                if value := getattr(request, field):
                    record[field] = value
            if request.prefix_tokens:
                record["prefix_tokens"] = request.prefix_tokens
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            count += 1
    return count
