"""Logging setup: one JSON object per line by default (what log pipelines in a cluster parse),
plain text on request (`--log-format text`, for a terminal).

Structured fields travel as `extra=log_fields(key=value, ...)`; both formats print them. The access log
(`reranker_runtime.access`) writes one line per HTTP request with route, status, duration, pairs
and tokens; uvicorn's own access log is turned off so each request is logged once. A warning that
huggingface_hub or transformers repeats (the hub's retry loop) is printed once
(`LibraryRepeatFilter`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from contextlib import suppress
from typing import Any

from opentelemetry import trace as otel_trace

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

ACCESS_LOGGER = "reranker_runtime.access"

# Attributes every LogRecord has; anything else passed through `extra=` is a structured field.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


def log_fields(**fields: Any) -> dict[str, Any]:
    """The `extra=` of a log call with structured fields: `log.info("ready", extra=log_fields(
    warmup_s=1.2))`. The one way the runtime writes them; the formatters print them as JSON keys
    or `key=value` pairs."""
    return {"fields": fields}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    # `log_fields(...)` first; flat `extra=` keys (third-party libraries, the engines) too.
    fields: dict[str, Any] = {}
    explicit = record.__dict__.get("fields")
    if isinstance(explicit, dict):
        fields.update(explicit)
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key != "fields" and not key.startswith("_"):
            fields[key] = value
    return fields


def trace_ids() -> dict[str, str]:
    """`trace_id` and `span_id` (hex) of the sampled OpenTelemetry span the caller runs in
    (tracing.py), or nothing outside one."""
    context = otel_trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return {}  # an unsampled span is never exported: no trace to link to
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
    }


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...fields}`; exceptions as one `exc_info` string.
    A line written inside a traced request carries its `trace_id` and `span_id`, unless
    `with_trace_ids` is off (`--disable-spans`, as TEI's flag drops spans from its JSON lines)."""

    def __init__(self, with_trace_ids: bool = True) -> None:
        super().__init__()
        self.with_trace_ids = with_trace_ids

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.with_trace_ids:
            out.update(trace_ids())
        out.update(_fields(record))
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


# Line breaks and other control characters in a text log line, escaped: a client's path or
# header with `%0a` in it must not forge a log line of its own. (JSON escapes them anyway.)
_ESCAPED = {
    **{c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, 0x85] if c != 0x09},
    0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029",
}  # fmt: skip


def one_line(text: str) -> str:
    """`text` with line breaks and control characters escaped (tabs kept)."""
    return text.translate(_ESCAPED)


class TextFormatter(logging.Formatter):
    """`2024-01-01 12:00:00 INFO logger: message key=value ...`: one line per record (a
    traceback follows on its own lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_field_text(v)}" for k, v in fields.items())
        return line


def _field_text(value: object) -> str:
    """A field's value as `key=value` shows it: quoted (JSON) when it holds a space, `=` or a
    quote, so a client's `/x status=200` cannot pass for a field of its own."""
    text = str(value)
    if text and not any(c.isspace() or c in '="' for c in text):
        return one_line(text)
    return one_line(json.dumps(text, ensure_ascii=False))


class LibraryRepeatFilter(logging.Filter):
    """Each library warning once: huggingface_hub logs the same `'<error>' thrown while
    requesting HEAD <url>` before every retry (six times in 25 s), each followed by `Retrying in
    Ns [Retry k/5]`; OpenTelemetry's exporter logs `Queue full, dropping span.` for every span
    while its collector is down, and a retry line whose delay changes each time. A warning from
    huggingface_hub, transformers or opentelemetry (numbers aside, for opentelemetry) identical
    to one printed in the last `window_s` seconds is dropped, and so is the retry line right after a dropped one;
    a different error (a timeout after a 503, say) comes through. `dropped` counts what was left
    out. Our own loggers are never filtered."""

    _LIBRARIES = ("huggingface_hub", "transformers", "opentelemetry")
    _RETRY_LINE = re.compile(r"(Retrying in |Rate limited\. Waiting )")
    _NUMBER = re.compile(r"\d+(\.\d+)?")
    _MAX_REMEMBERED = 256

    def __init__(self, window_s: float = 600.0) -> None:
        super().__init__()
        self.window_s = window_s
        self.dropped = 0
        self._last_seen: dict[tuple[str, int, str], float] = {}
        self._dropped_last: dict[int | None, bool] = {}  # per thread: was its last one dropped
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(self._LIBRARIES):
            return True
        message = record.getMessage()
        with self._lock:
            if self._RETRY_LINE.match(message):
                keep = not self._dropped_last.get(record.thread, False)
            else:
                if record.name.startswith("opentelemetry"):
                    # Its retry lines differ only in their numbers ("retrying in 1.80s").
                    message = self._NUMBER.sub("#", message)
                key = (record.name, record.levelno, message)
                last = self._last_seen.get(key)
                keep = last is None or record.created - last > self.window_s
                if len(self._last_seen) >= self._MAX_REMEMBERED and key not in self._last_seen:
                    self._last_seen.clear()
                if len(self._dropped_last) >= self._MAX_REMEMBERED:
                    self._dropped_last.clear()
                if keep:  # a warning that keeps coming is printed again every window_s
                    self._last_seen[key] = record.created
                self._dropped_last[record.thread] = not keep
            if not keep:
                self.dropped += 1
        return keep


def setup_logging(
    log_format: str = "json", level: str = "info", *, trace_ids_in_json: bool = True
) -> None:
    """Route the root logger (and uvicorn's loggers) to stderr in the chosen format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(with_trace_ids=trace_ids_in_json) if log_format == "json" else TextFormatter()
    )
    handler.addFilter(LibraryRepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn installs its own handlers; make its records flow through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    if log_format == "json":
        # Download/loading progress bars would interleave raw text with the JSON lines.
        # huggingface_hub reads this at import, which _route_library_loggers does next, and
        # transformers asks huggingface_hub when it is imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _route_library_loggers()
    # Third-party chatter at info level is noise in a server log.
    for name in ("httpx", "httpcore", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def _route_library_loggers() -> None:
    """huggingface_hub and transformers give their loggers a stderr handler of their own (and
    transformers turns propagation off), so a hub retry warning came out twice, once as plain
    text, and transformers' lines never came out as JSON. Configure both libraries now (they
    would do it lazily at first use, after us) and send their records through our handler."""
    with suppress(ImportError):
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.get_logger()
    with suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        transformers_logging.get_logger()
    for name in ("huggingface_hub", "transformers"):
        library_logger = logging.getLogger(name)
        library_logger.handlers.clear()
        library_logger.propagate = True
