"""Request and response bodies of every route (pydantic).

Requests validate strictly (no silent coercion of `"1"` to `1` or `1` to `"1"`), so a wrong type
is a 422 naming the field, like TEI's serde-based router. Unknown fields are ignored, as TEI and
Cohere do. Inputs with several accepted shapes (TEI `/predict` `inputs`, Cohere `documents`) are
parsed by hand: a pydantic union would report one error per union member, which names internal
types instead of the caller's mistake. Their errors use the `reranker_input` error type, whose
message already names the field (see `app._validation_message`).

Routes return the response models declared here, so FastAPI checks what is sent against the
OpenAPI schema. Optional fields left None are dropped from the body on the routes that declare
`response_model_exclude_none` (TEI's `text` appears only when asked for).

The published schema says what the server enforces: texts the service refuses when empty or blank
carry `minLength: 1` and `pattern: \\S` (the service's 400 `Empty` keeps TEI's status, so these
are published, not checked by pydantic); `/tokenize` inputs carry `minLength: 1` and `/decode`
sequences `minItems: 1` (empty ones get 400 `Empty` too, as in TEI); arrays bounded by
`--max-client-batch-size` carry `x-max-client-batch-size`, which `api/schema_limits.py` turns into `maxItems` with the server's
value. Integer fields take 5.0 as 5, as JSON Schema's `integer` does. Every string must be valid
Unicode (a lone surrogate such as `"\\ud800"` in the JSON is a 422 naming the field): the
tokenizer and the JSON encoder cannot take one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

INPUT_ERROR = "reranker_input"
# Marks an array whose length --max-client-batch-size bounds (see api/schema_limits.py).
CLIENT_BATCH_KEY = "x-max-client-batch-size"
# A text the service scores: not empty, not only whitespace (else 400 `Empty`).
SCORED_TEXT_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": "\\S"}


def unicode_problem(value: str) -> str | None:
    """Why `value` is not valid Unicode text (JSON may carry a lone surrogate, `"\\ud800"`,
    which no tokenizer or UTF-8 encoder takes), or None."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        return (
            f"Input should be valid Unicode text, found a lone surrogate U+{code:04X} at "
            f"character {exc.start}; send UTF-8 text"
        )
    return None


def _unicode(value: str) -> str:
    problem = unicode_problem(value)
    if problem is not None:
        raise PydanticCustomError("unicode_text", problem)
    return value


def _unicode_at(value: str, where: str) -> str:
    """The same check for hand-parsed inputs, whose errors name the field themselves."""
    problem = unicode_problem(value)
    if problem is not None:
        raise PydanticCustomError(INPUT_ERROR, "{where}: " + problem, {"where": where})
    return value


# Any string a client sends that the server reads, echoes or tokenizes.
UnicodeStr = Annotated[str, AfterValidator(_unicode)]
# A query or text that is scored: also documented as non-empty and not blank.
ScoredText = Annotated[UnicodeStr, WithJsonSchema(SCORED_TEXT_SCHEMA)]


def _whole_number(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer, and so do JSON encoders that write every number
    as a float: accept it as 5. (Strings and 5.5 stay errors.)"""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A positive integer count; 5.0 counts too (see _whole_number).
PositiveInt = Annotated[int, Gt(0), BeforeValidator(_whole_number)]


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# "right" / "Right" / "RIGHT" all accepted: TEI's enum is PascalCase, BEI's docs lower case.
TruncationDirection = Annotated[
    Literal["right", "left"],
    BeforeValidator(_lower),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^([Rr][Ii][Gg][Hh][Tt]|[Ll][Ee][Ff][Tt])$",
            "description": "right or left, in any case (TEI sends Right/Left).",
            "examples": ["right", "left"],
        }
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


_MAX_CHUNKS_DESCRIPTION = (
    "Score a text too long for the model as up to this many windows (each paired with the whole "
    "query) and keep the best window's score; default: the server's --max-chunks-per-doc "
    "(1: no chunking)."
)


# ---------------------------------------------------------------------------------------------
# TEI / BEI


class RerankRequest(_Request):
    """`POST /rerank`: exactly BEI's (TEI's) request."""

    query: ScoredText = Field(description="The query every text is scored against.")
    texts: list[ScoredText] = Field(
        description="Texts to rank; at most --max-client-batch-size.",
        json_schema_extra={"minItems": 1, CLIENT_BATCH_KEY: True},
    )
    raw_scores: bool = Field(False, description="Return raw logits instead of sigmoid(logit).")
    return_text: bool = Field(False, description="Echo each text in its result.")
    truncate: bool | None = Field(
        None,
        description="Cut pairs longer than the model's limit (true) or refuse them with 422 "
        "(false); absent or null: the server's --auto-truncate (default true, as TEI).",
    )
    truncation_direction: TruncationDirection = Field(
        "right", description="Which end of the text to cut: right (default) or left; any case."
    )
    max_chunks_per_doc: PositiveInt | None = Field(None, description=_MAX_CHUNKS_DESCRIPTION)


class RankItem(BaseModel):
    index: int = Field(description="Position of the text in the request's `texts`.")
    score: float = Field(description="sigmoid(logit), or the raw logit with raw_scores.")
    text: str | None = Field(None, description="Only present when return_text was true.")
    chunks: int | None = Field(
        None, description="Windows the text was scored as; only present when chunking is on."
    )
    truncated: bool | None = Field(
        None,
        description="Part of the text was not scored (cut, or windows beyond "
        "max_chunks_per_doc); only present when chunking is on.",
    )


# TEI's wording (router/src/http/types.rs, PredictInputVisitor::expecting), so a TEI user reads
# the message they know.
_PREDICT_EXPECTING = (
    "expected a string, a pair of strings [string, string] or a batch of mixed strings and pairs "
    "[[string], [string, string], ...]"
)


def _predict_error(where: str, problem: str) -> PydanticCustomError:
    return PydanticCustomError(
        INPUT_ERROR,
        "{where}: {problem}, {expecting}",
        {"where": where, "problem": problem, "expecting": _PREDICT_EXPECTING},
    )


def _predict_batch_item(value: Any, where: str) -> str | tuple[str, str]:
    """One item of a batch: [text] or [text_a, text_b]."""
    if not isinstance(value, list):
        raise _predict_error(where, "invalid type")
    if not all(isinstance(v, str) for v in value):
        raise _predict_error(where, "invalid type")
    if len(value) == 1:
        return _unicode_at(value[0], f"{where}.0")
    if len(value) == 2:
        return (_unicode_at(value[0], f"{where}.0"), _unicode_at(value[1], f"{where}.1"))
    raise _predict_error(where, f"invalid length {len(value)}")


def parse_predict_inputs(value: Any) -> tuple[bool, list[str | tuple[str, str]]]:
    """TEI's `PredictInput`, exactly (types.rs): a string, or an array whose first element
    decides. A string first: ONE input, `[a]` a single text, `[a, b]` a pair, a third element
    refused. An array first: a batch, every item `[text]` or `[text_a, text_b]`.
    Returns (single, inputs)."""
    if isinstance(value, str):
        return True, [_unicode_at(value, "inputs")]
    if not isinstance(value, list):
        raise _predict_error("inputs", "invalid type")
    if not value:
        raise _predict_error("inputs", "invalid length 0")
    first = value[0]
    if isinstance(first, str):
        if len(value) > 2:
            raise _predict_error("inputs", f"invalid length {len(value)}")
        if not all(isinstance(v, str) for v in value):
            raise _predict_error("inputs.1", "invalid type")
        parts = [_unicode_at(v, f"inputs.{i}") for i, v in enumerate(value)]
        return True, [parts[0]] if len(parts) == 1 else [(parts[0], parts[1])]
    return False, [_predict_batch_item(v, f"inputs.{i}") for i, v in enumerate(value)]


_STRINGS = {"type": "array", "items": SCORED_TEXT_SCHEMA}

# TEI's PredictInput schema (types.rs, `ToSchema for PredictInput`), with what the server
# enforces: no empty or blank text, `[text]` alone is a single input too, a batch of 1 to
# --max-client-batch-size inputs.
PredictInputs = Annotated[
    Any,
    WithJsonSchema(
        {
            "description": (
                "Model input: a single string, a pair of strings, or a batch of mixed single "
                "strings and pairs, each in a list: [[text], [text_a, text_b], ...]."
            ),
            "oneOf": [
                {**SCORED_TEXT_SCHEMA, "description": "A single string"},
                {
                    **_STRINGS,
                    "minItems": 1,
                    "maxItems": 2,
                    "description": "A single string or a pair of strings, in a list",
                },
                {
                    "type": "array",
                    "description": "A batch",
                    "minItems": 1,
                    CLIENT_BATCH_KEY: True,
                    "items": {
                        "oneOf": [
                            {**_STRINGS, "minItems": 1, "maxItems": 1},
                            {**_STRINGS, "minItems": 2, "maxItems": 2},
                        ]
                    },
                },
            ],
            "example": "What is Deep Learning?",
        }
    ),
]


class PredictRequest(_Request):
    """`POST /predict`: TEI's request. `inputs` is parsed exactly as TEI parses it
    (`parse_predict_inputs`): one input answers a list of {label, score}, a batch a list of
    such lists."""

    inputs: PredictInputs
    raw_scores: bool = Field(
        False, description="Raw logits instead of sigmoid (1 label) / softmax."
    )
    truncate: bool | None = Field(
        None,
        description="As /rerank's: absent or null means the server's --auto-truncate.",
    )
    truncation_direction: TruncationDirection = "right"

    @field_validator("inputs", mode="before")
    @classmethod
    def _parse_inputs(cls, value: Any) -> Any:
        single, items = parse_predict_inputs(value)
        # How errors name a single input: as sent, a bare string or pair is `inputs` (a pair's
        # texts `inputs[0]`, `inputs[1]`), a one-text list `[text]` is `inputs[0]`.
        name = "inputs[0]" if isinstance(value, list) and len(value) == 1 else "inputs"
        return {"single": single, "items": items, "name": name if single else None}

    @property
    def single(self) -> bool:
        return bool(self.inputs["single"])

    @property
    def single_name(self) -> str | None:
        """What errors call the one input of the single form (None for a batch)."""
        name = self.inputs["name"]
        return str(name) if name is not None else None

    @property
    def items(self) -> list[str | tuple[str, str]]:
        return list(self.inputs["items"])


class VertexRequest(_Request):
    """`POST /vertex`: TEI's Vertex AI request; each instance is a /rerank or /predict body."""

    instances: Annotated[
        list[dict[str, Any]],
        WithJsonSchema(
            {
                "type": "array",
                "items": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/RerankRequest"},
                        {"$ref": "#/components/schemas/PredictRequest"},
                    ]
                },
            }
        ),
    ] = Field(description="Each a /rerank body (query, texts) or else a /predict body (inputs).")


class Prediction(BaseModel):
    label: str
    score: float


# A text to tokenize: blank is fine, empty is refused (400 `Empty`, as TEI's tokenizer).
_TOKENIZED_TEXT_SCHEMA = {"type": "string", "minLength": 1}


class TokenizeRequest(_Request):
    """`POST /tokenize`: TEI's request (strings only)."""

    inputs: Annotated[
        Any,
        WithJsonSchema(
            {
                "anyOf": [
                    _TOKENIZED_TEXT_SCHEMA,
                    {
                        "type": "array",
                        "items": _TOKENIZED_TEXT_SCHEMA,
                        "minItems": 1,
                        CLIENT_BATCH_KEY: True,
                    },
                ]
            }
        ),
    ]
    add_special_tokens: bool = True
    # Typed as a string so a name gets TEI's own 422 (route), published as what is accepted.
    prompt_name: Annotated[str | None, WithJsonSchema({"type": "null"})] = Field(
        None,
        description="TEI's sentence-transformers prompt; rerankers have none, so only null.",
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _parse_inputs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [_unicode_at(value, "inputs")]
        if isinstance(value, list):
            for i, v in enumerate(value):
                if not isinstance(v, str):
                    raise PydanticCustomError(
                        INPUT_ERROR,
                        "{where}: Input should be a valid string",
                        {"where": f"inputs.{i}"},
                    )
                _unicode_at(v, f"inputs.{i}")
            return value
        raise PydanticCustomError(
            INPUT_ERROR, "inputs: Input should be a string or a list of strings"
        )


_TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}  # TEI: u32
# A sequence to decode: not empty (400 `Empty`, as TEI's tokenizer).
_TOKEN_IDS_SCHEMA = {"type": "array", "items": _TOKEN_ID_SCHEMA, "minItems": 1}


def _token_ids(value: Any, where: str) -> list[int]:
    if isinstance(value, list):
        value = [_whole_number(v) for v in value]  # 5.0 is the integer 5, as in JSON Schema
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v < 2**32 for v in value):
        raise PydanticCustomError(
            INPUT_ERROR,
            "{where}: Input should be a list of token ids (integers >= 0)",
            {"where": where},
        )
    return value


class DecodeRequest(_Request):
    """`POST /decode`: TEI's request. `ids` is one list of token ids, or a list of such lists."""

    ids: Annotated[
        Any,
        WithJsonSchema(
            {
                "oneOf": [
                    _TOKEN_IDS_SCHEMA,
                    {
                        "type": "array",
                        "minItems": 1,
                        CLIENT_BATCH_KEY: True,
                        "items": _TOKEN_IDS_SCHEMA,
                    },
                ]
            }
        ),
    ]
    skip_special_tokens: bool = True

    @field_validator("ids", mode="before")
    @classmethod
    def _parse_ids(cls, value: Any) -> Any:
        # TEI (untagged InputIds): a list of integers is one sequence; otherwise a batch.
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return [_token_ids(v, f"ids.{i}") for i, v in enumerate(value)]
        return [_token_ids(value, "ids")]

    @property
    def sequences(self) -> list[list[int]]:
        return list(self.ids)


class VertexResponse(BaseModel):
    predictions: list[list[RankItem] | list[Prediction] | list[list[Prediction]]]


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = None
    stop: int | None = None


# ---------------------------------------------------------------------------------------------
# Cohere v2 / Jina


def _parse_documents(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise PydanticCustomError(INPUT_ERROR, "documents: Input should be a valid list")
    out: list[str] = []
    for i, doc in enumerate(value):
        if isinstance(doc, str):
            out.append(_unicode_at(doc, f"documents.{i}"))
        elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
            out.append(_unicode_at(doc["text"], f"documents.{i}.text"))
        else:
            raise PydanticCustomError(
                INPUT_ERROR,
                "{where}: Input should be a string or an object with a string `text`",
                {"where": f"documents.{i}"},
            )
    return out


Documents = Annotated[
    list[str],
    BeforeValidator(_parse_documents),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            CLIENT_BATCH_KEY: True,
            "items": {
                "anyOf": [
                    SCORED_TEXT_SCHEMA,
                    {
                        "type": "object",
                        "properties": {"text": SCORED_TEXT_SCHEMA},
                        "required": ["text"],
                    },
                ]
            },
        }
    ),
]


def _only_text_ranked(value: list[str] | None) -> list[str] | None:
    """Cohere v1's rank_fields: a document is scored by its `text` only, so any other field
    list is refused (422) instead of silently scoring something else than asked."""
    if value is not None and value != ["text"]:
        raise PydanticCustomError(
            INPUT_ERROR,
            'rank_fields: only ["text"] is supported (each document is scored by its `text`); '
            "send each document as one string holding the fields to score, e.g. "
            '"title: ...\\ntext: ..."',
        )
    return value


class _ApiRerankRequest(_Request):
    model: UnicodeStr | None = Field(
        None, description="Accepted for compatibility; echoed, not checked."
    )
    query: ScoredText
    documents: Documents = Field(description='Strings or {"text": ...} objects.')
    top_n: PositiveInt | None = Field(None, description="Return only the n best; default all.")
    max_tokens_per_doc: PositiveInt | None = Field(
        None, description="Cut each document to this many tokens before scoring."
    )
    max_chunks_per_doc: PositiveInt | None = Field(None, description=_MAX_CHUNKS_DESCRIPTION)
    rank_fields: Annotated[
        list[str] | None,
        AfterValidator(_only_text_ranked),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "array", "items": {"enum": ["text"]}, "minItems": 1, "maxItems": 1},
                    {"type": "null"},
                ]
            }
        ),
    ] = Field(
        None,
        description='Cohere v1: the document fields to score. Only ["text"] (the default) is '
        "supported; anything else is refused rather than ignored.",
    )


class CohereRerankRequest(_ApiRerankRequest):
    """`POST /v2/rerank` (Cohere v2). Long documents are truncated, never refused."""

    return_documents: bool = Field(False, description="Include each document as {text}.")


class JinaRerankRequest(_ApiRerankRequest):
    """`POST /v1/rerank` (Jina). Long documents are truncated, never refused."""

    return_documents: bool = Field(True, description="Include each document as {text}.")


class DocumentText(BaseModel):
    text: str


class ApiRerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = Field(None, description="Only with return_documents.")
    truncated: bool = Field(
        description="Part of the document was not scored: cut to fit the model, by "
        "max_tokens_per_doc, or windows beyond max_chunks_per_doc (extension)."
    )
    chunks: int = Field(1, description="Windows the document was scored as (extension).")


class CohereBilledUnits(BaseModel):
    search_units: int


class CohereTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class CohereApiVersion(BaseModel):
    version: str = "2"


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits
    tokens: CohereTokens


class CohereRerankResponse(BaseModel):
    id: str
    results: list[ApiRerankResult]
    meta: CohereMeta


class JinaUsage(BaseModel):
    total_tokens: int


class JinaRerankResponse(BaseModel):
    id: str
    model: str
    results: list[ApiRerankResult]
    usage: JinaUsage
    # Cohere's v1 SDK posts to the same path: its `meta` too (api_version "1").
    meta: CohereMeta


# ---------------------------------------------------------------------------------------------
# Operations


class ErrorBody(BaseModel):
    error: str
    error_type: str


class ModelCard(BaseModel):
    """One served model, as OpenAI's and vLLM's `GET /v1/models` list it (and Infinity's
    `/models`)."""

    id: str = Field(description="The served model name (the `model` of Cohere/vLLM responses).")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time this server started.")
    owned_by: str = "reranker-runtime"
    root: str = Field(description="Where the weights came from: the hub id or the directory.")
    max_model_len: int = Field(description="Tokens of one (query, text) pair, at most.")
    capabilities: list[str] = Field(description='["rerank"] for a reranker, ["classify"] else.')


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class InfoResponse(BaseModel):
    model_id: str
    model_sha: str | None = Field(description="Revision the weights came from, when known.")
    served_model_name: str
    model_type: dict[str, Any] = Field(
        description='TEI shape: {"reranker": {"id2label": ...}} or {"classifier": {...}}.'
    )
    architecture: str
    num_labels: int
    engine: str
    device: str
    model_dtype: str
    torch_threads: int | None = Field(
        description="CPU threads of one forward pass (PyTorch engines); CPU requests: "
        "torch_threads x cpu_workers CPUs."
    )
    cpu_workers: int | None = Field(
        default=None,
        description="Forward passes run at once on CPU (--cpu-workers); null on GPUs.",
    )
    cpu_kernels: str | None = Field(
        default=None,
        description="Packed engine on CPU: the linear layers' kernels, onednn or aten "
        "(--cpu-kernels); null for other engines and devices.",
    )
    max_input_length: int
    max_batch_tokens: int = Field(description="Tokens per forward pass, engine caps applied.")
    max_batch_requests: int | None = Field(
        description="Sequences per forward pass, engine caps applied; null: no limit but tokens."
    )
    max_client_batch_size: int
    max_concurrent_requests: int
    auto_truncate: bool
    tokenization_workers: int = Field(description="Threads that tokenize requests.")
    ready: bool = Field(description="Same as GET /health returning 200.")
    version: str
    sha: str | None = Field(description="Git commit of this build (RERANKER_GIT_SHA), if set.")
    docker_label: str | None = Field(description="Image label (DOCKER_LABEL), if set.")


class StatusBody(BaseModel):
    status: Literal["ok", "alive"]


# ---------------------------------------------------------------------------------------------
# vLLM's Score API (`POST /score`, `/v1/score`)

# vLLM's names for the two sides, in the order its ScoreRequest union tries them.
SCORE_FIELD_PAIRS = (
    ("queries", "documents"),
    ("queries", "items"),
    ("data_1", "data_2"),
    ("text_1", "text_2"),
)


def _parse_score_inputs(value: Any, info: ValidationInfo) -> list[str] | None:
    """A string (one text) or a list of strings: vLLM's `ScoreInputs` for text."""
    field = info.field_name
    if value is None:
        return None
    if isinstance(value, str):
        return [_unicode_at(value, str(field))]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_unicode_at(v, f"{field}.{i}") for i, v in enumerate(value)]
    raise PydanticCustomError(
        INPUT_ERROR, "{field}: Input should be a string or a list of strings", {"field": field}
    )


ScoreInputs = Annotated[
    list[str] | None,
    BeforeValidator(_parse_score_inputs),
    WithJsonSchema(
        {
            "anyOf": [
                SCORED_TEXT_SCHEMA,
                {
                    "type": "array",
                    "minItems": 1,
                    CLIENT_BATCH_KEY: True,
                    "items": SCORED_TEXT_SCHEMA,
                },
                {"type": "null"},  # as if absent
            ]
        }
    ),
]


class ScoreRequest(_Request):
    """`POST /score`, `/v1/score`: vLLM's Score API for text. One side holds one text or N, the
    other N: one text is scored against each of the other side's (1:N), two lists pair up
    element by element (N:N)."""

    # Exactly one of vLLM's pairs of field names is sent (its request types are a union). The
    # schema says `anyOf`: a `oneOf` (exactly one) made schemathesis' run of this route take
    # minutes; a body with two pairs is refused with 422 naming both.
    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        json_schema_extra={
            "anyOf": [{"required": [first, second]} for first, second in SCORE_FIELD_PAIRS]
        },
    )

    model: UnicodeStr | None = Field(None, description="Accepted for compatibility; echoed.")
    queries: ScoreInputs = Field(None, description="First side (with documents or items).")
    documents: ScoreInputs = Field(None, description="Second side, with queries.")
    items: ScoreInputs = Field(None, description="Second side, with queries.")
    data_1: ScoreInputs = Field(None, description="First side (with data_2).")
    data_2: ScoreInputs = Field(None, description="Second side, with data_1.")
    text_1: ScoreInputs = Field(None, description="First side (with text_2).")
    text_2: ScoreInputs = Field(None, description="Second side, with text_1.")
    truncate_prompt_tokens: Annotated[int, Ge(-1), BeforeValidator(_whole_number)] | None = Field(
        None,
        description="-1: cut each pair to the model's maximum input length; absent or null: the "
        "server's --auto-truncate. Other values are refused unless at least that maximum.",
    )
    use_activation: bool | None = Field(
        None, description="false: raw logits instead of sigmoid(logit); default true."
    )
    activation: bool | None = Field(None, description="Deprecated vLLM name of use_activation.")
    softmax: bool | None = Field(None, description="Deprecated vLLM name of use_activation.")

    def _pairs_given(self) -> list[tuple[str, str]]:
        return [p for p in SCORE_FIELD_PAIRS if all(getattr(self, f) is not None for f in p)]

    @model_validator(mode="after")
    def _one_pair_of_fields(self) -> ScoreRequest:
        given = self._pairs_given()
        if len(given) != 1:
            names = " or ".join(f"{a} and {b}" for a, b in SCORE_FIELD_PAIRS)
            found = ", ".join(" and ".join(p) for p in given) or "none"
            raise PydanticCustomError(
                INPUT_ERROR,
                "send exactly one pair of fields to score: {names} (found: {found})",
                {"names": names, "found": found},
            )
        # A field of another pair, sent alone, is a mistake the client should hear of (and
        # unchecked it could carry what the schema refuses).
        stray = [
            f
            for pair in SCORE_FIELD_PAIRS
            for f in pair
            if f not in given[0] and getattr(self, f) is not None
        ]
        if stray:
            raise PydanticCustomError(
                INPUT_ERROR,
                "{stray}: sent with {first} and {second}, but belongs to another pair of fields; "
                "send exactly one pair",
                {"stray": stray[0], "first": given[0][0], "second": given[0][1]},
            )
        return self

    @property
    def sides(self) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
        """((name, texts) of the first side, (name, texts) of the second)."""
        ((first, second),) = self._pairs_given()
        return (first, getattr(self, first)), (second, getattr(self, second))

    @property
    def activation_on(self) -> bool:
        """vLLM's get_use_activation: the deprecated softmax, then activation, then
        use_activation; true when none is set."""
        for value in (self.softmax, self.activation, self.use_activation):
            if value is not None:
                return value
        return True


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage
