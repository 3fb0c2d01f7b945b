"""The thin layer over llama.cpp's C API: a loaded model, its vocabulary, and its contexts."""

from __future__ import annotations

import ctypes
import logging
import os

import llama_cpp

from .backend import ensure_backend, model_buffers
from .encodings import NEEDS_ADAPTER_KEY
from .errors import InvalidGenerationRequest, ModelFileError, ModelLoadError

log = logging.getLogger("runtime.llama_cpp")


class Model:
    """A loaded GGUF model and its vocabulary. Safe to share between threads (read-only).

    `adapter_path` names a LoRA adapter that every context of this model applies (the block
    offsets of a "q4_0_offsets" re-encoding, see `runtime.weights`).
    """

    def __init__(self, path: str, *, n_gpu_layers: int = 0, adapter_path: str = "") -> None:
        self.backend = ensure_backend()
        if not os.path.isfile(path):
            raise ModelFileError(f"model file not found: {path}")
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelFileError(f"not a GGUF file: {path}")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if adapter_path:
            # Such a model's weights are repacked into buffers of their own; a mapping of the
            # file would keep a second copy resident (214 MB against 157 MB at load).
            params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        # MiB of weights per buffer type: CPU_REPACK is the repacked (fast) layout, CPU or
        # CPU_Mapped plain rows, CUDA0... a GPU's.
        with model_buffers() as self.buffer_types:
            self.ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.adapter: ctypes.c_void_p | None = None
        if not adapter_path and _meta(self.ptr, NEEDS_ADAPTER_KEY) is not None:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None
            raise ModelLoadError(f"{path} holds Q4_0 codes without their block offsets: load it with its adapter")
        if adapter_path:
            self.adapter = llama_cpp.llama_adapter_lora_init(self.ptr, adapter_path.encode()) or None
            if self.adapter is None:
                llama_cpp.llama_model_free(self.ptr)
                self.ptr = None
                raise ModelLoadError(f"llama.cpp could not load the adapter {adapter_path} for {path}")
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos = llama_cpp.llama_vocab_get_add_bos(self.vocab)
        # One pass over the vocabulary: end-of-generation tokens, and the texts that tokenise to a
        # control token only when special parsing is on (<|im_start|>...).
        parsed_only = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        eog, controls = set(), set()
        longest = 1
        for t in range(self.n_vocab):
            if llama_cpp.llama_vocab_is_eog(self.vocab, t):
                eog.add(t)
            if llama_cpp.llama_vocab_get_attr(self.vocab, t) & parsed_only and (text := self.special_text(t)):
                controls.add(text)
            longest = max(longest, len(self._render(t, special=True)))
        self.eog = frozenset(eog)
        # No token covers more bytes of text than this, so a text of n characters is at least
        # n // max_token_bytes tokens: a cheap bound that refuses a huge prompt untokenised.
        self.max_token_bytes = longest
        self.control_texts = tuple(sorted(controls, key=len, reverse=True))
        self._pieces: dict[int, bytes] = {}
        template = llama_cpp.llama_model_chat_template(self.ptr, None)
        self.chat_template = template.decode("utf-8", "replace") if template else None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8", "replace")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # cannot happen with len+8 slots, but the API allows it
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise InvalidGenerationRequest("text could not be tokenised")
        return buf[:n]

    def piece(self, token: int) -> bytes:
        """The bytes a token renders to (control tokens render as nothing). Cached per token."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._render(token, special=False)
            self._pieces[token] = cached
        return cached

    def special_text(self, token: int) -> str:
        if token < 0 or token >= self.n_vocab:
            return ""
        return self._render(token, special=True).decode("utf-8", "replace")

    def _render(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def meta(self, key: str) -> str | None:
        return _meta(self.ptr, key)

    def free(self) -> None:
        # An adapter is freed with its model.
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


def _meta(model: ctypes.c_void_p, key: str) -> str | None:
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


_GENERATION_UBATCH = 128


def _kv_types(*, gpu: bool) -> tuple[int, int]:
    """(K, V) cache types: always different (see `new_context`). On CPUs, Q8_0 K and F16 V:
    the attention kernel dots the query against Q8_0 K with int8 instructions, and reads F16
    V without a dequantising pass, which BF16 K + Q8_0 V needed for every cell and query
    head (8 streams at 150-300 tokens of context: 40-46 ms a step against 43-49 ms)."""
    if gpu:
        return llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_Q8_0
    return llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_F16


def new_context(
    model: Model,
    *,
    n_ctx: int,
    n_batch: int,
    n_seq_max: int,
    n_threads: int,
    embeddings: bool = False,
) -> ctypes.c_void_p:
    """Create a llama context.

    Generation contexts get `n_seq_max` KV streams of `n_ctx / n_seq_max` cells each; an
    embedding context (which packs several short inputs into one batch) shares one buffer.
    """
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    # llama.cpp reserves its compute buffer for the largest micro-batch (98 MB at 512 tokens,
    # mostly logits), and a long prompt touches it all. Generation runs prompts through in
    # micro-batches of 128: the same speed here (one output row per prompt), 10 MB less peak
    # RSS. An embedding context keeps whole inputs in one micro-batch, as mean pooling needs.
    params.n_ubatch = n_batch if embeddings else min(n_batch, _GENERATION_UBATCH)
    params.n_seq_max = n_seq_max
    params.n_threads = n_threads
    params.n_threads_batch = n_threads
    params.no_perf = True
    params.swa_full = True  # keep whole-history SWA caches, so prefix reuse works for SWA models too
    # Generation: one KV stream per sequence, not one unified buffer. A sequence's cells then sit in
    # position order, which the attention kernel's reduction order depends on; in a unified
    # buffer a prefix shared by seq_cp and a tail written into freed holes land out of order and
    # change the logits. Cross-stream seq_cp only copies whole streams, so prefix reuse copies
    # the donor's stream and trims it (see _batch_loop.BatchLoop._start_prefill).
    params.kv_unified = embeddings
    # Batch invariance, part two: with K and V of the same 16-bit type, ggml's CPU flash
    # attention switches kernels by batch shape (tiled for >= 64 query rows, split-KV for a lone
    # row over >= 512 cells), and those kernels round differently, so a greedy answer could
    # change with the company it is batched in. K and V of different types keep every row on
    # the one kernel that reduces each sequence's cells in order: the same logits alone or
    # batched. One of the two is Q8_0, which halves its memory (44 MB for the default 8 x 1024
    # cells); which one is `_kv_types`'s choice.
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.type_k, params.type_v = _kv_types(gpu=model.n_gpu_layers != 0)
    if embeddings:
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    if not ctx:  # an architecture without flash attention: plain F16 cache, batch invariance not guaranteed
        log.warning("flash attention with a mixed-type KV cache refused for %s; using an F16 cache", model.path)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.type_k = params.type_v = llama_cpp.GGML_TYPE_F16
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    if not ctx:
        raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens")
    if model.adapter is not None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(model.adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
            llama_cpp.llama_free(ctx)
            raise ModelLoadError(f"llama.cpp could not apply the adapter of {model.path}")
    return ctx
