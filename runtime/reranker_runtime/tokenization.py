"""Tokenization and truncation, with the tokenizer's own special-token layout.

Query and text are tokenized separately without special tokens, truncated by our own rule (the
text is cut in the requested direction and the query kept whole where it fits), then assembled
by the tokenizer's post-processor (`tokenizers.Tokenizer.post_process`), so the result is exactly
what `tokenizer(query, text)` gives when no cut is needed, for any BERT-family template.

transformers 5.x tokenizers have no `build_inputs_with_special_tokens`, and `tokenizer(...)`
switches the shared backend's truncation/padding state on each call, which is not safe from
several threads. We use a private copy of the backend tokenizer with truncation and padding off;
its `encode*` calls are thread-safe and we never change its state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tokenizers import Encoding, Tokenizer

from reranker_runtime.engines.base import EncodedPair
from reranker_runtime.errors import ValidationError

Direction = Literal["right", "left"]
Input = str | tuple[str, str]


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
    original_tokens: int  # tokens before truncation
    truncated: bool


@dataclass(frozen=True)
class ChunkedText:
    """One text as scored: its windows, each paired with the whole query (one window unless the
    text was chunked), and whether part of the text was left unscored."""

    windows: list[Encoded]
    needed_windows: int  # windows the whole text needs; more than len(windows) when cut
    window_tokens: int  # text tokens per window (the last one may be shorter)
    truncated: bool

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

    def _raw(self, texts: Sequence[str]) -> list[Encoding]:
        return self._tok.encode_batch(list(texts), add_special_tokens=False)

    def _finish(
        self, first: Encoding, second: Encoding | None, original: int, truncated: bool
    ) -> Encoded:
        enc = self._tok.post_process(first, second, add_special_tokens=True)
        pair = EncodedPair(
            input_ids=list(enc.ids),
            token_type_ids=list(enc.type_ids) if self.uses_token_type_ids else None,
        )
        return Encoded(
            pair=pair, num_tokens=len(enc.ids), original_tokens=original, truncated=truncated
        )

    def encode_pairs(
        self,
        query: str,
        texts: Sequence[str],
        *,
        truncate: bool,
        direction: Direction = "right",
        max_text_tokens: int | None = None,
    ) -> list[Encoded]:
        """Encode (query, text) for each text. Without `truncate`, over-long pairs come back
        untruncated (num_tokens > max_input_length) and the caller rejects them.
        `max_text_tokens` first keeps only each text's first that many tokens (Cohere/Jina
        `max_tokens_per_doc`); a text so cut counts as truncated."""
        q = self._tok.encode(query, add_special_tokens=False)
        out: list[Encoded] = []
        for t in self._raw(texts):
            extra = 0
            if max_text_tokens is not None and len(t.ids) > max_text_tokens:
                extra = len(t.ids) - max_text_tokens
                t.truncate(max_text_tokens, stride=0, direction="right")
            out.append(
                self._pair(q, query, t, truncate=truncate, direction=direction, cut_tokens=extra)
            )
        return out

    def encode_chunked(
        self,
        query: str,
        texts: Sequence[str],
        *,
        truncate: bool,
        direction: Direction = "right",
        max_text_tokens: int | None = None,
        max_windows: int = 1,
        overlap: int = 0,
    ) -> list[ChunkedText]:
        """Encode each text as windows when it does not fit the model with the query.

        A text whose pair is too long is split into windows of `budget - len(query)` text
        tokens, each paired with the whole query by the tokenizer's own template; consecutive
        windows share `overlap` tokens (at most half a window). Windows are laid from the
        text's start (`direction="right"`) or its end (`"left"`); at most `max_windows` are
        kept, in that order, and a text that needs more is marked truncated (the caller refuses
        it when truncation is off). With `max_windows=1`, or a query that leaves no room for
        text, this is exactly `encode_pairs`."""
        if max_windows <= 1:
            return [
                ChunkedText(windows=[e], needed_windows=1, window_tokens=0, truncated=e.truncated)
                for e in self.encode_pairs(
                    query,
                    texts,
                    truncate=truncate,
                    direction=direction,
                    max_text_tokens=max_text_tokens,
                )
            ]
        budget = self.max_input_length - self._special_pair
        q = self._tok.encode(query, add_special_tokens=False)
        window = budget - len(q.ids)
        out: list[ChunkedText] = []
        for t in self._raw(texts):
            cut = 0
            if max_text_tokens is not None and len(t.ids) > max_text_tokens:
                cut = len(t.ids) - max_text_tokens
                t.truncate(max_text_tokens, stride=0, direction="right")
            if window < 1 or len(q.ids) + len(t.ids) <= budget:
                single = self._pair(
                    q, query, t, truncate=truncate, direction=direction, cut_tokens=cut
                )
                out.append(ChunkedText([single], 1, max(window, 0), single.truncated))
                continue
            # The tokenizer's own windowing: `t` becomes the first window, the others go to
            # `t.overflowing`. Each is post-processed with the query on its own: the pair
            # outputs' own `overflowing` carry wrong token_type_ids for BERT-style templates.
            t.truncate(window, stride=min(overlap, window // 2), direction=direction)
            parts = [t, *t.overflowing][:max_windows]
            windows = [
                self._window(self._tok.post_process(q, part, add_special_tokens=True))
                for part in parts
            ]
            out.append(
                ChunkedText(
                    windows=windows,
                    needed_windows=1 + len(t.overflowing),
                    window_tokens=window,
                    truncated=cut > 0 or len(t.overflowing) >= max_windows,
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
        self, inputs: Sequence[Input], *, truncate: bool, direction: Direction = "right"
    ) -> list[Encoded]:
        """Encode /predict inputs: single strings or (first, second) pairs."""
        out: list[Encoded] = []
        for item in inputs:
            if isinstance(item, str):
                enc = self._tok.encode(item, add_special_tokens=False)
                original = len(enc.ids) + self._special_single
                budget = self.max_input_length - self._special_single
                cut = truncate and len(enc.ids) > budget
                if cut:
                    enc.truncate(budget, stride=0, direction=direction)
                out.append(self._finish(enc, None, original, cut))
            else:
                first, second = item
                a = self._tok.encode(first, add_special_tokens=False)
                b = self._tok.encode(second, add_special_tokens=False)
                out.append(self._pair(a, first, b, truncate=truncate, direction=direction))
        return out

    def _pair(
        self,
        q: Encoding,
        query: str,
        t: Encoding,
        *,
        truncate: bool,
        direction: Direction,
        cut_tokens: int = 0,
    ) -> Encoded:
        """`cut_tokens`: tokens already cut from the text (max_text_tokens) before pairing."""
        budget = self.max_input_length - self._special_pair
        nq, nt = len(q.ids), len(t.ids)
        original = nq + nt + cut_tokens + self._special_pair
        if not truncate or nq + nt <= budget:
            return self._finish(q, t, original, cut_tokens > 0)
        # Keep the query whole where it fits, leaving the text at least one token; otherwise
        # cut the query too (in the same direction).
        keep_text = max(budget - nq, min(nt, 1))
        keep_query = budget - keep_text
        if keep_query < nq:
            q = self._tok.encode(query, add_special_tokens=False)  # fresh copy: truncate mutates
            q.truncate(keep_query, stride=0, direction=direction)
        if keep_text < nt:
            t.truncate(keep_text, stride=0, direction=direction)
        return self._finish(q, t, original, True)

    def tokens(
        self, inputs: Sequence[Input], *, add_special_tokens: bool = True
    ) -> list[list[TokenInfo]]:
        """TEI /tokenize: every token with its id, text, special flag and offsets."""
        result: list[list[TokenInfo]] = []
        for item in inputs:
            sources = (item,) if isinstance(item, str) else item
            enc = self._tok.encode(
                sources[0],
                sources[1] if len(sources) == 2 else None,
                add_special_tokens=add_special_tokens,
            )
            tokens: list[TokenInfo] = []
            for tid, token, special, (start, stop), seq in zip(
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
                            text=sources[seq][start:stop],
                            special=False,
                            start=start,
                            stop=stop,
                        )
                    )
            result.append(tokens)
        return result
