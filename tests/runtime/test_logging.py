"""The server's log: one line per record, in the chosen format, whoever logs it."""

from __future__ import annotations

import json
import logging

import pytest

from reranker_runtime.logging import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("name", ["huggingface_hub.utils._http", "transformers.modeling_utils"])
def test_library_warnings_are_printed_once_as_json(
    name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # A hub retry warning used to come out twice: plain text from the library's own handler, then
    # JSON from ours (transformers' lines came out only as plain text).
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    hub_logging.get_logger()
    transformers_logging.get_logger()  # the libraries' own handlers exist before setup
    setup_logging("json", "info")
    logging.getLogger(name).warning("Retrying in 1s [Retry 1/5].")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["logger"] == name
    assert record["level"] == "warning"
    assert record["message"] == "Retrying in 1s [Retry 1/5]."


def test_repeated_hub_retry_warnings_are_printed_once(capfd: pytest.CaptureFixture[str]) -> None:
    # huggingface_hub's backoff logs the same error before each of its five retries.
    setup_logging("text", "info")
    hub = logging.getLogger("huggingface_hub.utils._http")
    thrown = "'[Errno -2] Name or service not known' thrown while requesting HEAD https://hub/x"
    for i, wait in enumerate([1, 2, 4, 8, 8], start=1):
        hub.warning(thrown)
        hub.warning(f"Retrying in {wait}s [Retry {i}/5].")
    hub.warning(thrown)
    hub.warning("HTTP Error 503 thrown while requesting HEAD https://hub/x")  # a new error
    ours = logging.getLogger("reranker_runtime.test")
    ours.warning("same")
    ours.warning("same")  # our own lines are never folded
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    messages = [line.split(": ", 1)[1] for line in lines]
    assert messages == [
        thrown,
        "Retrying in 1s [Retry 1/5].",
        "HTTP Error 503 thrown while requesting HEAD https://hub/x",
        "same",
        "same",
    ], lines
