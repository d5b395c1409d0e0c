"""tei.v1's message classes, built at import from tei.proto's serialized descriptor.

Built from the descriptor, not imported from protoc's *_pb2.py: generated code refuses a
protobuf runtime older than the protoc that made it, and the runtime image keeps its base
image's protobuf. `POOL` is a private descriptor pool, so nothing here clashes with another
copy of tei.proto that a client library may have registered in the default pool.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool, message_factory

from reranker_runtime.grpc_api.tei_descriptor import SERIALIZED

PACKAGE = "tei.v1"
POOL = descriptor_pool.DescriptorPool()
POOL.AddSerializedFile(SERIALIZED)


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


InfoRequest = _message("InfoRequest")
InfoResponse = _message("InfoResponse")
Metadata = _message("Metadata")
EmbedRequest = _message("EmbedRequest")
EmbedSparseRequest = _message("EmbedSparseRequest")
EmbedAllRequest = _message("EmbedAllRequest")
EmbedResponse = _message("EmbedResponse")
EmbedSparseResponse = _message("EmbedSparseResponse")
EmbedAllResponse = _message("EmbedAllResponse")
PredictRequest = _message("PredictRequest")
PredictPairRequest = _message("PredictPairRequest")
Prediction = _message("Prediction")
PredictResponse = _message("PredictResponse")
RerankRequest = _message("RerankRequest")
RerankStreamRequest = _message("RerankStreamRequest")
Rank = _message("Rank")
RerankResponse = _message("RerankResponse")
EncodeRequest = _message("EncodeRequest")
SimpleToken = _message("SimpleToken")
EncodeResponse = _message("EncodeResponse")
DecodeRequest = _message("DecodeRequest")
DecodeResponse = _message("DecodeResponse")

# Enum values (tei.proto): ModelType and TruncationDirection.
MODEL_TYPE_CLASSIFIER = 1
MODEL_TYPE_RERANKER = 2
TRUNCATION_DIRECTIONS = {0: "right", 1: "left"}


def service_names() -> list[str]:
    """Every service tei.proto declares, fully qualified (`tei.v1.Rerank`, ...)."""
    file = POOL.FindFileByName("tei.proto")
    return [service.full_name for service in file.services_by_name.values()]
