"""Tokenization and truncation, with the tokenizer's own special-token layout.

Query and text are tokenized separately without special tokens, truncated by our own rule (the
text is cut in the requested direction and the query kept whole where it fits), then assembled
by the tokenizer's post-processor (`tokenizers.Tokenizer.post_process`), so the result is exactly
what `tokenizer(query, text)` gives when no cut is needed, for any BERT-family template.

transformers 5.x tokenizers have no `build_inputs_with_special_tokens`, and `tokenizer(...)`
switches the shared backend's truncation/padding state on each call, which is not safe from
several threads. We use a private copy of the backend tokenizer with truncation and padding off;
its `encode*` calls are thread-safe and we never change its state.

A text is tokenized only as far as the model can use it (`text_bounds.encode_bounded`: one token
more than the model's window, from the kept end), so a 10 MB text costs what a normal one does,
with or without truncation, and the result is exactly what tokenizing it whole would give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tokenizers import Encoding, Tokenizer

from reranker_runtime.engines.base import EncodedPair
from reranker_runtime.errors import TokenizerError, ValidationError
from reranker_runtime.text_bounds import BoundedEncoding, Direction, encode_bounded

__all__ = ["Direction", "Encoded", "Input", "PairTokenizer", "TokenInfo", "parse_direction"]

Input = str | tuple[str, str]
T = TypeVar("T")


def parse_direction(value: str) -> Direction:
    """'right'/'left' in any case ('Right', 'LEFT'), as TEI clients send them."""
    normalized = str(value).strip().lower()
    if normalized not in ("right", "left"):
        raise ValidationError(f"truncation_direction must be 'right' or 'left', got {value!r}")
    return normalized  # type: ignore[return-value]


@dataclass(frozen=True)
class Encoded:
    """One model input ready for the batcher, plus what the response reports about it."""

    pair: EncodedPair
    num_tokens: int  # tokens the model sees (special tokens included), after any truncation
    original_tokens: int  # tokens before truncation (a lower bound unless `fully_counted`)
    truncated: bool
    # False when a text longer than the model's window was tokenized only as far as the window
    # needs: then (without truncation) num_tokens and original_tokens are lower bounds.
    fully_counted: bool = True


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
        # Tokens worth computing per text: one more than the model takes, so that a text that
        # does not fit is known not to fit.
        self.max_useful_tokens = max_input_length + 1

    def _bounded(self, texts: Sequence[str], direction: Direction) -> list[BoundedEncoding]:
        """Each text's tokens, as far as the model can use them. Texts too short to need a
        bound are tokenized together (encode_batch runs them in parallel)."""
        out: list[BoundedEncoding | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= self.max_useful_tokens]
        for i, enc in zip(
            short,
            self._tok.encode_batch([texts[i] for i in short], add_special_tokens=False),
            strict=True,
        ):
            out[i] = BoundedEncoding(enc, complete=True)
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = encode_bounded(self._tok, text, self.max_useful_tokens, direction)
        return [b for b in out if b is not None]

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
        texts_field: str = "texts",
    ) -> list[Encoded]:
        """Encode (query, text) for each text. Without `truncate`, over-long pairs come back
        untruncated (num_tokens > max_input_length) and the caller rejects them."""
        q = _tokenizing("query", lambda: self._bounded([query], direction)[0])
        encoded = _tokenizing(texts_field, lambda: self._bounded(texts, direction), texts)
        return [self._pair(q, t, truncate=truncate, direction=direction) for t in encoded]

    def encode_inputs(
        self, inputs: Sequence[Input], *, truncate: bool, direction: Direction = "right"
    ) -> list[Encoded]:
        """Encode /predict inputs: single strings or (first, second) pairs."""
        flat = [part for item in inputs for part in ((item,) if isinstance(item, str) else item)]
        parts = iter(_tokenizing("inputs", lambda: self._bounded(flat, direction), inputs))
        out: list[Encoded] = []
        for item in inputs:
            if isinstance(item, str):
                out.append(self._single(next(parts), truncate=truncate, direction=direction))
            else:
                first = next(parts)
                out.append(self._pair(first, next(parts), truncate=truncate, direction=direction))
        return out

    def _single(self, b: BoundedEncoding, *, truncate: bool, direction: Direction) -> Encoded:
        enc = b.encoding
        original = len(enc.ids) + self._special_single
        budget = self.max_input_length - self._special_single
        cut = truncate and len(enc.ids) > budget
        if cut:
            enc.truncate(budget, stride=0, direction=direction)
        return self._finish(enc, None, original, cut, b.complete)

    def _pair(
        self, qb: BoundedEncoding, tb: BoundedEncoding, *, truncate: bool, direction: Direction
    ) -> Encoded:
        q, t = qb.encoding, tb.encoding
        complete = qb.complete and tb.complete
        budget = self.max_input_length - self._special_pair
        nq, nt = len(q.ids), len(t.ids)
        original = nq + nt + self._special_pair
        if not truncate or nq + nt <= budget:
            return self._finish(q, t, original, False, complete)
        # Keep the query whole where it fits, leaving the text at least one token; otherwise
        # cut the query too (in the same direction). Encodings are copied before truncating:
        # truncate() mutates, and the query's encoding is shared by every pair.
        keep_text = max(budget - nq, min(nt, 1))
        keep_query = budget - keep_text
        if keep_query < nq:
            q = _truncated(q, keep_query, direction)
        if keep_text < nt:
            t = _truncated(t, keep_text, direction)
        return self._finish(q, t, original, True, complete)

    def tokens(
        self,
        inputs: Sequence[Input],
        *,
        add_special_tokens: bool = True,
        max_tokens: int | None = None,
    ) -> list[list[TokenInfo]]:
        """TEI /tokenize: every token with its id, text, special flag and offsets.

        With `max_tokens`, a single text yields only its first `max_tokens` tokens (at most one
        more than the model's window: no caller can use more), and only that much of it is
        tokenized; pairs are always tokenized whole."""
        bound = None if max_tokens is None else min(max_tokens, self.max_useful_tokens)
        result: list[list[TokenInfo]] = []
        for i, item in enumerate(inputs):
            sources = (item,) if isinstance(item, str) else tuple(item)

            def encode(parts: tuple[str, ...] = sources) -> Encoding:
                if bound is not None and len(parts) == 1:
                    first = encode_bounded(self._tok, parts[0], bound, "right").encoding
                    return self._tok.post_process(first, None, add_special_tokens)
                pair = parts[1] if len(parts) > 1 else None
                return self._tok.encode(parts[0], pair, add_special_tokens=add_special_tokens)

            enc = _tokenizing(f"inputs[{i}]", encode)
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


def _truncated(enc: Encoding, keep: int, direction: Direction) -> Encoding:
    """A copy of `enc` cut to `keep` tokens (Encoding.truncate works in place)."""
    copy = Encoding.merge([enc], growing_offsets=False)
    copy.truncate(keep, stride=0, direction=direction)
    return copy


def _tokenizing(field: str, run: Callable[[], T], texts: Sequence[object] | None = None) -> T:
    """Run the tokenizer; a text it cannot take is a 422 naming the field (never a 500)."""
    try:
        return run()
    except Exception as exc:  # the tokenizer's errors are TypeError/Exception, not a hierarchy
        where = field
        for i, text in enumerate(texts or ()):
            if _bad_text(text):
                where = f"{field}[{i}]"
                break
        raise TokenizerError(f"`{where}` cannot be tokenized: {_reason(exc)}") from None


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
