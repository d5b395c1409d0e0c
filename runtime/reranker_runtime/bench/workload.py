"""Seeded rerank workload: one query and N passages (30-200 words each) per request.

Everything is derived from `random.Random` with integer seeds, so a (seed, index) pair gives the
same request on every machine and every Python 3 version (`random()`/`randrange` are stable).
Request `i` depends only on (seed, i), which lets a duration-bound run draw as many requests as it
needs without changing the ones before.

The text is English-like: Zipf-weighted function words and common vocabulary mixed with topic
words, in sentences of 6-24 words. Sub-word tokenizers split it about as they split real prose
(roughly 1.2-1.5 tokens per word), so the pair lengths, and therefore padding and batch shapes,
resemble a real reranking workload (MS MARCO-style passages). Some passages share the query's
topic, the others are drawn from other topics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate

# Ranked roughly by frequency in English text; weights below are Zipf over this order.
_COMMON = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "more",
    "can",
    "will",
    "no",
    "other",
    "its",
    "what",
    "about",
    "who",
    "some",
    "them",
    "into",
    "only",
    "time",
    "also",
    "then",
    "these",
    "than",
    "new",
    "two",
    "like",
    "so",
    "first",
    "may",
    "people",
    "after",
    "most",
    "over",
    "many",
    "any",
    "year",
    "could",
    "should",
    "used",
    "made",
    "such",
    "where",
    "between",
    "each",
    "well",
    "because",
    "while",
    "during",
    "both",
    "under",
    "three",
    "through",
    "those",
    "before",
    "since",
    "world",
    "part",
    "same",
    "however",
    "number",
    "different",
    "much",
    "how",
    "because",
    "system",
    "very",
    "still",
    "years",
    "state",
    "high",
    "small",
    "large",
    "often",
    "around",
    "without",
    "among",
    "important",
    "several",
    "every",
    "group",
    "found",
    "within",
    "given",
    "world",
    "based",
    "known",
    "public",
    "early",
    "local",
    "city",
    "water",
    "use",
    "several",
    "number",
    "form",
    "power",
    "data",
    "work",
    "service",
    "development",
    "information",
    "process",
    "market",
    "model",
    "company",
    "research",
    "level",
    "control",
    "health",
    "order",
    "result",
    "study",
    "support",
    "value",
    "area",
    "rate",
    "energy",
    "program",
    "report",
    "plan",
    "policy",
    "government",
    "community",
    "product",
    "network",
    "family",
    "experience",
    "language",
    "design",
    "problem",
    "question",
    "answer",
    "point",
    "price",
    "cost",
    "change",
    "growth",
    "effect",
    "history",
    "practice",
    "field",
    "class",
    "type",
    "range",
    "quality",
    "access",
    "source",
    "record",
    "production",
    "training",
    "method",
    "rule",
    "measure",
]

_VERBS = [
    "is",
    "are",
    "was",
    "include",
    "provide",
    "show",
    "use",
    "make",
    "find",
    "allow",
    "require",
    "describe",
    "support",
    "increase",
    "reduce",
    "improve",
    "affect",
    "produce",
    "create",
    "develop",
    "contain",
    "offer",
    "receive",
    "remain",
    "become",
    "consider",
    "explain",
    "suggest",
    "determine",
    "identify",
    "represent",
    "apply",
    "compare",
    "measure",
    "return",
    "report",
    "build",
    "run",
    "serve",
    "depend",
]

_ADJECTIVES = [
    "new",
    "large",
    "small",
    "high",
    "low",
    "early",
    "recent",
    "major",
    "common",
    "different",
    "important",
    "local",
    "national",
    "global",
    "public",
    "private",
    "simple",
    "complex",
    "general",
    "specific",
    "available",
    "current",
    "similar",
    "modern",
    "natural",
    "human",
    "social",
    "economic",
    "financial",
    "technical",
    "medical",
    "legal",
    "environmental",
    "digital",
    "physical",
    "chemical",
]

_TOPICS: dict[str, list[str]] = {
    "medicine": [
        "patient",
        "doctor",
        "hospital",
        "treatment",
        "disease",
        "symptom",
        "vaccine",
        "therapy",
        "infection",
        "blood",
        "heart",
        "diagnosis",
        "clinical",
        "drug",
        "dose",
        "surgery",
        "cancer",
        "immune",
        "virus",
        "antibiotic",
    ],
    "finance": [
        "bank",
        "loan",
        "interest",
        "mortgage",
        "credit",
        "investment",
        "stock",
        "bond",
        "inflation",
        "tax",
        "budget",
        "account",
        "payment",
        "debt",
        "fund",
        "dividend",
        "currency",
        "savings",
        "insurance",
        "portfolio",
    ],
    "computing": [
        "server",
        "cluster",
        "container",
        "kubernetes",
        "latency",
        "throughput",
        "database",
        "query",
        "index",
        "cache",
        "request",
        "response",
        "token",
        "model",
        "gpu",
        "memory",
        "processor",
        "kernel",
        "network",
        "software",
    ],
    "geography": [
        "river",
        "mountain",
        "capital",
        "city",
        "country",
        "border",
        "population",
        "coast",
        "island",
        "climate",
        "desert",
        "region",
        "valley",
        "lake",
        "ocean",
        "continent",
        "province",
        "border",
        "rainfall",
    ],
    "cooking": [
        "recipe",
        "oven",
        "flour",
        "sugar",
        "butter",
        "salt",
        "pepper",
        "onion",
        "garlic",
        "sauce",
        "chicken",
        "rice",
        "pasta",
        "vegetable",
        "temperature",
        "minutes",
        "boil",
        "bake",
        "fry",
        "ingredient",
    ],
    "history": [
        "empire",
        "war",
        "king",
        "revolution",
        "treaty",
        "century",
        "dynasty",
        "army",
        "colony",
        "battle",
        "ancient",
        "medieval",
        "parliament",
        "constitution",
        "independence",
        "republic",
        "monarch",
        "archive",
    ],
    "sports": [
        "team",
        "player",
        "match",
        "season",
        "league",
        "coach",
        "goal",
        "score",
        "championship",
        "tournament",
        "stadium",
        "referee",
        "training",
        "injury",
        "record",
        "medal",
        "olympic",
        "football",
        "tennis",
    ],
    "law": [
        "court",
        "judge",
        "contract",
        "lawsuit",
        "statute",
        "regulation",
        "liability",
        "defendant",
        "plaintiff",
        "appeal",
        "evidence",
        "license",
        "patent",
        "copyright",
        "attorney",
        "jurisdiction",
        "verdict",
    ],
    "biology": [
        "cell",
        "protein",
        "gene",
        "species",
        "enzyme",
        "membrane",
        "organism",
        "bacteria",
        "plant",
        "animal",
        "evolution",
        "dna",
        "molecule",
        "tissue",
        "habitat",
        "ecosystem",
        "photosynthesis",
        "mutation",
    ],
    "travel": [
        "flight",
        "airport",
        "hotel",
        "visa",
        "passport",
        "ticket",
        "luggage",
        "train",
        "station",
        "tourist",
        "museum",
        "beach",
        "booking",
        "itinerary",
        "destination",
        "reservation",
        "cruise",
        "guide",
    ],
}
_TOPIC_NAMES = sorted(_TOPICS)

_QUESTION_STARTS = (
    "what is",
    "how does",
    "why do",
    "when was",
    "how to",
    "what are the",
    "which",
    "where is the",
    "how much does",
    "is it",
)

_FILLER = _COMMON + _VERBS + _ADJECTIVES
_FILLER_CUM = list(accumulate(1.0 / (rank + 1) ** 0.9 for rank in range(len(_FILLER))))


@dataclass(frozen=True)
class RerankRequest:
    """One /rerank request body's content."""

    query: str
    texts: tuple[str, ...]

    def body(self, **extra: object) -> dict:
        return {"query": self.query, "texts": list(self.texts), **extra}

    def pairs(self) -> list[tuple[str, str]]:
        return [(self.query, t) for t in self.texts]

    @property
    def n_words(self) -> int:
        return sum(len(t.split()) for t in self.texts) + len(self.query.split()) * len(self.texts)


def _sentence(rng: random.Random, topic_words: list[str], n_words: int) -> str:
    words: list[str] = []
    for _ in range(n_words):
        if rng.random() < 0.22:
            words.append(rng.choice(topic_words))
        else:
            words.append(rng.choices(_FILLER, cum_weights=_FILLER_CUM, k=1)[0])
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def passage(rng: random.Random, topic: str, min_words: int = 30, max_words: int = 200) -> str:
    """A passage of exactly `rng.randint(min_words, max_words)` words, in sentences."""
    target = rng.randint(min_words, max_words)
    sentences: list[str] = []
    remaining = target
    while remaining > 0:
        n = min(remaining, rng.randint(6, 24))
        if 0 < remaining - n < 3:  # never leave a sentence of one or two words
            n = remaining
        sentences.append(_sentence(rng, _TOPICS[topic], n))
        remaining -= n
    return " ".join(sentences)


def query(rng: random.Random, topic: str) -> str:
    start = rng.choice(_QUESTION_STARTS)
    n = rng.randint(2, 6)
    words = [
        rng.choice(_TOPICS[topic]) if rng.random() < 0.6 else rng.choice(_FILLER) for _ in range(n)
    ]
    return f"{start} {' '.join(words)}"


def _rng(seed: int, index: int, stream: int = 0) -> random.Random:
    # Integer seeds only: int seeding is stable across Python versions and PYTHONHASHSEED.
    return random.Random((seed * 1_000_003 + index) * 7 + stream)


def make_request(
    seed: int,
    index: int,
    n_passages: int = 16,
    min_words: int = 30,
    max_words: int = 200,
    stream: int = 0,
) -> RerankRequest:
    """Request number `index` of the workload seeded by `seed` (independent of other indices)."""
    rng = _rng(seed, index, stream)
    topic = rng.choice(_TOPIC_NAMES)
    q = query(rng, topic)
    texts = []
    for _ in range(n_passages):
        # About a third of the passages are on the query's topic, the rest on other topics.
        t = topic if rng.random() < 0.35 else rng.choice(_TOPIC_NAMES)
        texts.append(passage(rng, t, min_words, max_words))
    return RerankRequest(query=q, texts=tuple(texts))


def make_requests(seed: int, n: int, n_passages: int = 16, **kw: int) -> list[RerankRequest]:
    return [make_request(seed, i, n_passages, **kw) for i in range(n)]


# Separate streams so the warm-up, lone and fairness requests never coincide with measured ones.
STREAM_LOAD, STREAM_WARMUP, STREAM_LONE, STREAM_FAIRNESS = 0, 1, 2, 3


def fairness_requests(seed: int, large_texts: int = 500) -> tuple[RerankRequest, RerankRequest]:
    """(large, small): one request of `large_texts` passages and one of a single passage."""
    large = make_request(seed, 0, large_texts, stream=STREAM_FAIRNESS)
    small = make_request(seed, 1, 1, stream=STREAM_FAIRNESS)
    return large, small


def training_corpus(seed: int = 12345, n_passages: int = 3000) -> list[str]:
    """Text in the workload's style, for training a benchmark model's tokenizer."""
    rng = random.Random(seed)
    out = []
    for i in range(n_passages):
        topic = _TOPIC_NAMES[i % len(_TOPIC_NAMES)]
        out.append(passage(rng, topic, 10, 80))
        out.append(query(rng, topic))
    return out
