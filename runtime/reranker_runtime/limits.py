"""Per-request limits that bound the work one request can cause before any of it is done."""

from __future__ import annotations

from collections.abc import Iterable

from reranker_runtime.errors import TooManyCharactersError

__all__ = ["check_request_characters", "count_characters"]


def count_characters(parts: Iterable[str | tuple[str, str]]) -> int:
    """Characters in a request's texts: strings, and both members of pairs."""
    total = 0
    for part in parts:
        if isinstance(part, str):
            total += len(part)
        else:
            total += len(part[0]) + len(part[1])
    return total


def check_request_characters(parts: Iterable[str | tuple[str, str]], limit: int) -> None:
    """TooManyCharactersError (413) when a request's texts (query included) hold more than
    `limit` characters."""
    total = count_characters(parts)
    if total > limit:
        raise TooManyCharactersError(total, limit)
