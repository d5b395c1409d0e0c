"""`reranker-runtime serve`: flags and RERANKER_* variables -> ServeSettings -> uvicorn.

Precedence: command-line flag, then environment variable (config.SERVE_ENV_VARS), then the
default. Empty variables count as unset (a pod spec may render `value: ""`).

Shutdown: the first SIGTERM/SIGINT starts a drain: /health turns 503, new inference requests get
503, in-flight requests finish, the batcher stops, then uvicorn closes the connections and the
process exits 0. A second signal answers every request still in flight with 503 and stops in
order; a third exits at once (exit code 1).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from reranker_runtime.allocator import freeze_heap, start_memory_management
from reranker_runtime.batch_budget import parse_max_batch_tokens
from reranker_runtime.config import (
    CPU_KERNEL_CHOICES,
    DEFAULT_MODEL,
    ENGINE_CHOICES,
    SERVE_ENV_VARS,
    TEI_ENV_SHADOWED_BY,
    TEI_ENV_VARS,
    TEI_JSON_OUTPUT_ENV,
    ServeSettings,
)
from reranker_runtime.cpu_threads import (
    configure_cpu_threads,
    log_thread_plan,
    parse_cpu_workers,
    parse_torch_threads,
)
from reranker_runtime.hub import looks_like_path
from reranker_runtime.logging import LOG_FORMATS, LOG_LEVELS, log_fields
from reranker_runtime.tracing import check_endpoint

if TYPE_CHECKING:
    from reranker_runtime.lifecycle import Lifecycle

log = logging.getLogger(__name__)

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class SettingsError(ValueError):
    """A flag or environment variable with a value the server cannot use."""


# -- value parsers (shared by flags and variables; raise ValueError with the reason) ----------


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of true/false/1/0/yes/no")


def _int_parser(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def _choice_parser(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a finite number > 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number >= 0")
    return value


def _device(text: str) -> str:
    value = text.strip().lower()
    if not DEVICE_RE.match(value):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return value


def _text(text: str) -> str:
    return text


def _api_key(text: str) -> str:
    """The key without surrounding whitespace (a Secret made from a file ends in a newline,
    which no client sends); an empty one is refused, since it would turn authentication off."""
    key = text.strip()
    if not key:
        raise ValueError(
            "an empty API key would leave the server open; set a key, or unset it to serve "
            "without authentication"
        )
    return key


def _origins(text: str) -> tuple[str, ...]:
    """CORS origins, comma-separated (`*`: any origin)."""
    origins = tuple(part.strip() for part in text.split(",") if part.strip())
    if not origins:
        raise ValueError("expected one or more origins, comma-separated, or *")
    return origins


@dataclass(frozen=True)
class _Option:
    field: str
    flags: tuple[str, ...]
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    boolean: bool = False
    default_text: str | None = None  # how --help shows the default when not the plain value
    many: bool = False  # the flag may be repeated; the values add up (a tuple)


_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "model",
        ("--model", "-m", "--model-id"),
        _text,
        "Hugging Face repo id or local checkpoint directory of a *ForSequenceClassification model",
        "DIR_OR_HF_ID",
        default_text=f"{DEFAULT_MODEL} unless --engine-dir is set",
    ),
    _Option(
        "revision",
        ("--revision",),
        _text,
        "Git revision (branch, tag, sha) of --model on the hub",
        "REV",
    ),
    _Option(
        "engine_dir",
        ("--engine-dir",),
        _text,
        "Directory prepared by `reranker-runtime build` (manifest.json + checkpoint/ [+ engine/]); "
        "takes precedence over --model",
        "DIR",
    ),
    _Option(
        "served_model_name",
        ("--served-model-name",),
        _text,
        "Model name reported by /info and the Jina route",
        "NAME",
        default_text="the --model value",
    ),
    _Option(
        "device", ("--device",), _device, "auto (CUDA when present), cpu, cuda or cuda:N", "DEVICE"
    ),
    _Option(
        "dtype",
        ("--dtype",),
        _choice_parser(DTYPES),
        "auto (float16/bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16",
        "DTYPE",
    ),
    _Option("host", ("--host", "--hostname"), _text, "Address to listen on", "HOST"),
    _Option("port", ("--port", "-p"), _int_parser(1, 65535), "Port to listen on", "PORT"),
    _Option(
        "max_batch_tokens",
        ("--max-batch-tokens",),
        parse_max_batch_tokens,
        "Token budget of one forward pass (padded engines count longest x sequences); must be at "
        "least the model's max input length. auto: 2048 in flight on CPU, shared among "
        "--cpu-workers (1024 per pass with 2), 16384 (TEI's default) on GPU, "
        "raised to the model's max input length and capped by the engine's own limit; /info "
        "reports the number (docs/runtime-batching.md)",
        "N|auto",
    ),
    _Option(
        "max_batch_requests",
        ("--max-batch-requests",),
        _int_parser(1),
        "Most sequences in one forward pass",
        "N",
        default_text="no limit beyond the token budget",
    ),
    _Option(
        "max_client_batch_size",
        ("--max-client-batch-size",),
        _int_parser(1),
        "Most texts/inputs in one request; more -> 422 (TEI's status)",
        "N",
    ),
    _Option(
        "max_concurrent_requests",
        ("--max-concurrent-requests",),
        _int_parser(1),
        "Requests in flight before new ones get 429 at once (a request counts once however many "
        "texts it has)",
        "N",
    ),
    _Option(
        "auto_truncate",
        ("--auto-truncate",),
        parse_bool,
        "Truncate over-long inputs of a request that does not send `truncate` (as TEI; a "
        "request's own truncate wins); false: such inputs get 422",
        boolean=True,
    ),
    _Option(
        "max_request_characters",
        ("--max-request-characters",),
        _int_parser(1),
        "Most characters in one request's texts (query, texts, documents, inputs together); more "
        "-> 413. Long texts cost no more than the model's window to score, whatever their length",
        "N",
    ),
    _Option(
        "request_read_timeout",
        ("--request-read-timeout",),
        _positive_float,
        "Seconds a client has to send a request's headers and body, counted from its first byte "
        "(from the connection's opening for the first request); a slower request gets 408 and "
        "its connection is closed",
        "SECONDS",
    ),
    _Option(
        "max_connections",
        ("--max-connections",),
        _int_parser(1),
        "Most open HTTP connections; a connection beyond it gets 503 and is closed at once. Keep "
        "it above --max-concurrent-requests and below the process's file-descriptor limit",
        "N",
    ),
    _Option(
        "max_chunks_per_doc",
        ("--max-chunks-per-doc",),
        _int_parser(1),
        "Windows a text longer than the model's limit is split into and scored by (its score is "
        "the best window's) when the request does not send max_chunks_per_doc; 1 = no chunking",
        "N",
    ),
    _Option(
        "chunk_overlap_tokens",
        ("--chunk-overlap-tokens",),
        _int_parser(0),
        "Text tokens shared by consecutive windows of a chunked text (at most half a window)",
        "N",
    ),
    _Option(
        "max_chunks_per_request",
        ("--max-chunks-per-request",),
        _int_parser(1),
        "Most windows one chunking request may score; more -> 413",
        "N",
    ),
    _Option(
        "request_timeout",
        ("--request-timeout",),
        _positive_float,
        "Default deadline of an inference request in seconds (the X-Request-Timeout header "
        "replaces it); past it the request's waiting pairs are dropped and it gets 504",
        "SECONDS",
        default_text="none (no deadline)",
    ),
    _Option(
        "api_key",
        ("--api-key",),
        _api_key,
        "Require 'Authorization: Bearer <key>' or 'Authorization: Api-Key <key>' on the inference "
        "routes, /info, /v1/models and /models (/health, GET /, /ping, /live, /metrics, /docs, "
        "/redoc stay open)",
        "KEY",
    ),
    _Option(
        "torch_threads",
        ("--torch-threads",),
        parse_torch_threads,
        "CPU threads of one forward pass. auto: OMP_NUM_THREADS when set, else the CPUs this "
        "process may use (affinity mask and cgroup CPU limit, rounded down) divided by "
        "--cpu-workers; /info reports the number (docs/runtime-batching.md)",
        "N|auto",
    ),
    _Option(
        "cpu_workers",
        ("--cpu-workers",),
        parse_cpu_workers,
        "Forward passes run at once on CPU, each on --torch-threads threads (more passes, fewer "
        "threads each: no barriers between threads, better throughput, each batch slower). "
        "auto: 2 when 2 or more CPUs are usable, else 1; /info reports the number "
        "(docs/runtime-batching.md)",
        "N|auto",
    ),
    _Option(
        "malloc_trim_interval",
        ("--malloc-trim-interval",),
        _non_negative_float,
        "Under glibc's malloc, hand freed memory back to the kernel (malloc_trim) every this "
        "many seconds, so resident memory does not grow with varied requests; 0 turns it off. "
        "Not used when jemalloc, tcmalloc or mimalloc is preloaded (the runtime image preloads "
        "jemalloc)",
        "SECONDS",
    ),
    _Option(
        "log_format",
        ("--log-format",),
        _choice_parser(LOG_FORMATS),
        "json (one object per line) or text",
        "FORMAT",
    ),
    _Option(
        "log_level",
        ("--log-level",),
        _choice_parser(LOG_LEVELS),
        "debug, info, warning, error or critical",
        "LEVEL",
    ),
    _Option(
        "payload_limit",
        ("--payload-limit",),
        _int_parser(1),
        "Largest request body in bytes; a larger one gets 413 (TEI's flag and default)",
        "BYTES",
    ),
    _Option(
        "prometheus_port",
        ("--prometheus-port",),
        _int_parser(0, 65535),
        "Also serve the Prometheus metrics on this port, on every path, as TEI does (/metrics on "
        "--port stays); 0 turns it off; a port in use is logged and skipped",
        "PORT",
    ),
    _Option(
        "cors_allow_origin",
        ("--cors-allow-origin",),
        _origins,
        "Origins allowed to call the API from a browser (CORS), comma-separated or repeated; * "
        "allows any",
        "ORIGIN",
        default_text="any origin, like TEI",
        many=True,
    ),
    _Option(
        "hf_cache",
        ("--hf-cache", "--huggingface-hub-cache"),
        _text,
        "Directory the hub downloads go to (sets HF_HUB_CACHE; without it huggingface_hub uses "
        "HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)",
        "DIR",
        default_text="huggingface_hub's",
    ),
    _Option(
        "hf_token",
        ("--hf-token", "--hf-api-token"),
        _text,
        "Hugging Face token for gated or private hub models (sets HF_TOKEN; never logged)",
        "TOKEN",
        default_text="huggingface_hub's: HF_TOKEN, else a saved login",
    ),
    _Option(
        "tokenization_workers",
        ("--tokenization-workers",),
        _int_parser(1, 256),
        "Threads that tokenize requests (one request's tokenization runs on one of them)",
        "N",
        default_text="CPUs + 4, at most 32",
    ),
    _Option(
        "grpc_port",
        ("--grpc-port",),
        _int_parser(0, 65535),
        "Also serve TEI's gRPC API (tei.v1: Rerank, Predict, Tokenize, Info, with health and "
        "reflection) on this port, beside HTTP; 0 turns it off",
        "PORT",
        default_text="0 (off)",
    ),
    _Option(
        "otlp_endpoint",
        ("--otlp-endpoint",),
        check_endpoint,
        "Send OpenTelemetry traces (one span per request, with tokenize, queue and inference "
        "children) over OTLP/gRPC to this collector, e.g. http://otel-collector:4317 (https:// "
        "for TLS); the caller's traceparent header is followed",
        "URL",
        default_text="unset: no tracing",
    ),
    _Option(
        "otlp_service_name",
        ("--otlp-service-name",),
        _text,
        "The service.name of the traces (more resource attributes: OTEL_RESOURCE_ATTRIBUTES)",
        "NAME",
        default_text="OTEL_SERVICE_NAME, else reranker-runtime",
    ),
    _Option(
        "disable_spans",
        ("--disable-spans",),
        parse_bool,
        "Leave trace_id and span_id out of JSON log lines (TEI's flag; traces are still sent)",
        boolean=True,
    ),
    _Option(
        "engine",
        ("--engine",),
        _choice_parser(ENGINE_CHOICES),
        "auto (TensorRT-LLM for a TensorRT-LLM engine directory when it is installed, else the "
        "packed PyTorch engine, on GPUs and CPUs, falling back to torch for a checkpoint it does "
        "not serve; docs/engines.md), torch (padded transformers model), packed (padding-free "
        "PyTorch engine) or trtllm",
        "ENGINE",
    ),
    _Option(
        "torch_compile",
        ("--torch-compile",),
        parse_bool,
        "Packed engine: torch.compile the forward pass (slower start; measure with "
        "`reranker-runtime gpu-check`)",
        boolean=True,
    ),
    _Option(
        "cuda_graphs",
        ("--cuda-graphs",),
        parse_bool,
        "Packed engine on CUDA: replay CUDA graphs captured per token-count bucket (more GPU "
        "memory; measure with `reranker-runtime gpu-check`)",
        boolean=True,
    ),
    _Option(
        "cpu_kernels",
        ("--cpu-kernels",),
        _choice_parser(CPU_KERNEL_CHOICES),
        "Packed engine on CPU: the linear layers' kernels. auto times both at load on a block of "
        "the model's shape and takes onednn where it runs at least 1.25x as fast; aten "
        "(PyTorch's F.linear) or onednn (weights converted once, GELU and residual add fused "
        "into the GEMM) pin one (docs/benchmarks.md)",
        "KERNELS",
    ),
)

_DEFAULTS = ServeSettings()


def _argparse_type(opt: _Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return opt.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None

    convert.__name__ = opt.field  # argparse shows this name in some messages
    return convert


# TEI's flags (and variables) that mean nothing for a cross-encoder: a flag is refused saying so
# (argparse alone would only say "unrecognized arguments"), a variable is logged as ignored.
TEI_FLAGS_WITHOUT_MEANING: dict[str, str] = {
    "--pooling": "it picks an embedding model's pooling; a reranker scores with its "
    "classification head",
    "--default-prompt-name": "it prepends a prompt to an embedding model's inputs",
    "--default-prompt": "it prepends a prompt to an embedding model's inputs",
    "--dense-path": "it loads a sentence-transformers embedding model's Dense layer",
    "--uds-path": "it is TEI's socket to its own Python backend, which this server does not use",
}
TEI_VARIABLES_WITHOUT_MEANING = ("POOLING", "DEFAULT_PROMPT_NAME", "DEFAULT_PROMPT", "DENSE_PATH")


def ignored_tei_variables(env: Mapping[str, str]) -> list[str]:
    """TEI's embedding-only variables set in `env` (logged at start as ignored)."""
    return [name for name in TEI_VARIABLES_WITHOUT_MEANING if env.get(name, "").strip()]


class _MeaninglessTeiFlag(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        flag = option_string or self.option_strings[0]
        parser.error(
            f"{flag} is a TEI flag with no meaning here: {TEI_FLAGS_WITHOUT_MEANING[flag]}; "
            "remove it"
        )


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on the CLI's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="Serve a reranker over HTTP (BEI/TEI, Cohere v2 and Jina APIs)",
        description=(
            "Serve a cross-encoder reranker or classifier over HTTP. Every flag can also be set by "
            "the environment variable shown; a flag wins over its variable. Boolean variables "
            "accept true/false/1/0/yes/no."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for opt in _OPTIONS:
        default = getattr(_DEFAULTS, opt.field)
        shown = opt.default_text or (
            "unset"
            if default is None
            else str(default).lower()
            if isinstance(default, bool)
            else default
        )
        env_names = SERVE_ENV_VARS[opt.field]
        if opt.field in TEI_ENV_VARS:
            env_names += f" or TEI's {TEI_ENV_VARS[opt.field]}"
        help_text = f"{opt.help} (default: {shown}; env: {env_names})"
        if opt.boolean:
            # `--flag`, `--flag true|false` (TEI's form, e.g. `--auto-truncate false`), `--no-flag`.
            parser.add_argument(
                *opt.flags,
                dest=opt.field,
                type=_argparse_type(opt),
                nargs="?",
                const=True,
                default=None,
                metavar="BOOL",
                help=help_text,
            )
            parser.add_argument(
                *(f"--no-{flag[2:]}" for flag in opt.flags),
                dest=opt.field,
                action="store_false",
                default=None,
                help=f"same as {opt.flags[0]} false",
            )
        else:
            parser.add_argument(
                *opt.flags,
                dest=opt.field,
                type=_argparse_type(opt),
                action="extend" if opt.many else "store",
                default=None,
                metavar=opt.metavar,
                help=help_text,
            )
    parser.add_argument(
        "--json-output",
        dest="log_format",
        action="store_const",
        const="json",
        help=f"TEI's flag: same as --log-format json (env: TEI's {TEI_JSON_OUTPUT_ENV}=true|false, "
        "read when RERANKER_LOG_FORMAT is unset)",
    )
    for flag in TEI_FLAGS_WITHOUT_MEANING:
        parser.add_argument(flag, nargs="?", action=_MeaninglessTeiFlag, help=argparse.SUPPRESS)
    parser.set_defaults(func=run_serve)
    return parser


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Flag > RERANKER_* variable > TEI's variable > default. Raises SettingsError naming the
    bad variable."""
    return _resolve_settings(args, os.environ if environ is None else environ)[0]


# Settings whose variable, set but blank, is a mistake rather than "unset".
_BLANK_IS_AN_ERROR = {
    "api_key": "an empty API key would leave the server open; put the key in it (e.g. the "
    "Secret's value), or unset it to serve without authentication",
}


def _refuse_if_blank(field: str, var: str, raw: str | None) -> None:
    """Set but blank (a Secret key holding nothing): refused where that would be a mistake
    rather than taken as unset."""
    if raw is not None and raw.strip() == "" and field in _BLANK_IS_AN_ERROR:
        raise SettingsError(
            f"environment variable {var} is set but empty: {_BLANK_IS_AN_ERROR[field]}"
        )


def _resolve_settings(
    args: argparse.Namespace, env: Mapping[str, str]
) -> tuple[ServeSettings, list[str]]:
    """The settings, and the names of the TEI variables they took a value from (logged at
    start: a generic name such as PORT or API_KEY may have been set for something else)."""
    values: dict[str, Any] = {}
    tei_used: list[str] = []
    for opt in _OPTIONS:
        flag_value = getattr(args, opt.field, None)
        if flag_value is not None:
            values[opt.field] = tuple(flag_value) if opt.many else flag_value
            continue
        var = SERVE_ENV_VARS[opt.field]
        raw = env.get(var)
        _refuse_if_blank(opt.field, var, raw)
        shadowed = env.get(TEI_ENV_SHADOWED_BY.get(opt.field, ""), "").strip()
        if (raw is None or raw.strip() == "") and opt.field in TEI_ENV_VARS and not shadowed:
            var = TEI_ENV_VARS[opt.field]
            raw = env.get(var)
            _refuse_if_blank(opt.field, var, raw)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[opt.field] = opt.parse(raw)
        except ValueError as exc:
            raise SettingsError(f"environment variable {var}={raw!r} is invalid: {exc}") from None
        if var != SERVE_ENV_VARS[opt.field]:
            tei_used.append(var)
    if "log_format" not in values and env.get(TEI_JSON_OUTPUT_ENV, "").strip():
        raw = env[TEI_JSON_OUTPUT_ENV]
        try:
            values["log_format"] = "json" if parse_bool(raw) else "text"
        except ValueError as exc:
            raise SettingsError(
                f"environment variable {TEI_JSON_OUTPUT_ENV}={raw!r} is invalid: {exc}"
            ) from None
        tei_used.append(TEI_JSON_OUTPUT_ENV)
    if not values.get("model") and not values.get("engine_dir"):
        values["model"] = DEFAULT_MODEL
    known = {f.name for f in dataclasses.fields(ServeSettings)}
    return ServeSettings(**{k: v for k, v in values.items() if k in known}), tei_used


def run_serve(args: argparse.Namespace) -> int:
    from reranker_runtime.logging import setup_logging

    try:
        settings, tei_used = _resolve_settings(args, os.environ)
    except SettingsError as exc:
        print(f"reranker-runtime serve: error: {exc}", file=sys.stderr)
        return 2
    # Cheap checks first, so an obvious mistake fails in milliseconds, before torch is imported.
    if settings.engine_dir and not os.path.isdir(settings.engine_dir):
        print(
            f"reranker-runtime serve: error: --engine-dir {settings.engine_dir!r} is not a directory",
            file=sys.stderr,
        )
        return 1
    if (
        not settings.engine_dir
        and settings.model
        and looks_like_path(settings.model)
        and not os.path.exists(os.path.expanduser(settings.model))
    ):
        print(
            f"reranker-runtime serve: error: --model {settings.model!r} does not exist (a local path; "
            "hub ids look like 'org/name')",
            file=sys.stderr,
        )
        return 1
    # Before setup_logging: it imports huggingface_hub, which reads HF_HUB_CACHE once.
    use_hub_settings(settings)
    setup_logging(
        settings.log_format, settings.log_level, trace_ids_in_json=not settings.disable_spans
    )
    if tei_used:  # names only: API_KEY's value is a secret
        log.info("settings read from TEI's variables", extra=log_fields(variables=tei_used))
    ignored = ignored_tei_variables(os.environ)
    if ignored:
        log.warning(
            "TEI's variables set here mean nothing for a reranker and are ignored (embedding "
            "models only)",
            extra=log_fields(variables=ignored),
        )
    return serve(settings)


def use_hub_settings(settings: ServeSettings, environ: dict[str, str] | None = None) -> None:
    """--hf-cache: point huggingface_hub's download cache there; --hf-token: its token. Must run
    before huggingface_hub is imported (it reads HF_HUB_CACHE once); `serve` does it before
    loading anything."""
    env = os.environ if environ is None else environ
    if settings.hf_cache:
        env["HF_HUB_CACHE"] = os.path.expanduser(settings.hf_cache)
    if settings.hf_token:
        env["HF_TOKEN"] = settings.hf_token


def serve(settings: ServeSettings) -> int:
    """Run the server until a signal; returns the process exit code. `run_serve` has set up
    logging and the hub variables (`use_hub_settings`) before."""
    # First, before anything imports torch: OpenMP reads its variables once, when it starts.
    log_thread_plan(configure_cpu_threads(settings.torch_threads, settings.cpu_workers))
    trimmer = start_memory_management(settings.malloc_trim_interval)
    from reranker_runtime.api.app import create_app
    from reranker_runtime.metrics import start_metrics_server

    app = create_app(settings)
    lifecycle: Lifecycle = app.state.lifecycle
    server = _DrainingServer(uvicorn_config(app, settings), lifecycle)
    lifecycle.on_fatal = lambda _message: server.request_exit()
    lifecycle.on_warm = freeze_heap
    log.info(
        "starting",
        extra=log_fields(
            host=settings.host,
            port=settings.port,
            model=settings.model,
            engine_dir=settings.engine_dir,
            # Whether a key is required, never the key.
            api_key="required" if settings.api_key else "none (open to any client)",
        ),
    )
    metrics_server = start_metrics_server(settings.host, settings.prometheus_port)
    try:
        server.run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if trimmer is not None:
            trimmer.stop()
    if lifecycle.failure is not None:
        # The lifecycle logged the reason (one line, in the log format); repeat it only when
        # the log level hides that line.
        if logging.getLogger("reranker_runtime.lifecycle").isEnabledFor(logging.ERROR):
            reason = "model failed to load (the reason is logged above)"
        else:
            reason = f"model failed to load: {lifecycle.failure}"
        print(f"reranker-runtime serve: error: {reason}", file=sys.stderr)
        return 1
    if not server.started or server.forced:
        return 1  # e.g. the port was taken (uvicorn logged why), or a third exit signal
    return 0


def uvicorn_config(app: Any, settings: ServeSettings) -> uvicorn.Config:
    """How `serve` runs the app: uvicorn's h11 protocol with a read deadline per request and a
    cap on open connections (connections.py), idle keep-alive connections closed after 30 s."""
    from reranker_runtime.connections import guarded_protocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.request_read_timeout, settings.max_connections),
        log_config=None,  # keep setup_logging's handlers
        access_log=False,  # AccessMiddleware logs each request once, with pairs and tokens
        lifespan="on",
        timeout_keep_alive=30,
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the service before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._cut_requested = False
        self.forced = False  # a third signal came
        self._hard_exit: Callable[[int], object] = os._exit  # tests replace it
        self._drain_task: asyncio.Future[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def request_exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutdown and the process
        # would die by SIGTERM instead of exiting 0 after a clean drain.
        name = signal.Signals(sig).name
        if self._loop is None:  # before the server runs: nothing to drain
            self.should_exit = True
        elif not self._drain_requested:
            self._drain_requested = True
            log.info("received %s: draining", name)
            self._loop.call_soon_threadsafe(self._start_drain)
        elif not self._cut_requested:
            # A second signal (Ctrl-C twice): stop waiting, but still answer every client (503)
            # and shut down in order; uvicorn's own force exit would cut their connections.
            self._cut_requested = True
            log.warning(
                "received %s again: answering the requests in flight with 503 and exiting; "
                "a third signal exits at once",
                name,
            )
            self._loop.call_soon_threadsafe(self._lifecycle.cut_drain_short)
        else:
            # uvicorn's force exit would still wait for the forward pass under way (Python joins
            # the worker threads at exit): the very wait a third signal asks to skip.
            log.warning("received %s a third time: exiting now (exit code 1)", name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            self.forced = True
            self.force_exit = True
            self.should_exit = True
            self._hard_exit(1)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            try:
                await self._lifecycle.drain()
            finally:
                self.should_exit = True

        # Keep a reference: the loop holds tasks weakly, and a collected task stops mid-drain.
        self._drain_task = asyncio.ensure_future(drain_then_exit())
