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
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

INPUT_ERROR = "reranker_input"


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# "right" / "Right" / "RIGHT" all accepted: TEI's enum is PascalCase, BEI's docs lower case.
TruncationDirection = Annotated[Literal["right", "left"], BeforeValidator(_lower)]


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

    query: str = Field(description="The query every text is scored against.")
    texts: list[str] = Field(description="Texts to rank; at most --max-client-batch-size.")
    raw_scores: bool = Field(False, description="Return raw logits instead of sigmoid(logit).")
    return_text: bool = Field(False, description="Echo each text in its result.")
    truncate: bool | None = Field(
        False,
        description="Cut pairs longer than the model's limit instead of refusing them (422).",
    )
    truncation_direction: TruncationDirection = Field(
        "right", description="Which end of the text to cut: right (default) or left; any case."
    )
    max_chunks_per_doc: int | None = Field(None, gt=0, description=_MAX_CHUNKS_DESCRIPTION)


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


def _predict_sequence(value: Any, where: str) -> str | tuple[str, str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return (value[0], value[1])
    raise PydanticCustomError(
        INPUT_ERROR,
        "{where}: Input should be a string or a pair [text_a, text_b]",
        {"where": where},
    )


PredictInputs = Annotated[
    Any,
    WithJsonSchema(
        {
            "description": "A string, a pair [text_a, text_b], or a list of strings and pairs.",
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
                {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {"type": "string"},
                                "minItems": 2,
                                "maxItems": 2,
                            },
                        ]
                    },
                },
            ],
        }
    ),
]


class PredictRequest(_Request):
    """`POST /predict`: TEI's request. `inputs` follows TEI's parsing exactly: a string or a
    two-string array is ONE input (a single text or a pair); any other array is a batch."""

    inputs: PredictInputs
    raw_scores: bool = Field(
        False, description="Raw logits instead of sigmoid (1 label) / softmax."
    )
    truncate: bool | None = False
    truncation_direction: TruncationDirection = "right"

    @field_validator("inputs", mode="before")
    @classmethod
    def _parse_inputs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"single": True, "items": [value]}
        if isinstance(value, list):
            if len(value) == 2 and all(isinstance(v, str) for v in value):
                return {"single": True, "items": [(value[0], value[1])]}
            return {
                "single": False,
                "items": [_predict_sequence(v, f"inputs.{i}") for i, v in enumerate(value)],
            }
        raise PydanticCustomError(
            INPUT_ERROR, "inputs: Input should be a string, a pair, or a list of strings and pairs"
        )

    @property
    def single(self) -> bool:
        return bool(self.inputs["single"])

    @property
    def items(self) -> list[str | tuple[str, str]]:
        return list(self.inputs["items"])


class Prediction(BaseModel):
    label: str
    score: float


class TokenizeRequest(_Request):
    """`POST /tokenize`: TEI's request (strings only)."""

    inputs: Annotated[
        Any,
        WithJsonSchema(
            {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
        ),
    ]
    add_special_tokens: bool = True

    @field_validator("inputs", mode="before")
    @classmethod
    def _parse_inputs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            for i, v in enumerate(value):
                if not isinstance(v, str):
                    raise PydanticCustomError(
                        INPUT_ERROR,
                        "{where}: Input should be a valid string",
                        {"where": f"inputs.{i}"},
                    )
            return value
        raise PydanticCustomError(
            INPUT_ERROR, "inputs: Input should be a string or a list of strings"
        )


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
            out.append(doc)
        elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
            out.append(doc["text"])
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
            "items": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "properties": {"text": {"type": "string"}},
                        "required": ["text"],
                    },
                ]
            },
        }
    ),
]


class _ApiRerankRequest(_Request):
    model: str | None = Field(None, description="Accepted for compatibility; echoed, not checked.")
    query: str
    documents: Documents = Field(description='Strings or {"text": ...} objects.')
    top_n: int | None = Field(None, gt=0, description="Return only the n best; default all.")
    max_tokens_per_doc: int | None = Field(
        None, gt=0, description="Cut each document to this many tokens before scoring."
    )
    max_chunks_per_doc: int | None = Field(None, gt=0, description=_MAX_CHUNKS_DESCRIPTION)


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


# ---------------------------------------------------------------------------------------------
# Operations


class ErrorBody(BaseModel):
    error: str
    error_type: str


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
        description="CPU threads of the forward pass (PyTorch engine); size the CPU request to it."
    )
    max_input_length: int
    max_batch_tokens: int = Field(description="Tokens per forward pass, engine caps applied.")
    max_batch_requests: int | None = Field(
        description="Sequences per forward pass, engine caps applied; null: no limit but tokens."
    )
    max_client_batch_size: int
    max_concurrent_requests: int
    auto_truncate: bool
    ready: bool = Field(description="Same as GET /health returning 200.")
    version: str


class StatusBody(BaseModel):
    status: Literal["ok", "alive"]
