"""The Hugging Face hub as `serve` sees it: whether a hub id's files can be fetched at all, where
the cache is, and what to tell a user when a hub id cannot be loaded.

huggingface_hub retries a failed request with backoff (1, 2, 4, 8, 8 s) when no cached copy
exists, whatever the error: a host name that does not resolve or a port that refuses took about
25 s and six identical warnings to fail. `unreachable_reason` asks once, without retries, before
anything is loaded; a hub that cannot be reached that way (name resolution, connection refused,
TLS) is not asked again: the load reads the cache only, and fails at once with what to do next
when the cache does not have the model. Timeouts, 429 and 5xx answers are not decided here: the
load goes ahead and the library retries them as it always did.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator

logger = logging.getLogger(__name__)

# "name" or "org/name" (huggingface_hub's own rules, without its length limit).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "true", "yes", "on"}

LOCAL_DIR_ADVICE = (
    "serve a local checkpoint directory (--model /path/to/dir with config.json, *.safetensors "
    "and the tokenizer files)"
)
CACHE_SETTINGS = "HF_HUB_CACHE, --hf-cache or $HF_HOME/hub"


def looks_like_path(model: str) -> bool:
    """Surely meant as a local path: hub ids never start with these (anything else may be a hub
    id, and is left to the loader)."""
    return model.startswith(("/", "./", "../", "~"))


def looks_like_hub_id(model: str) -> bool:
    """Whether `model` is read from the hub (or its cache) rather than from a local directory."""
    return bool(_HUB_ID.fullmatch(model)) and not os.path.exists(os.path.expanduser(model))


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    if any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a runtime dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    """The hub cache huggingface_hub reads and fills (HF_HUB_CACHE, else $HF_HOME/hub, ...)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def in_cache(model: str, revision: str | None) -> bool:
    """Whether the cache holds the model's config.json at `revision` (a branch, tag or commit)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:
        return False
    return isinstance(found, str)


def unreachable_reason(model: str, revision: str | None, timeout_s: float = 10.0) -> str | None:
    """One HEAD of the model's config.json through huggingface_hub's own session (its endpoint,
    proxies, token and headers), without retries. Returns why the hub cannot be reached (the
    connection itself failed: name resolution, refused, TLS), or None when it answered, whatever
    it answered, or only timed out (left to the library's retries)."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(model, "config.json", revision=revision), timeout=timeout_s)
    except Exception as exc:
        if connection_failed(exc):
            return one_line(exc) or type(exc).__name__
    return None


def connection_failed(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a connection that could not be made, which retrying
    within seconds does not fix: a name that does not resolve, a refused port, a TLS failure. A
    timeout is not (httpx's ConnectTimeout, requests' ConnectTimeout)."""
    for err in _chain(exc):
        names = {cls.__name__ for cls in type(err).__mro__}
        if any("Timeout" in name for name in names) or isinstance(err, TimeoutError):
            return False
        if isinstance(err, (socket.gaierror, ConnectionRefusedError)):
            return True
        if "ConnectError" in names:  # httpx, httpx2
            return True
        if "ConnectionError" in names and type(err).__module__.startswith("requests"):
            return True
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def one_line(value: object) -> str:
    """A library's message on one line, without a trailing full stop (ours follows)."""
    return " ".join(str(value).split()).rstrip(".")


def download_command(model: str, revision: str | None, cache: str) -> str:
    pinned = f" --revision {revision}" if revision else ""
    return f"hf download {model}{pinned} --cache-dir {cache}"


def _at(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""


def config_error(
    model: str,
    revision: str | None,
    exc: BaseException,
    *,
    offline: bool,
    unreachable: str | None,
) -> str:
    """The message for a config that could not be read: what failed and what to do next."""
    head = f"cannot read the model config of {model!r}{_at(revision)}"
    cache = cache_dir()
    if unreachable is not None and not in_cache(model, revision):
        return (
            f"{head}: the Hugging Face hub at {endpoint()} cannot be reached ({unreachable}) and "
            f"{model!r} is not in the hub cache at {cache}. Without the hub, {LOCAL_DIR_ADVICE}, "
            f"or fill that cache where the hub is reachable and set HF_HUB_OFFLINE=1 (the cache "
            f"is {CACHE_SETTINGS}); for the hub, check the network, DNS and proxy settings "
            "(HTTPS_PROXY, HF_ENDPOINT)"
        )
    if offline and looks_like_hub_id(model) and not in_cache(model, revision):
        return (
            f"{head}: HF_HUB_OFFLINE is set and {model!r} is not in the hub cache at {cache}. "
            f"Fill it where the hub is reachable (`{download_command(model, revision, cache)}`), "
            f"point {CACHE_SETTINGS} at a filled cache, or {LOCAL_DIR_ADVICE}"
        )
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        # A local directory: the hub's advice does not apply; what is missing there does.
        if not os.path.isfile(os.path.join(local, "config.json")):
            return (
                f"{head}: the directory has no config.json; --model takes a checkpoint directory "
                "with config.json, *.safetensors and the tokenizer files (what save_pretrained "
                "writes)"
            )
        return f"{head}: {one_line(exc)}. Check {os.path.join(local, 'config.json')}"
    return (
        f"{head}: {one_line(exc)}. Check the model id, the revision and HF_TOKEN; without hub "
        f"access, {LOCAL_DIR_ADVICE}, or set HF_HUB_OFFLINE=1 with a filled hub cache "
        f"(now {cache}: {CACHE_SETTINGS})"
    )
