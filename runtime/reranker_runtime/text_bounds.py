"""Tokenize only the part of a text that a request can use.

A request with truncation keeps at most a window of tokens from each text, so tokenizing a 10 MB
text whole (millions of tokens, hundreds of MB of `Encoding` objects) is wasted work. The same
holds for a request without truncation: a text over the limit is refused whatever its exact
length. `encode_bounded` tokenizes a piece of the text from the kept end, grows the piece (x4)
until it holds enough *settled* tokens, and returns exactly those.

Why the result equals tokenizing the whole text and cutting after: a `tokenizers` pipeline
normalizes and pre-tokenizes the text into words (pre-tokens), then the model tokenizes each word
on its own. Cutting the text can only change the words at the cut. So a token is settled when it
comes from a word at least `UNSETTLED_WORDS` words away from the cut. A word so long that it
holds the whole window (a run of CJK text without spaces under a Metaspace pre-tokenizer, a long
base64 blob) is handled by distance instead: a token ending `MARGIN_CHARS` characters or more
before the cut is settled. That is exact for WordPiece (a word is cut greedily from its start, and
a word over 100 characters is one `[UNK]` token that spans the cut, never settled) and BPE (merges
are local), and for Unigram it takes the Viterbi paths of the piece and the whole text to agree
more than `MARGIN_CHARS` characters away from the cut, which holds for natural text
(tests/runtime/test_hardening.py checks both kinds of text against whole-text tokenization).

The chunking of long documents into windows calls `encode_bounded` with the tokens of all the
windows it may score instead of one window's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tokenizers import Encoding, Tokenizer

Direction = Literal["right", "left"]  # the end of the text that is cut off

# First piece: this many characters per wanted token (real vocabularies average 3-5 characters
# per token; a piece too short only costs another, larger, try).
CHARS_PER_TOKEN_GUESS = 8
GROWTH = 4
# Words next to the cut that may tokenize differently in the piece than in the whole text.
UNSETTLED_WORDS = 2
# Inside one long word, tokens this far from the cut are settled (see the module docstring).
MARGIN_CHARS = 256


# Characters per encode_batch call: tens of milliseconds of work, so a request whose result nobody
# waits for any more stops within that (the `stop` of encode_bounded_many).
SLICE_CHARS = 65_536


class TokenizationStopped(Exception):
    """Tokenization was stopped (`stop` set): nobody waits for the result any more."""


def raise_if_stopped(stop: threading.Event | None) -> None:
    """TokenizationStopped when `stop` is set: called before each piece of tokenizer work."""
    if stop is not None and stop.is_set():
        raise TokenizationStopped


@dataclass(frozen=True)
class BoundedEncoding:
    """A text's tokens (no special tokens), as many as a caller may use.

    `complete`: `encoding` holds every token of the text. Otherwise the text has at least
    `max_tokens` tokens and `encoding` holds exactly its first (`direction="right"`) or last
    (`"left"`) `max_tokens` tokens, identical to the whole text's.
    """

    encoding: Encoding
    complete: bool


def encode_bounded(
    tokenizer: Tokenizer, text: str, max_tokens: int, direction: Direction = "right"
) -> BoundedEncoding:
    """Tokenize `text` (without special tokens) up to what `max_tokens` tokens need.

    Work and memory scale with `max_tokens`, not with the text's length, except for a text with
    fewer settled tokens than `max_tokens` however long the piece grows (megabytes of whitespace or
    of one word): that one is tokenized whole, in time linear in its length, which the per-request
    character cap (--max-request-characters) bounds.
    """
    return encode_bounded_many(tokenizer, [text], max_tokens, direction)[0]


def encode_bounded_many(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    max_tokens: int,
    direction: Direction = "right",
    *,
    stop: threading.Event | None = None,
) -> list[BoundedEncoding]:
    """`encode_bounded` for each text, with every tokenizer call an `encode_batch`.

    `Tokenizer.encode` holds the GIL for the whole call, `encode_batch` releases it: tokenizing
    texts one by one would serialise every request's tokenization (and stall the event loop)
    behind the longest text. Each round tokenizes the texts still unresolved: whole when they
    are no longer than the round's piece size, else their piece; the size grows (x`GROWTH`) for
    the texts whose piece held too few settled tokens. A round's texts go in slices of about
    `SLICE_CHARS` characters; before each slice, a set `stop` (the request's deadline passed,
    its client left) ends the work with TokenizationStopped.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    out: list[BoundedEncoding | None] = [None] * len(texts)
    pending = list(range(len(texts)))
    size = (max_tokens + UNSETTLED_WORDS) * CHARS_PER_TOKEN_GUESS + MARGIN_CHARS
    while pending:
        whole = [i for i in pending if len(texts[i]) <= size]
        cut = [i for i in pending if len(texts[i]) > size]
        pieces = [_piece(texts[i], size, direction) for i in cut]
        encodings = _encode_in_slices(tokenizer, [texts[i] for i in whole] + pieces, stop)
        for i, encoding in zip(whole, encodings[: len(whole)], strict=True):
            out[i] = BoundedEncoding(encoding, complete=True)
        pending = []
        for i, piece, encoding in zip(cut, pieces, encodings[len(whole) :], strict=True):
            if _settled(encoding, len(piece), direction) >= max_tokens:
                # Encoding.truncate's direction names the end that is removed, like ours.
                encoding.truncate(max_tokens, stride=0, direction=direction)
                out[i] = BoundedEncoding(encoding, complete=False)
            else:
                pending.append(i)
        size *= GROWTH
    return [b for b in out if b is not None]


def _encode_in_slices(
    tokenizer: Tokenizer, texts: list[str], stop: threading.Event | None
) -> list[Encoding]:
    out: list[Encoding] = []
    start = 0
    while start < len(texts):
        raise_if_stopped(stop)
        end, chars = start, 0
        while end < len(texts) and (end == start or chars + len(texts[end]) <= SLICE_CHARS):
            chars += len(texts[end])
            end += 1
        out.extend(tokenizer.encode_batch(texts[start:end], add_special_tokens=False))
        start = end
    return out


def _piece(text: str, size: int, direction: Direction) -> str:
    return text[:size] if direction == "right" else text[len(text) - size :]


def _settled(encoding: Encoding, piece_chars: int, direction: Direction) -> int:
    """How many tokens from the kept end of a piece's encoding are the whole text's too."""
    # Without special tokens every token has a word id; -1 stands in for a missing one.
    word_ids = [-1 if w is None else w for w in encoding.word_ids]
    offsets = encoding.offsets
    n = len(word_ids)
    if n == 0:
        return 0
    if direction == "right":
        last_word = word_ids[-1]
        i = n
        # Walk back from the cut while tokens are unsettled; the settled ones form a prefix.
        while i > 0:
            word, (_, stop) = word_ids[i - 1], offsets[i - 1]
            if 0 <= word <= last_word - UNSETTLED_WORDS or stop <= piece_chars - MARGIN_CHARS:
                break
            i -= 1
        return i
    first_word = word_ids[0]
    i = 0
    while i < n:
        word, (start, _) = word_ids[i], offsets[i]
        if (first_word >= 0 and word >= first_word + UNSETTLED_WORDS) or start >= MARGIN_CHARS:
            break
        i += 1
    return n - i
