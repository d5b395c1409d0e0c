"""The published OpenAPI schema against the running server, by schemathesis: every check, on
every operation, positive and negative data, with and without an API key.

A bounded, reproducible run of `st run` (in-process, as a user would run it): deterministic
generation from a fixed seed, a few dozen cases per operation (the coverage phase's own plus
`EXAMPLES_PER_OPERATION` fuzzed ones), against the real app under uvicorn configured as `serve`
does (real HTTP on 127.0.0.1). On failure, schemathesis' report is the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Imported here, before the run's two worker threads: hypothesis imports it lazily on first use
# (`st.randoms()`), and two threads importing it at once can see it half-initialised
# ("cannot import name 'RandomStrategy'"), which failed a run here once.
import hypothesis.strategies._internal.random  # noqa: F401
import pytest
import schemathesis.cli
from click.testing import CliRunner

from runtime.api_support import settings_for
from runtime.fakes import ControlledEngine
from runtime.live_server import live_server

API_KEY = "schemathesis-key"
EXAMPLES_PER_OPERATION = 20
# With an API key the schema and the handlers are the same: fewer examples check that the key is
# required and honoured on every operation (CI's time, not coverage, is what this trades).
EXAMPLES_WITH_API_KEY = 8
SEED = 20261201

# 413 is how the server refuses too many characters, and 422 (TEI's status) more texts than
# --max-client-batch-size (the schema's maxItems): rejections like 400. 504 (and 503 `Overloaded`, refused
# early) answer a deadline the client set in X-Request-Timeout and the schema documents: a tiny
# one (5e-324 s) is valid input that cannot be met, not a server error.
# No crash cache: each run starts from the seed alone (a cache would replay earlier failures and
# write into the working tree).
CONFIG_TOML = """
[cache]
enabled = false

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "406", "413", "415", "422", "503", "504"]

[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503", "504"]

# vLLM's Score API pairs its two lists 1:N or N:N: two lists of other lengths (2 and 3) are
# valid JSON Schema that the server refuses with 422 naming both fields, as vLLM refuses them.
[[operations]]
include-path-regex = "^/(v1/)?score$"
[operations.checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
# /vertex: the per-request limits hold for all its instances together (texts: 422, characters:
# 413), which JSON Schema cannot say (each instance's own maxItems it does).
[[operations]]
include-path-regex = "^/vertex$"
[operations.checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "422", "429", "5xx"]
"""


@pytest.mark.parametrize("api_key", [None, API_KEY], ids=["open", "api-key"])
def test_server_conforms_to_its_published_schema(
    api_key: str | None, xlmr_reranker: Path, xlmr_engine: Any, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG_TOML)
    settings = settings_for(xlmr_reranker, api_key=api_key)
    with live_server(settings, ControlledEngine(xlmr_engine)) as url:
        args = [
            "--config-file",
            str(config),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(EXAMPLES_WITH_API_KEY if api_key else EXAMPLES_PER_OPERATION),
            "--seed",
            str(SEED),
            "--generation-deterministic",
            "--workers",
            "2",
            "--no-color",
            "--output-sanitize",
            "false",
            "--report-dir",
            str(tmp_path / "reports"),
        ]
        if api_key:
            args += ["--header", f"Authorization: Bearer {api_key}"]
        result = CliRunner().invoke(schemathesis.cli.schemathesis, args)
    assert result.exit_code == 0, result.output
    assert "No issues found" in result.output, result.output
