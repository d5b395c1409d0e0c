"""Model backends behind one small interface (`base.Engine`); `factory.create_engine` picks one.

Heavy modules (torch, tensorrt_llm) are imported by the engine modules themselves, not here.
"""

from reranker_runtime.engines.base import EncodedPair, Engine, EngineInfo

__all__ = ["EncodedPair", "Engine", "EngineInfo"]
