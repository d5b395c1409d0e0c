"""Tokenization and truncation, with the tokenizer's own special-token layout.

Query and text are tokenized separately without special tokens, truncated by our own rule (the
text is cut in the requested direction and the query kept whole where it fits), then assembled
by the tokenizer's post-processor (`tokenizers.Tokenizer.post_process`), so the result is exactly
what `tokenizer(query, text)` gives when no cut is needed, for any BERT-family template.

transformers 5.x tokenizers have no `build_inputs_with_special_tokens`, and `tokenizer(...)`
switches the shared backend's truncation/padding state on each call, which is not safe from
several threads. We use a private copy of the backend tokenizer with truncation and padding off;
its `encode*` calls are thread-safe and we never change its state.

A text (and the query) is tokenized only as far as the request can use it
(`text_bounds.encode_bounded`: one token past the model's window, or past the windows a chunked
text may get, from the kept end), so a 10 MB text costs what a normal one does, with or without
truncation, and the result is exactly what tokenizing it whole would give. The tokenizer cannot
take every Python string (a lone surrogate); such a text is a 422 naming it, never a 500.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tokenizers import Encoding, Tokenizer

from reranker_runtime.engines.base import EncodedPair
from reranker_runtime.errors import ValidationError
from reranker_runtime.text_bounds import (
    BoundedEncoding,
    Direction,
    TokenizationStopped,
    encode_bounded_many,
    raise_if_stopped,
)

__all__ = [
    "ChunkedText",
    "Direction",
    "Encoded",
    "Input",
    "PairTokenizer",
    "TokenInfo",
    "parse_direction",
]

Input = str | tuple[str, str]
T = TypeVar("T")


def parse_direction(value: str) -> Direction:
    """'right'/'left' in any case ('Right', 'LEFT'), as TEI clients send them."""
    normalized = str(value).strip().lower()
    if normalized == "right":
        return "right"
    if normalized == "left":
        return "left"
    raise ValidationError(f"truncation_direction must be 'right' or 'left', got {value!r}")


@dataclass(frozen=True)
class Encoded:
    """One model input ready for the batcher, plus what the response reports about it."""

    pair: EncodedPair
    num_tokens: int  # tokens the model sees (special tokens included), after any truncation
    original_tokens: int  # tokens before truncation (a lower bound unless `fully_counted`)
    truncated: bool
    # False when a text longer than the request can use was tokenized only as far as it can:
    # then (without truncation) num_tokens and original_tokens are lower bounds.
    fully_counted: bool = True


@dataclass(frozen=True)
class ChunkedText:
    """One text as scored: its windows, each paired with the whole query (one window unless the
    text was chunked), and whether part of the text was left unscored."""

    windows: list[Encoded]
    needed_windows: int  # windows the whole text needs; more than len(windows) when cut
    window_tokens: int  # text tokens per window (the last one may be shorter)
    truncated: bool
    # False when the text was tokenized only as far as its windows reach: needed_windows is
    # then a lower bound.
    fully_counted: bool = True
    # Windows it would be scored with: len(windows), except when the request is refused for
    # making more windows than `max_total_windows` (only the first window is built then).
    kept_windows: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(w.num_tokens for w in self.windows)


@dataclass(frozen=True)
class TokenInfo:
    """One token as TEI's /tokenize reports it. start/stop are character offsets into the
    input string the token came from (the first or second element of a pair); None for special
    tokens, whose `text` is the token itself."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class PairTokenizer:
    """Thread-safe encoder for (query, text) pairs and single texts with explicit truncation."""

    def __init__(self, hf_tokenizer: Any, max_input_length: int) -> None:
        backend: Tokenizer = hf_tokenizer.backend_tokenizer
        # Private copy: we never touch the state of the tokenizer others may use.
        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_input_length = max_input_length
        self.uses_token_type_ids = "token_type_ids" in getattr(
            hf_tokenizer, "model_input_names", []
        )
        self._special_pair = self._tok.num_special_tokens_to_add(is_pair=True)
        self._special_single = self._tok.num_special_tokens_to_add(is_pair=False)
        if max_input_length <= self._special_pair + 1:
            raise ValueError(f"max_input_length {max_input_length} leaves no room for a pair")

    @property
    def max_text_tokens(self) -> int:
        """Text tokens of a pair with an empty query: the longest window a text can get."""
        return self.max_input_length - self._special_pair

    def _bounded(
        self,
        texts: Sequence[str],
        max_tokens: int,
        direction: Direction,
        stop: threading.Event | None = None,
    ) -> list[BoundedEncoding]:
        """Each text's tokens from its `direction` end, as many as `max_tokens` (all of a
        shorter text), in batches that release the GIL (text_bounds.encode_bounded_many).
        `stop`: set when nobody waits for the result any more (TokenizationStopped)."""
        return encode_bounded_many(self._tok, texts, max_tokens, direction, stop=stop)

    def _query(self, query: str, direction: Direction) -> BoundedEncoding:
        # One token past the pair budget: a longer query is cut (or refused) whatever its length.
        return _tokenizing(
            "query",
            lambda: self._bounded([query], self.max_text_tokens + 1, direction)[0],
        )

    def _texts(
        self,
        texts: Sequence[str],
        field: str,
        usable: int,
        direction: Direction,
        max_text_tokens: int | None,
        stop: threading.Event | None = None,
    ) -> list[tuple[Encoding, int, bool]]:
        """Each text's tokens as far as `usable` of them (from the `direction` end) can be used,
        after `max_text_tokens` keeps only its first that many: (encoding, tokens cut by
        max_text_tokens, whether the text was tokenized whole)."""
        if max_text_tokens is None:
            bound, side = usable + 1, direction
        elif direction == "right":
            bound, side = min(max_text_tokens, usable) + 1, direction
        else:  # the last tokens of its first max_text_tokens: those must all be known
            bound, side = max_text_tokens + 1, "right"
        out: list[tuple[Encoding, int, bool]] = []
        for b in _tokenizing(field, lambda: self._bounded(texts, bound, side, stop), texts):
            t, cut = b.encoding, 0
            if max_text_tokens is not None and len(t.ids) > max_text_tokens:
                cut = len(t.ids) - max_text_tokens
                t.truncate(max_text_tokens, stride=0, direction="right")
            out.append((t, cut, b.complete))
        return out

    def _finish(
        self,
        first: Encoding,
        second: Encoding | None,
        original: int,
        truncated: bool,
        fully_counted: bool = True,
    ) -> Encoded:
        enc = self._tok.post_process(first, second, add_special_tokens=True)
        pair = EncodedPair(
            input_ids=list(enc.ids),
            token_type_ids=list(enc.type_ids) if self.uses_token_type_ids else None,
        )
        return Encoded(
            pair=pair,
            num_tokens=len(enc.ids),
            original_tokens=original,
            truncated=truncated,
            fully_counted=fully_counted,
        )

    def encode_pairs(
        self,
        query: str,
        texts: Sequence[str],
        *,
        truncate: bool,
        direction: Direction = "right",
        max_text_tokens: int | None = None,
        texts_field: str = "texts",
        stop: threading.Event | None = None,
    ) -> list[Encoded]:
        """Encode (query, text) for each text. Without `truncate`, over-long pairs come back
        untruncated (num_tokens > max_input_length) and the caller rejects them.
        `max_text_tokens` first keeps only each text's first that many tokens (Cohere/Jina
        `max_tokens_per_doc`); a text so cut counts as truncated. `texts_field` names the texts
        in errors. `stop`: see `_bounded`."""
        qb = self._query(query, direction)
        return [
            self._pair(
                qb.encoding,
                t,
                truncate=truncate,
                direction=direction,
                cut_tokens=cut,
                fully_counted=qb.complete and complete,
            )
            for t, cut, complete in self._texts(
                texts, texts_field, self.max_text_tokens, direction, max_text_tokens, stop
            )
        ]

    def encode_chunked(
        self,
        query: str,
        texts: Sequence[str],
        *,
        truncate: bool,
        direction: Direction = "right",
        max_text_tokens: int | None = None,
        max_windows: int = 1,
        max_total_windows: int | None = None,
        overlap: int = 0,
        texts_field: str = "texts",
        stop: threading.Event | None = None,
    ) -> list[ChunkedText]:
        """Encode each text as windows when it does not fit the model with the query.

        A text whose pair is too long is split into windows of `budget - len(query)` text
        tokens, each paired with the whole query by the tokenizer's own template; consecutive
        windows share `overlap` tokens (at most half a window). Windows are laid from the
        text's start (`direction="right"`) or its end (`"left"`); at most `max_windows` are
        kept, in that order, and a text that needs more is marked truncated (the caller refuses
        it when truncation is off). With `max_windows=1`, or a query that leaves no room for
        text, this is exactly `encode_pairs`. `stop`: see `_bounded`.

        Memory stays within the windows a request may score: a text is tokenized no further
        than `max_windows` windows reach (`max_windows` beyond `max_total_windows` + 1 changes
        nothing: such a text is refused either way), the windows are counted before any is
        built, and only the first window of each text is built when the request would make
        more than `max_total_windows` (the caller refuses it) or a text needs more than
        `max_windows` with truncation off (refused too)."""
        if max_windows <= 1:
            return [
                ChunkedText(
                    windows=[e],
                    needed_windows=1,
                    window_tokens=0,
                    truncated=e.truncated,
                    fully_counted=e.fully_counted,
                )
                for e in self.encode_pairs(
                    query,
                    texts,
                    truncate=truncate,
                    direction=direction,
                    max_text_tokens=max_text_tokens,
                    texts_field=texts_field,
                    stop=stop,
                )
            ]
        if max_total_windows is not None:
            max_windows = min(max_windows, max_total_windows + 1)
        budget = self.max_input_length - self._special_pair
        qb = self._query(query, direction)
        q = qb.encoding
        window = budget - len(q.ids)
        stride = min(overlap, window // 2)
        # Text tokens that max_windows windows cover (one window when the query leaves no room).
        usable = window + (max_windows - 1) * (window - stride) if window >= 1 else budget
        planned: list[tuple[Encoding, int, bool, int]] = []  # (text, cut, complete, needed)
        for t, cut, complete in self._texts(
            texts, texts_field, usable, direction, max_text_tokens, stop
        ):
            fits = window < 1 or len(q.ids) + len(t.ids) <= budget
            planned.append(
                (t, cut, complete, 1 if fits else _windows_for(len(t.ids), window, stride))
            )
        kept_total = sum(min(needed, max_windows) for *_, needed in planned)
        refused = max_total_windows is not None and kept_total > max_total_windows
        out: list[ChunkedText] = []
        for t, cut, complete, needed in planned:
            counted = qb.complete and complete
            if window < 1 or len(q.ids) + len(t.ids) <= budget:
                single = self._pair(
                    q,
                    t,
                    truncate=truncate,
                    direction=direction,
                    cut_tokens=cut,
                    fully_counted=counted,
                )
                out.append(
                    ChunkedText([single], 1, max(window, 0), single.truncated, single.fully_counted)
                )
                continue
            kept = min(needed, max_windows)
            build = 1 if refused or (needed > max_windows and not truncate) else kept
            # Only the tokens of the windows built, then the tokenizer's own windowing: `t`
            # becomes the first window, the others go to `t.overflowing`. Each is
            # post-processed with the query on its own: the pair outputs' own `overflowing`
            # carry wrong token_type_ids for BERT-style templates.
            _keep_tokens(t, window + (build - 1) * (window - stride), direction)
            t.truncate(window, stride=stride, direction=direction)
            windows = []
            for part in [t, *t.overflowing][:build]:
                raise_if_stopped(stop)  # nobody waits for this request any more
                windows.append(
                    self._window(self._tok.post_process(q, part, add_special_tokens=True))
                )
            out.append(
                ChunkedText(
                    windows=windows,
                    needed_windows=needed,
                    window_tokens=window,
                    truncated=cut > 0 or needed > max_windows,
                    fully_counted=counted,
                    kept_windows=kept,
                )
            )
        return out

    def _window(self, enc: Encoding) -> Encoded:
        pair = EncodedPair(
            input_ids=list(enc.ids),
            token_type_ids=list(enc.type_ids) if self.uses_token_type_ids else None,
        )
        return Encoded(
            pair=pair, num_tokens=len(enc.ids), original_tokens=len(enc.ids), truncated=False
        )

    def encode_inputs(
        self,
        inputs: Sequence[Input],
        *,
        truncate: bool,
        direction: Direction = "right",
        stop: threading.Event | None = None,
    ) -> list[Encoded]:
        """Encode /predict inputs: single strings or (first, second) pairs. `stop`: see
        `_bounded`."""
        flat = [part for item in inputs for part in ((item,) if isinstance(item, str) else item)]
        # One token past the window of a single text (which is longer than a pair's).
        bound = self.max_input_length - self._special_single + 1
        parts = iter(
            _tokenizing("inputs", lambda: self._bounded(flat, bound, direction, stop), inputs)
        )
        out: list[Encoded] = []
        for item in inputs:
            if isinstance(item, str):
                b = next(parts)
                enc = b.encoding
                original = len(enc.ids) + self._special_single
                budget = self.max_input_length - self._special_single
                cut = truncate and len(enc.ids) > budget
                if cut:
                    enc.truncate(budget, stride=0, direction=direction)
                out.append(self._finish(enc, None, original, cut, b.complete))
            else:
                a, b = next(parts), next(parts)
                out.append(
                    self._pair(
                        a.encoding,
                        b.encoding,
                        truncate=truncate,
                        direction=direction,
                        fully_counted=a.complete and b.complete,
                    )
                )
        return out

    def _pair(
        self,
        q: Encoding,
        t: Encoding,
        *,
        truncate: bool,
        direction: Direction,
        cut_tokens: int = 0,
        fully_counted: bool = True,
    ) -> Encoded:
        """`cut_tokens`: tokens already cut from the text (max_text_tokens) before pairing."""
        budget = self.max_input_length - self._special_pair
        nq, nt = len(q.ids), len(t.ids)
        original = nq + nt + cut_tokens + self._special_pair
        if not truncate or nq + nt <= budget:
            return self._finish(q, t, original, cut_tokens > 0, fully_counted)
        # Keep the query whole where it fits, leaving the text at least one token; otherwise
        # cut the query too (in the same direction). The query's encoding is shared by every
        # pair and truncate() works in place: cut a copy.
        keep_text = max(budget - nq, min(nt, 1))
        keep_query = budget - keep_text
        if keep_query < nq:
            q = Encoding.merge([q], growing_offsets=False)
            q.truncate(keep_query, stride=0, direction=direction)
        if keep_text < nt:
            t.truncate(keep_text, stride=0, direction=direction)
        return self._finish(q, t, original, True, fully_counted)

    def tokens(
        self,
        inputs: Sequence[Input],
        *,
        add_special_tokens: bool = True,
        stop: threading.Event | None = None,
    ) -> list[list[TokenInfo]]:
        """TEI /tokenize: every token with its id, text, special flag and offsets. `stop` is
        looked at before each input (see `_bounded`)."""
        result: list[list[TokenInfo]] = []
        for i, item in enumerate(inputs):
            raise_if_stopped(stop)
            sources = (item,) if isinstance(item, str) else item

            def encode(parts: Sequence[str] = sources) -> Encoding:
                # encode_batch releases the GIL while it works (encode holds it throughout).
                one = parts[0] if len(parts) == 1 else (parts[0], parts[1])
                return self._tok.encode_batch([one], add_special_tokens=add_special_tokens)[0]

            enc = _tokenizing(f"inputs[{i}]", encode)
            tokens: list[TokenInfo] = []
            for tid, token, special, (begin, end), seq in zip(
                enc.ids,
                enc.tokens,
                enc.special_tokens_mask,
                enc.offsets,
                enc.sequence_ids,
                strict=True,
            ):
                if special or seq is None:
                    tokens.append(
                        TokenInfo(id=tid, text=token, special=True, start=None, stop=None)
                    )
                else:
                    tokens.append(
                        TokenInfo(
                            id=tid,
                            text=sources[seq][begin:end],
                            special=False,
                            start=begin,
                            stop=end,
                        )
                    )
            result.append(tokens)
        return result


def _tokenizing(field: str, run: Callable[[], T], texts: Sequence[object] | None = None) -> T:
    """Run the tokenizer; a text it cannot take is a 422 naming the field (never a 500)."""
    try:
        return run()
    except TokenizationStopped:
        raise
    except Exception as exc:  # the tokenizer raises TypeError/Exception, not a hierarchy
        where = field
        for i, text in enumerate(texts or ()):
            if _bad_text(text):
                where = f"{field}[{i}]"
                break
        raise ValidationError(f"`{where}` cannot be tokenized: {_reason(exc)}") from None


def _bad_text(value: object) -> bool:
    parts = (value,) if isinstance(value, str) else value if isinstance(value, tuple) else ()
    for part in parts:
        try:
            part.encode("utf-8")
        except (UnicodeEncodeError, AttributeError):
            return True
    return False


def _reason(exc: Exception) -> str:
    if isinstance(exc, TypeError):  # what the tokenizer raises for a lone surrogate
        return "it is not valid Unicode text (a lone surrogate such as \\ud800?); send UTF-8 text"
    return str(exc) or type(exc).__name__


def _windows_for(tokens: int, window: int, stride: int) -> int:
    """Windows of `window` tokens, consecutive ones sharing `stride`, that cover `tokens`."""
    if tokens <= window:
        return 1
    return 1 + -(-(tokens - window) // (window - stride))


def _keep_tokens(encoding: Encoding, tokens: int, direction: Direction) -> None:
    """Cut `encoding` to its first (right) or last (left) `tokens` tokens. Encoding.truncate
    splits everything it removes into parts of the kept length: one cut of 900,000 tokens to
    120 would make 7,500 encodings. Halving at most leaves one part per cut."""
    while len(encoding) > tokens:
        encoding.truncate(max(tokens, (len(encoding) + 1) // 2), stride=0, direction=direction)
