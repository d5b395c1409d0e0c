"""Packed ("padding-free") PyTorch engine: its own forward pass over a BERT-family checkpoint.

All sequences of a batch are concatenated into one token stream `[T, hidden]`; nothing is padded,
so a batch costs the sum of its lengths (`EngineInfo.padded = False`) and the batcher fills it to
the whole `--max-batch-tokens` budget. The forward pass is the checkpoint's own weights run by
this module (transformers' XLM-R/BERT accept packed input only on flash-attn paths that need extra
packages, and their default position ids would run across sequence boundaries):

    embeddings   word[ids] + type[types] + position[pos]; pos = arange(len) per sequence,
                 + padding_idx + 1 for the RoBERTa family (RoBERTa, XLM-R), as transformers does
    24x layer    fused QKV projection -> variable-length attention -> out proj + LayerNorm ->
                 FFN + LayerNorm (post-LN, exactly transformers' BertLayer)
    head         on each sequence's first token: RoBERTa/XLM-R dense -> tanh -> out_proj;
                 BERT pooler dense -> tanh -> classifier (transformers' heads, dropout off)

The head reads each sequence's first token only, so the last layer runs its output projection
and FFN for first tokens only; on CPU (the grouped backend) also its query projection and its
attention (one query per sequence against all of the sequence's keys and values).

Attention backends (`ATTENTION_BACKENDS`), chosen at load:

    varlen   `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10; flash/cuDNN kernels on
             CUDA, float16/bfloat16, compute capability >= 8.0), called positionally since its
             keyword names changed between releases; chosen by default only after one tiny
             call at load has run on this GPU (else nested, with a warning)
    nested   SDPA on nested jagged tensors: the CUDA fallback (older PyTorch, float32, sm_75)
    grouped  the CPU backend: one dense SDPA call per run of equal-length sequences (they are
             packed sorted by length), on plain views of the stream: no padding, no mask.
             PyTorch's CPU flash kernel is much slower with a mask, so this beat runs of
             similar lengths padded and masked for every length mix measured (bench/
             cpu_attention.py; docs/benchmarks.md)

On CUDA the host packs into one pinned int32 buffer, copies it with one non-blocking transfer and
reads the logits back through a pinned buffer; optional CUDA graphs (one per token-count and
sequence-count bucket, captured on first use) and `torch.compile` are off by default until a GPU
measurement (`reranker-runtime gpu-check`) says they help.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reranker_runtime.engines.base import (
    EncodedPair,
    Engine,
    EngineInfo,
    gpu_max_batch_size,
    packed_warmup_passes,
    release_cached_memory,
)
from reranker_runtime.engines.cpu_kernels import (
    LinearKernel,
    activation_of,
    choose_cpu_kernels,
    make_linear,
)
from reranker_runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

ENGINE_NAME = "pytorch-packed"
ATTENTION_BACKENDS = ("varlen", "nested", "grouped")
# A varlen call: (q, k, v, cu_seq_q, cu_seq_k, max_q, max_k) -> out [T, heads, head_dim].
VarlenFn = Callable[..., Any]


def _import_varlen() -> VarlenFn | None:
    try:  # PyTorch >= 2.10
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - depends on the installed PyTorch
        return None
    return varlen_attn


_varlen_attn: VarlenFn | None = _import_varlen()


# ------------------------------------------------------------------------------------------
# Model family (reranker_runtime.model_family holds the rules; this is what the forward needs)


@dataclass(frozen=True)
class FamilyFacts:
    position_offset: int  # first position id: padding_idx + 1 for RoBERTa/XLM-R, 0 for BERT
    head: str  # "roberta" (dense, tanh, out_proj) | "bert" (pooler dense, tanh, classifier)
    uses_token_type_ids: bool  # BERT's segment ids; RoBERTa/XLM-R have one (all-zero) type


def family_facts(config: Any) -> FamilyFacts:
    """What the packed forward pass needs to know about a checkpoint's model family."""
    from reranker_runtime.model_family import ModelFamily, UnsupportedModelError

    try:
        family = ModelFamily.from_config(config)
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from exc
    position_type = getattr(config, "position_embedding_type", None) or "absolute"
    if position_type != "absolute":
        raise ModelLoadError(
            f"the packed engine supports absolute position embeddings only, this model has "
            f"{position_type!r}; use --engine torch for this model"
        )
    return FamilyFacts(
        position_offset=family.position_offset,
        head="bert" if family.model_type == "bert" else "roberta",
        uses_token_type_ids=family.uses_token_type_ids,
    )


# ------------------------------------------------------------------------------------------
# Host-side packing


@dataclass(frozen=True)
class PackedBatch:
    """A batch as one token stream, sequences in `order` (longest first)."""

    input_ids: np.ndarray  # int32 [T]
    position_ids: np.ndarray  # int32 [T]
    token_type_ids: np.ndarray  # int32 [T]
    lengths: np.ndarray  # int32 [n], in stream order
    cu_seqlens: np.ndarray  # int32 [n + 1]: stream offsets of the sequences, then T
    order: np.ndarray  # int64 [n]: stream position i holds batch[order[i]]

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())

    @property
    def min_len(self) -> int:
        return int(self.lengths.min())

    def chunks(self) -> tuple[AttentionChunk, ...]:
        """The runs of equal-length sequences the grouped backend attends in one call each."""
        out: list[AttentionChunk] = []
        lengths = self.lengths.tolist()
        starts = self.cu_seqlens.tolist()
        first = 0
        while first < len(lengths):
            last = first + 1
            while last < len(lengths) and lengths[last] == lengths[first]:
                last += 1
            count = last - first
            out.append(AttentionChunk(starts[first], starts[last], count, lengths[first]))
            first = last
        return tuple(out)


@dataclass(frozen=True)
class AttentionChunk:
    """Sequences [start, end) of the stream, `count` of `length` tokens each: a plain
    [count, length, ...] view of the stream, attended in one dense SDPA call."""

    start: int
    end: int
    count: int
    length: int


def pack(
    batch: Sequence[EncodedPair],
    *,
    position_offset: int,
    use_token_type_ids: bool,
    max_input_length: int,
    vocab_size: int,
    type_vocab_size: int,
) -> PackedBatch:
    """Concatenate a batch, longest sequence first, with per-sequence position ids. Raises
    ValueError for inputs the model cannot take (checked here: on CUDA an out-of-range index
    would be a device-side assert that poisons the whole process)."""
    lengths_in = np.fromiter((len(p.input_ids) for p in batch), dtype=np.int64, count=len(batch))
    if len(batch) == 0:
        raise ValueError("cannot pack an empty batch")
    if lengths_in.min() < 1:
        raise ValueError("every sequence needs at least one token")
    longest = int(lengths_in.max())
    if longest > max_input_length:
        raise ValueError(
            f"a sequence of {longest} tokens exceeds the model's limit of {max_input_length}"
        )
    order = np.argsort(-lengths_in, kind="stable")
    ordered = [batch[i] for i in order]
    lengths = lengths_in[order].astype(np.int32)
    total = int(lengths.sum())
    cu = np.zeros(len(batch) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.fromiter(
        itertools.chain.from_iterable(p.input_ids for p in ordered), dtype=np.int32, count=total
    )
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}) for this model")
    starts = np.repeat(cu[:-1], lengths)
    positions = np.arange(total, dtype=np.int32) - starts + np.int32(position_offset)
    if use_token_type_ids and any(p.token_type_ids is not None for p in ordered):
        for p in ordered:
            if p.token_type_ids is not None and len(p.token_type_ids) != len(p.input_ids):
                raise ValueError(
                    f"token_type_ids has {len(p.token_type_ids)} entries for {len(p.input_ids)} input_ids"
                )
        types = np.fromiter(
            itertools.chain.from_iterable(
                p.token_type_ids if p.token_type_ids is not None else [0] * len(p.input_ids)
                for p in ordered
            ),
            dtype=np.int32,
            count=total,
        )
        if types.min() < 0 or types.max() >= type_vocab_size:
            raise ValueError(f"token_type_ids must be in [0, {type_vocab_size}) for this model")
    else:
        types = np.zeros(total, dtype=np.int32)
    return PackedBatch(ids, positions, types, lengths, cu, order)


# ------------------------------------------------------------------------------------------
# The forward pass


class _Layer(torch.nn.Module):
    """One encoder layer's weights as the packed forward pass runs them. The projections are
    cpu_kernels.LinearKernel objects, not modules: `.to()`/`state_dict()` do not see them."""

    def __init__(
        self, hf_layer: Any, hidden_act: Any, kernels: str, first_token_queries: bool = False
    ) -> None:
        super().__init__()
        sa, so = hf_layer.attention.self, hf_layer.attention.output
        inter, out = hf_layer.intermediate, hf_layer.output
        # Fused QKV: one [3H, H] GEMM instead of three [H, H] ones. A last layer that computes
        # queries for first tokens only has a query projection and a fused [2H, H] KV one.
        self.qkv: LinearKernel | None = None
        self.q: LinearKernel | None = None
        self.kv: LinearKernel | None = None
        if first_token_queries:
            self.q = make_linear(kernels, sa.query.weight, sa.query.bias)
            self.kv = make_linear(
                kernels,
                torch.cat([sa.key.weight, sa.value.weight]),
                torch.cat([sa.key.bias, sa.value.bias]),
            )
        else:
            self.qkv = make_linear(
                kernels,
                torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
                torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]),
            )
        self.attn_out = make_linear(kernels, so.dense.weight, so.dense.bias)
        self.attn_norm = so.LayerNorm
        activation = activation_of(hidden_act, inter.intermediate_act_fn)
        self.ffn_in = make_linear(kernels, inter.dense.weight, inter.dense.bias, activation)
        self.ffn_out = make_linear(kernels, out.dense.weight, out.dense.bias)
        self.ffn_norm = out.LayerNorm


class PackedEncoder(torch.nn.Module):
    """A BERT-family sequence classifier run on a packed token stream."""

    def __init__(
        self, hf_model: Any, facts: FamilyFacts, attention: str, kernels: str = "aten"
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}")
        config = hf_model.config
        base = hf_model.base_model
        emb = base.embeddings
        self.attention = attention
        self.num_heads = int(config.num_attention_heads)
        self.hidden = int(config.hidden_size)
        self.head_dim = self.hidden // self.num_heads
        self.word = emb.word_embeddings
        self.position = emb.position_embeddings
        self.token_type = emb.token_type_embeddings
        self.emb_norm = emb.LayerNorm
        # The grouped (CPU) backend's last layer computes queries and attention for each
        # sequence's first token only: the head reads nothing else. (The GPU backends keep the
        # full last layer until a GPU measurement shows the split pays off there.)
        hf_layers = list(base.encoder.layer)
        self.layers = torch.nn.ModuleList(
            _Layer(
                layer,
                config.hidden_act,
                kernels,
                first_token_queries=attention == "grouped" and i == len(hf_layers) - 1,
            )
            for i, layer in enumerate(hf_layers)
        )
        self.head_kind = facts.head
        if facts.head == "roberta":
            self.head_dense = hf_model.classifier.dense
            self.head_out = hf_model.classifier.out_proj
        else:
            if base.pooler is None:
                raise ModelLoadError("this BERT checkpoint has no pooler; use --engine torch")
            self.head_dense = base.pooler.dense
            self.head_out = hf_model.classifier
        if kernels == "onednn":
            # The linear layers now hold oneDNN copies of their weights; copy the rest too
            # (embeddings, norms, head), so nothing keeps the checkpoint's memory-mapped
            # safetensors file alive: it would stay resident next to the copies (2.8 GiB
            # instead of 1.7 for the benchmark's large model, docs/benchmarks.md).
            self._apply(torch.Tensor.clone)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        first_tokens: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_len: int,
        chunks: tuple[AttentionChunk, ...] | None = None,
        min_len: int | None = None,
    ) -> torch.Tensor:
        """Logits [len(first_tokens), num_labels] for a packed stream of T tokens.

        `first_tokens` indexes each sequence's first token in the stream; `cu_seqlens` (int32,
        [n + 1]) and `max_len` drive the varlen/nested backends, `chunks` the grouped one.
        `min_len` spares the nested backend a device-to-host read of the shortest length in
        every attention call (PyTorch computes it from the offsets when it is not given)."""
        x = self.word(input_ids) + self.token_type(token_type_ids)
        x = self.emb_norm(x + self.position(position_ids))
        offsets = (
            cu_seqlens.long() if self.attention == "nested" and cu_seqlens is not None else None
        )
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, _Layer)
            tokens = x.shape[0]
            if layer.qkv is None:  # the grouped backend's last layer (see __init__)
                assert layer.q is not None and layer.kv is not None and chunks is not None
                kv = layer.kv(x).view(tokens, 2, self.num_heads, -1)
                x = x.index_select(0, first_tokens)
                q = layer.q(x).view(x.shape[0], self.num_heads, -1)
                a = _first_token_attention(q, kv, chunks).reshape(x.shape[0], self.hidden)
            else:
                qkv = layer.qkv(x).view(tokens, 3, self.num_heads, -1)
                q, k, v = qkv.unbind(1)
                if self.attention == "varlen":
                    assert _varlen_attn is not None and cu_seqlens is not None
                    a = _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
                elif self.attention == "nested":
                    assert offsets is not None
                    a = _nested_attention(q, k, v, offsets, max_len, min_len)
                else:
                    assert chunks is not None
                    a = _grouped_attention(qkv, chunks)
                a = a.reshape(tokens, self.hidden)
                if i == last:
                    # The head reads only each sequence's first token.
                    a, x = a.index_select(0, first_tokens), x.index_select(0, first_tokens)
            # x is a fresh tensor here (embeddings, norm or index_select output): add_to may
            # accumulate into it.
            x = layer.attn_norm(layer.attn_out.add_to(a, x))
            x = layer.ffn_norm(layer.ffn_out.add_to(layer.ffn_in(x), x))
        if not self.layers:
            x = x.index_select(0, first_tokens)
        return self.head_out(torch.tanh(self.head_dense(x)))


def _nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    min_len: int | None,
) -> torch.Tensor:
    def jagged(t: torch.Tensor) -> torch.Tensor:
        nt = torch.nested.nested_tensor_from_jagged(
            t.contiguous(), offsets, min_seqlen=min_len, max_seqlen=max_len
        )
        return nt.transpose(1, 2)  # [n, heads, j, head_dim]

    out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v))
    return out.transpose(1, 2).values()


def _grouped_attention(qkv: torch.Tensor, chunks: tuple[AttentionChunk, ...]) -> torch.Tensor:
    """Dense SDPA per run of equal-length sequences (the CPU backend)."""
    tokens, _, heads, dim = qkv.shape
    out = qkv.new_empty(tokens, heads, dim)
    for c in chunks:
        seg = qkv[c.start : c.end].view(c.count, c.length, 3, heads, dim)
        q, k, v = (seg[:, :, i].transpose(1, 2) for i in range(3))  # [count, heads, L, dim]
        o = F.scaled_dot_product_attention(q, k, v)
        out[c.start : c.end] = o.transpose(1, 2).reshape(c.end - c.start, heads, dim)
    return out


def _first_token_attention(
    q: torch.Tensor, kv: torch.Tensor, chunks: tuple[AttentionChunk, ...]
) -> torch.Tensor:
    """The grouped backend's attention for one query per sequence (its first token) over all of
    the sequence's keys: q [n, heads, dim], kv [T, 2, heads, dim] -> [n, heads, dim]."""
    _, _, heads, dim = kv.shape
    out = torch.empty_like(q)
    first = 0  # chunks hold consecutive sequences
    for c in chunks:
        seg = kv[c.start : c.end].view(c.count, c.length, 2, heads, dim)
        k, v = (seg[:, :, i].transpose(1, 2) for i in range(2))  # [count, heads, L, dim]
        queries = q[first : first + c.count].unsqueeze(2)  # [count, heads, 1, dim]
        out[first : first + c.count] = F.scaled_dot_product_attention(queries, k, v).squeeze(2)
        first += c.count
    return out


def choose_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """varlen on CUDA (fp16/bf16, sm_80+, PyTorch >= 2.10, a head size the flash kernel takes),
    nested on other CUDA setups, grouped on CPU."""
    if device.type != "cuda":
        return "grouped"
    if (
        _varlen_attn is not None
        and dtype in (torch.float16, torch.bfloat16)
        and varlen_takes_head_dim(head_dim)
        and torch.cuda.get_device_capability(device) >= (8, 0)
    ):
        return "varlen"
    return "nested"


def varlen_probe_error(
    device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int
) -> str | None:
    """One tiny varlen_attn call (two sequences, 5 tokens) on `device`: None if it ran and gave
    the right shape, else the error. PyTorch's flash kernels check the GPU's architecture when
    called, not when imported, and a build may have none for a GPU newer than it (Blackwell:
    unverified), which would otherwise pass `choose_attention` and fail at warm-up."""
    if _varlen_attn is None:
        return "this PyTorch has no torch.nn.attention.varlen"
    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(5, num_heads, head_dim, generator=generator).to(device, dtype)
        cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
        out = _varlen_attn(q, q, q, cu_seqlens, cu_seqlens, 3, 3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if tuple(out.shape) != tuple(q.shape) or not bool(torch.isfinite(out).all()):
            return f"varlen_attn returned {tuple(out.shape)} (non-finite or the wrong shape)"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def usable_attention(
    device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int
) -> str:
    """`choose_attention`, and where that picks varlen on a GPU, proof that its kernel runs there:
    a failed probe (`varlen_probe_error`) logs a warning naming the GPU and the error, and the
    engine runs the nested backend instead."""
    backend = choose_attention(device, dtype, head_dim)
    if backend != "varlen" or device.type != "cuda":
        return backend
    error = varlen_probe_error(device, dtype, num_heads, head_dim)
    if error is None:
        return backend
    try:
        gpu = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{gpu} (sm_{major}{minor})"
    except Exception:  # naming the GPU must not fail the load
        gpu = str(device)
    logger.warning(
        "varlen attention does not run on %s (%s); using the nested backend",
        gpu,
        error[:300],
        extra={"attention": "nested", "gpu": gpu, "varlen_error": error[:300]},
    )
    return "nested"


def varlen_takes_head_dim(head_dim: int) -> bool:
    """varlen_attn calls the flash kernel directly, which refuses head sizes that are not a
    multiple of 8 or above 256 (SDPA pads them; varlen does not)."""
    return head_dim % 8 == 0 and head_dim <= 256


def default_dtype(device: str) -> str:
    """bfloat16 on GPUs that compute it natively (sm_80+), float16 on older ones, float32 on CPU."""
    if not device.startswith("cuda"):
        return "float32"
    native_bf16 = torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    return "bfloat16" if native_bf16 else "float16"


# ------------------------------------------------------------------------------------------
# CUDA execution: pinned staging buffers, one transfer per batch, optional CUDA graphs


def graph_span(longest: int, max_len: int) -> int:
    """A CUDA graph's max_seqlen for a batch whose longest sequence is `longest`: the next power
    of two (at least 64), at most the model's `max_len`, so a few graphs cover every length."""
    return min(max_len, max(64, 1 << max(0, longest - 1).bit_length()))


def _bucket(value: int, minimum: int) -> int:
    """Round up to at most 1/8 above: 8 buckets per power of two, at least `minimum`."""
    value = max(value, minimum)
    step = max(minimum, 1 << max(0, value.bit_length() - 4))
    return -(-value // step) * step


class _Slot:
    """One batch's staging: pinned host buffer, device buffer, the event of its copy, and the
    pinned buffer and event its logits come back through."""

    def __init__(self, device: torch.device, num_labels: int) -> None:
        self.device = device
        self.host = torch.empty(0, dtype=torch.int32).pin_memory()
        self.dev = torch.empty(0, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event()
        self.out = torch.empty((0, num_labels), dtype=torch.float32).pin_memory()
        # The host waits on this one for every batch: sleep, don't spin a CPU core that
        # tokenization needs (GPU nodes often have few vCPUs per GPU).
        self.done = torch.cuda.Event(blocking=True)

    def queue_read_back(self, logits: torch.Tensor, n: int, stream: torch.cuda.Stream) -> None:
        """Queue the copy of the first `n` logits into pinned memory, then the `done` event."""
        if self.out.shape[0] < n:
            self.out = torch.empty((n, self.out.shape[1]), dtype=torch.float32).pin_memory()
        self.out[:n].copy_(logits[:n].float(), non_blocking=True)
        self.done.record(stream)

    def logits(self, n: int) -> np.ndarray:
        """Wait for the queued read-back, then the logits (a copy: the buffer is reused)."""
        self.done.synchronize()
        return self.out[:n].numpy().copy()

    def fill(self, size: int) -> np.ndarray:
        """A host view of `size` int32 to write the batch into (grown once, then reused)."""
        if self.host.numel() < size:
            grown = size + size // 4
            self.host = torch.empty(grown, dtype=torch.int32).pin_memory()
            self.dev = torch.empty(grown, dtype=torch.int32, device=self.device)
        return self.host.numpy()[:size]


class _CudaRunner:
    """Runs the encoder on one GPU. Two staging slots let a second caller pack its batch and copy
    it to the device (one non-blocking transfer from pinned memory, on a copy stream) while the
    first one's forward pass runs. Forward passes are queued one at a time on one stream, and
    each caller waits for its logits (through its slot's pinned memory) after letting go of the
    queue: the next pass's kernels are launched while this one runs, so the GPU does not idle
    through the launches. Optional CUDA graphs replay per (tokens, sequences) bucket (waited
    for under the lock: their staging buffer is shared)."""

    def __init__(
        self,
        model: torch.nn.Module,
        forward: Callable[..., torch.Tensor],
        device: torch.device,
        *,
        num_labels: int,
        max_input_length: int,
        pad_id: int,
        position_offset: int,
        cuda_graphs: bool,
        max_graphs: int = 64,
    ) -> None:
        self._model = model
        self._forward = forward
        self._device = device
        self._max_len = max_input_length
        self._pad_id = pad_id
        self._offset = position_offset
        self._graphs_enabled = cuda_graphs
        self._max_graphs = max_graphs
        # (tokens, rows, span) -> its graph (see _graph_for)
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._graph_pool: Any = None
        self.capture_error: str | None = None  # the first failed capture's, once graphs are off
        with torch.cuda.device(device):  # pinned memory and streams belong to `device`
            self._stream = torch.cuda.Stream(device=device)  # forward passes
            self._copy_stream = torch.cuda.Stream(device=device)  # host-to-device staging
            self._slots: queue.Queue[_Slot] = queue.Queue()
            for _ in range(2):
                self._slots.put(_Slot(device, num_labels))
            # Staging for CUDA-graph runs (used under the run lock only).
            self._graph_slot = _Slot(device, num_labels)
            # The fused weights were made on the default stream; forward passes run on
            # self._stream, which does not wait for it.
            torch.cuda.synchronize(device)
        self._run_lock = threading.Lock()  # one forward pass at a time

    def run(self, packed: PackedBatch) -> np.ndarray:
        n, total = len(packed.lengths), packed.num_tokens
        with torch.cuda.device(self._device):
            if self._graphs_enabled:
                with self._run_lock, torch.cuda.stream(self._stream):
                    graph = self._graph_for(total, n, packed.max_len)
                    if graph is not None:
                        return graph.run(packed, self)
            slot = self._slots.get()  # a free slot: its previous batch has completed
            try:
                # Layout: ids | positions | types | cu_seqlens | first tokens.
                size = 3 * total + 2 * n + 1
                host = slot.fill(size)
                host[:total] = packed.input_ids
                host[total : 2 * total] = packed.position_ids
                host[2 * total : 3 * total] = packed.token_type_ids
                host[3 * total : 3 * total + n + 1] = packed.cu_seqlens
                host[3 * total + n + 1 :] = packed.cu_seqlens[:-1]
                dev = slot.dev[:size]
                with torch.cuda.stream(self._copy_stream):
                    dev.copy_(slot.host[:size], non_blocking=True)
                    slot.copied.record(self._copy_stream)
                with self._run_lock, torch.cuda.stream(self._stream):
                    self._stream.wait_event(slot.copied)
                    try:
                        logits = self._forward(
                            dev[:total],
                            dev[total : 2 * total],
                            dev[2 * total : 3 * total],
                            dev[3 * total + n + 1 :],
                            dev[3 * total : 3 * total + n + 1],
                            packed.max_len,
                            None,
                            packed.min_len,
                        )
                        slot.queue_read_back(logits, n, self._stream)
                    except BaseException:
                        self._settle(slot)
                        raise
                # Outside the lock: the next caller queues its pass behind this one meanwhile.
                # (The slot goes back only once its pass is done, so its buffers are free.)
                return slot.logits(n)
            finally:
                self._slots.put(slot)

    def _settle(self, slot: _Slot) -> None:
        """After a failed pass: let the slot's copy and the kernels already queued finish before
        the slot is reused. A CUDA error that broke the context raises again here; the original
        error is the one reported."""
        with contextlib.suppress(Exception):
            slot.copied.synchronize()
            self._stream.synchronize()

    def _graph_for(self, total: int, n: int, longest: int) -> _Graph | None:
        if not self._graphs_enabled:
            return None
        # The graph's max_seqlen: the batch's longest sequence rounded up to a power of two, not
        # the model's limit. Flash attention launches blocks for max_seqlen, so short pairs on
        # an 8192-token model (bge-reranker-v2-m3) would start 32x the blocks they need.
        span = graph_span(longest, self._max_len)
        tokens = _bucket(total, 128)
        # Padding tokens form extra sequences of at most `span` tokens each.
        spare = -(-(tokens - total) // span)
        rows = _bucket(n + spare, 8)
        key = (tokens, rows, span)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self._max_graphs:
                return None  # eager for shapes beyond the cap (memory stays bounded)
            try:
                graph = _Graph.capture(self, tokens, rows, span)
            except Exception as exc:  # out of memory on a small GPU, an op capture refuses
                # This batch and every later one run eager instead of failing. Every later
                # shape too: on PyTorch <= 2.11 a failed capture can leave the caching
                # allocator believing a capture is still under way (pytorch#180395), so a
                # further capture (or empty_cache) would fail an internal assert.
                self._graphs_enabled = False
                self.capture_error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "CUDA graph capture failed; this engine runs without graphs from now on",
                    extra={"tokens": tokens, "sequences": rows, "error": str(exc)},
                )
                return None
            self._graphs[key] = graph
            logger.info(
                "captured a CUDA graph",
                extra={"tokens": tokens, "sequences": rows, "max_seqlen": span},
            )
        return graph

    @property
    def graph_stats(self) -> dict[str, Any]:
        """What the CUDA graphs did so far: a report can tell a graphed run from an eager one."""
        return {
            "graphs_enabled": self._graphs_enabled,
            "graphs_captured": len(self._graphs),
            "graph_capture_error": self.capture_error,
        }

    def close(self) -> None:
        with self._run_lock:
            self._graphs.clear()
            self._graph_pool = None


class _Graph:
    """One captured forward pass over a fixed stream of `tokens` tokens and `rows` sequences of
    at most `span` tokens each (the attention's max_seqlen).

    A batch of T <= tokens tokens in n sequences fills the stream; the remaining tokens form
    padding sequences of at most `span` tokens, and the remaining rows are empty sequences
    (cu_seqlens repeats `tokens`), which the flash kernel skips. Their logits are discarded."""

    def __init__(
        self, tokens: int, rows: int, span: int, static: torch.Tensor, logits: torch.Tensor
    ) -> None:
        self.tokens, self.rows, self.span = tokens, rows, span
        self.static = static
        self.logits = logits
        self.graph: Any = None

    @staticmethod
    def layout(
        packed: PackedBatch | None, tokens: int, rows: int, max_len: int, pad_id: int, offset: int
    ) -> np.ndarray:
        """The static int32 buffer: ids | positions | types | cu_seqlens [rows + 1] | first [rows]."""
        buf = np.zeros(3 * tokens + 2 * rows + 1, dtype=np.int32)
        total = packed.num_tokens if packed is not None else 0
        n = len(packed.lengths) if packed is not None else 0
        lengths = list(packed.lengths) if packed is not None else []
        pad = tokens - total
        lengths += [max_len] * (pad // max_len) + ([pad % max_len] if pad % max_len else [])
        if len(lengths) > rows:
            raise ValueError(f"{len(lengths)} sequences do not fit a graph of {rows} rows")
        cu = np.full(rows + 1, tokens, dtype=np.int32)
        cu[0] = 0
        np.cumsum(np.asarray(lengths, dtype=np.int32), out=cu[1 : len(lengths) + 1])
        ids, pos, types = buf[:tokens], buf[tokens : 2 * tokens], buf[2 * tokens : 3 * tokens]
        ids[:] = pad_id
        starts = np.repeat(cu[: len(lengths)], lengths)
        pos[:] = np.arange(tokens, dtype=np.int32) - starts + offset
        if packed is not None:
            ids[:total] = packed.input_ids
            types[:total] = packed.token_type_ids
        buf[3 * tokens : 3 * tokens + rows + 1] = cu
        first = buf[3 * tokens + rows + 1 :]
        first[:n] = cu[:n]
        return buf

    @classmethod
    def capture(cls, runner: _CudaRunner, tokens: int, rows: int, span: int) -> _Graph:
        layout = cls.layout(None, tokens, rows, span, runner._pad_id, runner._offset)
        static = torch.from_numpy(layout).to(runner._device)
        max_len = max(span, 1)

        def forward() -> torch.Tensor:
            return runner._forward(
                static[:tokens],
                static[tokens : 2 * tokens],
                static[2 * tokens : 3 * tokens],
                static[3 * tokens + rows + 1 :],
                static[3 * tokens : 3 * tokens + rows + 1],
                max_len,
                None,
            )

        # Warm up on a side stream first (kernel selection, cuBLAS workspaces), as
        # torch.cuda.graphs documents, then capture into the shared memory pool.
        side = torch.cuda.Stream(device=runner._device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the other callers wait for their logits (cudaEventSynchronize) outside
        # the run lock, and CUDA's default "global" mode would fail their waits (and this
        # capture) while any thread captures.
        with torch.cuda.graph(graph, pool=runner._graph_pool, capture_error_mode="thread_local"):
            logits = forward()
        runner._graph_pool = graph.pool()
        out = cls(tokens, rows, span, static, logits)
        out.graph = graph
        return out

    def run(self, packed: PackedBatch, runner: _CudaRunner) -> np.ndarray:
        """Stage the batch into the static buffer and replay (under the runner's run lock, on
        its forward stream, so the copy is ordered after the previous replay's reads)."""
        n = len(packed.lengths)
        layout = self.layout(
            packed, self.tokens, self.rows, self.span, runner._pad_id, runner._offset
        )
        slot = runner._graph_slot
        slot.fill(layout.size)[:] = layout
        self.static.copy_(slot.host[: layout.size], non_blocking=True)
        self.graph.replay()
        slot.queue_read_back(self.logits, n, runner._stream)
        return slot.logits(n)  # waited for here: the next graph run refills this slot


# ------------------------------------------------------------------------------------------
# The engine


class PackedEngine(Engine):
    """Scores packed (padding-free) batches with its own forward pass over the checkpoint."""

    reentrant_on_cpu = True  # the CPU forward pass mutates only its own tensors

    def __init__(
        self,
        encoder: PackedEncoder,
        tokenizer: Any,
        info: EngineInfo,
        facts: FamilyFacts,
        *,
        vocab_size: int,
        type_vocab_size: int,
        compile_model: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self._encoder = encoder
        self._tokenizer = tokenizer
        self._info = info
        self._facts = facts
        self._vocab_size = vocab_size
        self._type_vocab_size = type_vocab_size
        self._device = torch.device(info.device)
        forward: Callable[..., torch.Tensor] = encoder
        if compile_model:
            forward = torch.compile(encoder, dynamic=True)
        self._forward = forward
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0
        self._cuda: _CudaRunner | None = None
        if self._device.type == "cuda":
            # The batcher may call score twice at once: the second packs and copies its batch
            # while the first one's forward pass runs.
            self.max_concurrent_scores = 2
            self._cuda = _CudaRunner(
                encoder,
                forward,
                self._device,
                num_labels=info.num_labels,
                max_input_length=info.max_input_length,
                pad_id=self._pad_id,
                position_offset=facts.position_offset,
                cuda_graphs=cuda_graphs and encoder.attention == "varlen",
            )

    @classmethod
    def load(
        cls,
        model: str,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        *,
        max_seq_len: int | None = None,
        source: tuple[str, str | None] | None = None,
        attention: str | None = None,
        compile_model: bool = False,
        cuda_graphs: bool = False,
        cpu_kernels: str = "auto",
    ) -> PackedEngine:
        """Load and validate a checkpoint (as the PyTorch engine does), then build the packed
        forward pass over its weights. Raises ModelLoadError."""
        from reranker_runtime.engines.torch_engine import TorchEngine, resolve_device

        dev = resolve_device(device)
        if (dtype or "auto").strip().lower() == "auto":
            dtype = default_dtype(dev)
        padded = TorchEngine.load(
            model, revision, dev, dtype, max_seq_len=max_seq_len, source=source
        )
        return cls.from_torch_engine(
            padded,
            attention=attention,
            compile_model=compile_model,
            cuda_graphs=cuda_graphs,
            cpu_kernels=cpu_kernels,
        )

    @classmethod
    def from_torch_engine(
        cls,
        padded: Any,
        *,
        attention: str | None = None,
        compile_model: bool = False,
        cuda_graphs: bool = False,
        cpu_kernels: str = "auto",
    ) -> PackedEngine:
        """Reuse a loaded TorchEngine's validated model, tokenizer and limits. `cpu_kernels`
        (auto | onednn | aten, see engines/cpu_kernels.py) applies on CPU without
        torch.compile (which traces PyTorch's own ops); on GPUs the linear layers are
        PyTorch's own."""
        hf_model = padded._model  # the engine's own transformers model (same package)
        config = hf_model.config
        facts = family_facts(config)
        base = padded.info
        device = torch.device(base.device)
        dtype = next(hf_model.parameters()).dtype
        head_dim = config.hidden_size // config.num_attention_heads  # as PackedEncoder's
        backend = attention or usable_attention(
            device, dtype, int(config.num_attention_heads), head_dim
        )
        if backend == "varlen" and _varlen_attn is None:
            raise ModelLoadError(
                "this PyTorch has no torch.nn.attention.varlen (needs PyTorch >= 2.10)"
            )
        if backend == "varlen" and not varlen_takes_head_dim(head_dim):
            raise ModelLoadError(
                f"attention 'varlen' cannot take this model's head size {head_dim} (the flash "
                "kernel needs a multiple of 8, at most 256); use attention 'nested'"
            )
        kernels = "aten"
        if device.type == "cpu":
            if compile_model and cpu_kernels == "onednn":
                raise ModelLoadError(
                    "--cpu-kernels onednn and --torch-compile exclude each other (the compiled "
                    "forward pass runs PyTorch's own linear layers); drop one of them"
                )
            if compile_model:
                logger.info(
                    "cpu kernels aten (torch.compile traces PyTorch's own ops)",
                    extra={"cpu_kernels": "aten", "requested": cpu_kernels},
                )
            else:
                layers = hf_model.base_model.encoder.layer
                activation = (
                    activation_of(config.hidden_act, layers[0].intermediate.intermediate_act_fn)
                    if len(layers)
                    else None
                )
                ffn_shape = (config.hidden_size, config.intermediate_size)
                try:
                    choice = choose_cpu_kernels(cpu_kernels, dtype, activation, ffn_shape)
                except ValueError as exc:
                    raise ModelLoadError(str(exc)) from exc
                kernels = choice.kernels
                logger.info(
                    "cpu kernels %s (%s)",
                    kernels,
                    choice.reason,
                    extra={
                        "cpu_kernels": kernels,
                        "requested": cpu_kernels,
                        "onednn_speedup": (
                            round(choice.onednn_speedup, 2)
                            if choice.onednn_speedup is not None
                            else None
                        ),
                        "torch_threads": torch.get_num_threads(),
                    },
                )
        encoder = PackedEncoder(hf_model, facts, backend, kernels).eval()
        info = EngineInfo(
            name=ENGINE_NAME,
            model_id=base.model_id,
            revision=base.revision,
            device=base.device,
            dtype=base.dtype,
            architecture=base.architecture,
            num_labels=base.num_labels,
            max_input_length=base.max_input_length,
            padded=False,
            max_batch_size=gpu_max_batch_size(base.device),
            max_batch_tokens=None,
            id2label=dict(base.id2label),
            extra={
                "attention": backend,
                "model_type": config.model_type,
                "torch_threads": torch.get_num_threads(),
                "torch_compile": compile_model,
                "cuda_graphs": cuda_graphs and backend == "varlen",
                "cpu_kernels": kernels if device.type == "cpu" else None,
            },
        )
        if cuda_graphs and backend != "varlen":
            logger.warning(
                "CUDA graphs need the varlen attention backend; running without them",
                extra={"attention": backend},
            )
        logger.info(
            "packed engine ready",
            extra={"attention": backend, "dtype": info.dtype, "linear_kernels": kernels},
        )
        return cls(
            encoder,
            padded.tokenizer,
            info,
            facts,
            vocab_size=int(config.vocab_size),
            type_vocab_size=int(getattr(config, "type_vocab_size", 1) or 1),
            compile_model=compile_model,
            cuda_graphs=cuda_graphs,
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def pack(self, batch: Sequence[EncodedPair]) -> PackedBatch:
        return pack(
            batch,
            position_offset=self._facts.position_offset,
            use_token_type_ids=self._facts.uses_token_type_ids,
            max_input_length=self._info.max_input_length,
            vocab_size=self._vocab_size,
            type_vocab_size=self._type_vocab_size,
        )

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        if not batch:
            return np.zeros((0, self._info.num_labels), dtype=np.float32)
        packed = self.pack(batch)  # host work: runs while another call's pass is on the GPU
        with torch.inference_mode():
            # CUDA: the runner serialises the forward passes itself; CPU: reentrant, so
            # --cpu-workers passes may run at once.
            runner = self._cuda.run if self._cuda is not None else self._run_cpu
            logits = runner(packed)
        # Back to the caller's order.
        out = np.empty_like(logits)
        out[packed.order] = logits
        return out

    def _run_cpu(self, packed: PackedBatch) -> np.ndarray:
        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(self._device)

        cu = tensor(packed.cu_seqlens)
        logits = self._forward(
            tensor(packed.input_ids),
            tensor(packed.position_ids),
            tensor(packed.token_type_ids),
            cu[:-1],
            cu,
            packed.max_len,
            packed.chunks() if self._encoder.attention == "grouped" else None,
            packed.min_len,
        )
        return logits.float().cpu().numpy()

    def warmup_plan(self, max_batch_tokens: int) -> list[tuple[int, int]]:
        """On GPUs `packed_warmup_passes`; on CPU the padded engine's bounded plan
        (`warmup_passes`: no allocator to grow, and a full-budget pass is slow there)."""
        if self._cuda is None:
            return super().warmup_plan(max_batch_tokens)
        return packed_warmup_passes(
            max_batch_tokens, self._info.max_input_length, self._info.max_batch_size
        )

    @property
    def graph_stats(self) -> dict[str, Any]:
        """The CUDA runner's graph_stats; on CPU, graphs off and none captured."""
        if self._cuda is None:
            return {"graphs_enabled": False, "graphs_captured": 0, "graph_capture_error": None}
        return self._cuda.graph_stats

    def close(self) -> None:
        if self._cuda is not None:
            self._cuda.close()
            with torch.cuda.device(self._device):
                release_cached_memory()
