"""`reranker-runtime serve` configuration: flags, RERANKER_* variables, --help, logging."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import pytest

from reranker_runtime import cli
from reranker_runtime.config import DEFAULT_MODEL, SERVE_ENV_VARS, ServeSettings
from reranker_runtime.logging import TextFormatter, setup_logging
from reranker_runtime.server import (
    SettingsError,
    add_serve_parser,
    parse_bool,
    settings_from_args,
)


def _serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reranker-runtime")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_defaults_match_serve_settings() -> None:
    settings = settings_from_args(_serve_args([]), environ={})
    assert settings == ServeSettings(model=DEFAULT_MODEL)
    assert settings.port == 8080
    assert settings.max_batch_tokens == "auto"
    assert settings.torch_threads == "auto"
    assert settings.cpu_workers == "auto"
    assert settings.max_client_batch_size == 1000
    assert settings.max_concurrent_requests == 512
    assert settings.auto_truncate is True  # TEI's default
    assert settings.log_format == "json"


def test_engine_dir_alone_leaves_model_unset() -> None:
    settings = settings_from_args(_serve_args(["--engine-dir", "/engines/abc"]), environ={})
    assert settings.engine_dir == "/engines/abc"
    assert settings.model is None


ENV = {
    "RERANKER_MODEL": "/models/m",
    "RERANKER_REVISION": "v1",
    "RERANKER_ENGINE_DIR": "/engines/k",
    "RERANKER_SERVED_MODEL_NAME": "bge",
    "RERANKER_DEVICE": "cuda:1",
    "RERANKER_DTYPE": "bfloat16",
    "RERANKER_HOST": "127.0.0.1",
    "RERANKER_PORT": "9000",
    "RERANKER_MAX_BATCH_TOKENS": "4096",
    "RERANKER_MAX_BATCH_REQUESTS": "32",
    "RERANKER_MAX_CLIENT_BATCH_SIZE": "64",
    "RERANKER_MAX_CONCURRENT_REQUESTS": "7",
    "RERANKER_AUTO_TRUNCATE": "yes",
    "RERANKER_MAX_REQUEST_CHARACTERS": "100000",
    "RERANKER_REQUEST_READ_TIMEOUT": "2.5",
    "RERANKER_MAX_CONNECTIONS": "300",
    "RERANKER_MAX_CHUNKS_PER_DOC": "4",
    "RERANKER_CHUNK_OVERLAP_TOKENS": "16",
    "RERANKER_MAX_CHUNKS_PER_REQUEST": "100",
    "RERANKER_REQUEST_TIMEOUT": "2.5",
    "RERANKER_API_KEY": "sekret",
    "RERANKER_LOG_FORMAT": "text",
    "RERANKER_LOG_LEVEL": "DEBUG",
    "RERANKER_PAYLOAD_LIMIT": "5000000",
    "RERANKER_PROMETHEUS_PORT": "9100",
    "RERANKER_CORS_ALLOW_ORIGIN": "https://a.example, https://b.example",
    "RERANKER_HF_CACHE": "/cache/hub",
    "RERANKER_HF_TOKEN": "hf_secret",
    "RERANKER_TOKENIZATION_WORKERS": "3",
    "RERANKER_GRPC_PORT": "50051",
    "RERANKER_OTLP_ENDPOINT": "http://collector:4317",
    "RERANKER_OTLP_SERVICE_NAME": "ranker",
    "RERANKER_DISABLE_SPANS": "yes",
    "RERANKER_ENGINE": "packed",
    "RERANKER_TORCH_COMPILE": "true",
    "RERANKER_CUDA_GRAPHS": "1",
    "RERANKER_TORCH_THREADS": "3",
    "RERANKER_CPU_WORKERS": "4",
    "RERANKER_CPU_KERNELS": "aten",
    "RERANKER_MALLOC_TRIM_INTERVAL": "0",
}


def test_every_setting_comes_from_its_env_var() -> None:
    assert set(ENV) == set(SERVE_ENV_VARS.values()), "test must cover every variable"
    settings = settings_from_args(_serve_args([]), environ=ENV)
    assert settings == ServeSettings(
        model="/models/m",
        revision="v1",
        engine_dir="/engines/k",
        served_model_name="bge",
        device="cuda:1",
        dtype="bfloat16",
        host="127.0.0.1",
        port=9000,
        max_batch_tokens=4096,
        max_batch_requests=32,
        max_client_batch_size=64,
        max_concurrent_requests=7,
        auto_truncate=True,
        max_request_characters=100000,
        request_read_timeout=2.5,
        max_connections=300,
        max_chunks_per_doc=4,
        chunk_overlap_tokens=16,
        max_chunks_per_request=100,
        request_timeout=2.5,
        api_key="sekret",
        log_format="text",
        log_level="debug",
        payload_limit=5_000_000,
        prometheus_port=9100,
        cors_allow_origin=("https://a.example", "https://b.example"),
        hf_cache="/cache/hub",
        hf_token="hf_secret",
        tokenization_workers=3,
        grpc_port=50051,
        otlp_endpoint="http://collector:4317",
        otlp_service_name="ranker",
        disable_spans=True,
        engine="packed",
        torch_compile=True,
        cuda_graphs=True,
        torch_threads=3,
        cpu_workers=4,
        cpu_kernels="aten",
        malloc_trim_interval=0.0,
    )


def test_flags_win_over_env_vars() -> None:
    args = _serve_args(
        [
            "--model",
            "flag-model",
            "--port",
            "1234",
            "--no-auto-truncate",
            "--max-batch-tokens",
            "512",
        ]
    )
    settings = settings_from_args(args, environ=ENV)
    assert settings.model == "flag-model"
    assert settings.port == 1234
    assert settings.auto_truncate is False  # env says yes, the flag says no
    assert settings.max_batch_tokens == 512
    assert settings.api_key == "sekret"  # untouched by flags: from env


def test_every_env_var_has_a_flag_and_help_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for field, var in SERVE_ENV_VARS.items():
        assert f"env: {var}" in help_text, var
        assert "--" + field.replace("_", "-") in help_text, field
    assert "(default: 8080; env: RERANKER_PORT or TEI's PORT)" in help_text
    assert "(default: auto; env: RERANKER_MAX_BATCH_TOKENS or TEI's MAX_BATCH_TOKENS)" in help_text
    # argparse may wrap inside "bge-reranker-large": compare without whitespace.
    assert (
        f"(default:{DEFAULT_MODEL}unless--engine-dirisset;env:RERANKER_MODELorTEI'sMODEL_ID)"
        in help_text.replace(" ", "")
    )


def test_a_tei_command_line_works_as_it_is() -> None:
    """TEI's flag spellings (router/src/main.rs), as a TEI pod spec or docker run passes them."""
    args = _serve_args(
        [
            "--model-id",
            "/data/bge",
            "--hostname",
            "127.0.0.1",
            "-p",
            "3000",
            "--auto-truncate",
            "false",
            "--json-output",
            "--max-client-batch-size",
            "64",
            "--otlp-endpoint",
            "http://jaeger:4317",
            "--otlp-service-name",
            "text-embeddings-inference.server",
            "--disable-spans",
        ]
    )
    settings = settings_from_args(args, environ={"RERANKER_LOG_FORMAT": "text"})
    assert (settings.model, settings.host, settings.port) == ("/data/bge", "127.0.0.1", 3000)
    assert settings.auto_truncate is False
    assert settings.log_format == "json"  # the flag beats the variable
    assert settings.max_client_batch_size == 64
    assert settings.otlp_endpoint == "http://jaeger:4317"
    assert settings.otlp_service_name == "text-embeddings-inference.server"
    assert settings.disable_spans is True


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        ([], None),
        (["--auto-truncate"], True),
        (["--auto-truncate", "true"], True),
        (["--auto-truncate=false"], False),
        (["--no-auto-truncate"], False),
    ],
)
def test_boolean_flags_take_an_optional_value(argv: list[str], value: bool | None) -> None:
    assert _serve_args(argv).auto_truncate is value


def test_bad_boolean_flag_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--cuda-graphs", "maybe"])
    assert exit_info.value.code == 2
    assert "--cuda-graphs" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_a_bad_malloc_trim_interval_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--malloc-trim-interval", value])
    assert exit_info.value.code == 2
    assert "--malloc-trim-interval" in capsys.readouterr().err


def test_an_otlp_endpoint_without_its_scheme_is_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--otlp-endpoint", "collector:4317"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--otlp-endpoint" in err and "http://otel-collector:4317" in err
    with pytest.raises(SettingsError, match=r"OTLP_ENDPOINT='collector:4317' is invalid.*http://"):
        settings_from_args(_serve_args([]), environ={"OTLP_ENDPOINT": "collector:4317"})


TEI_ENV = {
    "MODEL_ID": "/data/bge",
    "REVISION": "refs/pr/5",
    "SERVED_MODEL_NAME": "bge",
    "DTYPE": "float16",
    "PORT": "80",
    "MAX_BATCH_TOKENS": "8192",
    "MAX_BATCH_REQUESTS": "16",
    "MAX_CLIENT_BATCH_SIZE": "32",
    "MAX_CONCURRENT_REQUESTS": "100",
    "AUTO_TRUNCATE": "false",
    "API_KEY": "tei-key",
    "JSON_OUTPUT": "false",
    "OTLP_ENDPOINT": "https://collector.example:4317",
    "OTLP_SERVICE_NAME": "tei",
    "DISABLE_SPANS": "true",
    "HOSTNAME": "my-pod-7f9c",  # set by every shell and pod: never an address to listen on
}


def test_a_tei_environment_works_as_it_is() -> None:
    settings = settings_from_args(_serve_args([]), environ=TEI_ENV)
    assert settings == ServeSettings(
        model="/data/bge",
        revision="refs/pr/5",
        served_model_name="bge",
        dtype="float16",
        port=80,
        max_batch_tokens=8192,
        max_batch_requests=16,
        max_client_batch_size=32,
        max_concurrent_requests=100,
        auto_truncate=False,
        api_key="tei-key",
        log_format="text",
        otlp_endpoint="https://collector.example:4317",
        otlp_service_name="tei",
        disable_spans=True,
    )
    assert settings.host == "0.0.0.0"


def test_reranker_variables_win_over_tei_ones() -> None:
    env = {**TEI_ENV, "RERANKER_PORT": "8080", "RERANKER_LOG_FORMAT": "json"}
    settings = settings_from_args(_serve_args([]), environ=env)
    assert (settings.port, settings.log_format) == (8080, "json")


@pytest.mark.parametrize(
    ("env", "cache", "token"),
    [
        ({"HUGGINGFACE_HUB_CACHE": "/tei", "HF_API_TOKEN": "t1"}, "/tei", "t1"),
        # huggingface_hub reads these first: TEI's older names must not override them.
        ({"HUGGINGFACE_HUB_CACHE": "/tei", "HF_HUB_CACHE": "/hf"}, None, None),
        ({"HF_API_TOKEN": "t1", "HF_TOKEN": "t2"}, None, None),
    ],
)
def test_tei_hub_variables_yield_to_huggingface_hubs_own(
    env: dict[str, str], cache: str | None, token: str | None
) -> None:
    settings = settings_from_args(_serve_args([]), environ=env)
    assert (settings.hf_cache, settings.hf_token) == (cache, token)


def test_hf_token_flag_sets_hf_token_for_huggingface_hub() -> None:
    from reranker_runtime.server import use_hub_settings

    settings = settings_from_args(_serve_args(["--hf-token", "hf_abc"]), environ={})
    env: dict[str, str] = {}
    use_hub_settings(settings, env)
    assert env == {"HF_TOKEN": "hf_abc"}


def test_the_tei_variables_read_are_logged_by_name_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PORT or API_KEY may have been set for something else: the start-up log names them."""
    from reranker_runtime import server

    seen: list[object] = []
    monkeypatch.setattr(server, "serve", lambda settings: seen.append(settings) or 0)
    monkeypatch.setattr("reranker_runtime.logging.setup_logging", lambda *a, **k: None)
    for name, value in {"PORT": "3000", "API_KEY": "s3cret", "JSON_OUTPUT": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RERANKER_PORT", raising=False)
    monkeypatch.delenv("RERANKER_API_KEY", raising=False)
    monkeypatch.delenv("RERANKER_LOG_FORMAT", raising=False)
    with caplog.at_level(logging.INFO, logger="reranker_runtime.server"):
        assert cli.main(["serve", "--model", "org/name"]) == 0
    (record,) = [
        r for r in caplog.records if r.getMessage() == "settings read from TEI's variables"
    ]
    assert record.fields == {"variables": ["PORT", "API_KEY", "JSON_OUTPUT"]}  # type: ignore[attr-defined]
    assert "s3cret" not in caplog.text
    assert seen and seen[0].port == 3000  # type: ignore[attr-defined]


def test_bad_tei_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JSON_OUTPUT", "sometimes")
    assert cli.main(["serve"]) == 2
    assert "JSON_OUTPUT='sometimes'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("No", False),
    ],
)
def test_boolean_values(text: str, value: bool) -> None:
    assert parse_bool(text) is value
    settings = settings_from_args(_serve_args([]), environ={"RERANKER_AUTO_TRUNCATE": text})
    assert settings.auto_truncate is value


def test_empty_env_values_count_as_unset() -> None:
    settings = settings_from_args(_serve_args([]), environ={"RERANKER_PORT": " "})
    assert settings.port == 8080


@pytest.mark.parametrize(
    "environ",
    [{"RERANKER_API_KEY": ""}, {"RERANKER_API_KEY": " \n"}, {"API_KEY": ""},
     {"RERANKER_API_KEY": "", "API_KEY": "fallback"}],
)  # fmt: skip
def test_an_empty_api_key_is_refused_not_taken_as_no_key(environ: dict[str, str]) -> None:
    """A Secret key that holds nothing (`--from-literal=api-key=$UNSET_VARIABLE`) would turn
    authentication off without a word: refused at start, naming the variable."""
    with pytest.raises(SettingsError, match="is set but empty: an empty API key would leave"):
        settings_from_args(_serve_args([]), environ=environ)


def test_an_empty_api_key_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _serve_args(["--api-key", "  "])
    assert "argument --api-key: invalid value" in capsys.readouterr().err


def test_the_api_key_loses_surrounding_whitespace() -> None:
    """A Secret made from a file ends in a newline that no client sends."""
    from_file = settings_from_args(_serve_args([]), environ={"RERANKER_API_KEY": "sekret\n"})
    assert from_file.api_key == "sekret"
    assert settings_from_args(_serve_args(["--api-key", " k "]), environ={}).api_key == "k"


@pytest.mark.parametrize(
    ("var", "value", "reason"),
    [
        ("RERANKER_PORT", "http", "expected an integer"),
        ("RERANKER_PORT", "70000", "between 1 and 65535"),
        ("RERANKER_MAX_BATCH_TOKENS", "0", ">= 1"),
        ("RERANKER_AUTO_TRUNCATE", "maybe", "true/false/1/0/yes/no"),
        ("RERANKER_DEVICE", "tpu", "auto, cpu, cuda or cuda:N"),
        ("RERANKER_DTYPE", "int8", "float32"),
        ("RERANKER_LOG_FORMAT", "xml", "json, text"),
    ],
)
def test_bad_env_value_is_a_clear_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    var: str,
    value: str,
    reason: str,
) -> None:
    monkeypatch.setenv(var, value)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert var in err and repr(value) in err and reason in err
    assert "Traceback" not in err


def test_bad_flag_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--port", "eighty"])
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_a_flag_is_matched_by_its_whole_name_only(capsys: pytest.CaptureFixture[str]) -> None:
    # A prefix that matches one flag today would match two, or another, once a flag is added.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", "m", "--max-batch-tok", "512"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --max-batch-tok" in capsys.readouterr().err


def test_missing_engine_dir_exits_non_zero_with_a_message(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--engine-dir", "/nonexistent/engine", "--log-level", "error"]) == 1
    err = capsys.readouterr().err
    assert "/nonexistent/engine" in err and "Traceback" not in err


def test_missing_local_model_path_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--model", "/nonexistent/model-dir"]) == 1
    err = capsys.readouterr().err
    assert "/nonexistent/model-dir" in err and "does not exist" in err and "Traceback" not in err


def _capture_root_log(fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        setup_logging(fmt, "info")
        logging.getLogger("reranker_runtime.access").info(
            "POST /rerank 200", extra={"fields": {"route": "/rerank", "status": 200, "pairs": 3}}
        )
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_json_log_lines_carry_fields(capsys: pytest.CaptureFixture[str]) -> None:
    record = json.loads(_capture_root_log("json", capsys))
    assert record["message"] == "POST /rerank 200"
    assert record["level"] == "info"
    assert record["logger"] == "reranker_runtime.access"
    assert (record["route"], record["status"], record["pairs"]) == ("/rerank", 200, 3)


def test_text_log_lines_carry_fields(capsys: pytest.CaptureFixture[str]) -> None:
    line = _capture_root_log("text", capsys)
    assert "POST /rerank 200" in line and "route=/rerank" in line and "pairs=3" in line


def test_text_log_lines_cannot_be_forged_by_what_a_client_sends() -> None:
    """A path or header with `%0a` in it (uvicorn hands the decoded path over) must not start
    a log line of its own: control characters in the message and fields are escaped; a
    traceback still follows on its own lines."""
    forged = "GET /x\n2026-01-01 00:00:00 INFO reranker_runtime.access: GET /admin 200"
    record = logging.LogRecord(
        "reranker_runtime.access", logging.INFO, __file__, 1, forged, (), None
    )
    record.fields = {  # type: ignore[attr-defined]
        "route": "/x\r\nInjected: yes",
        "ua": "a\x1b[31mred\u2028b",
        "path": "/x status=200",
        "status": 404,
    }
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "GET /x\\n2026-01-01" in line and 'route="/x\\r\\nInjected: yes"' in line
    assert 'ua="a\\u001b[31mred\\u2028b"' in line
    # A value with a space or `=` is quoted: it cannot pass for a field of its own.
    assert 'path="/x status=200" status=404' in line
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "\nTraceback" in TextFormatter().format(failed)
