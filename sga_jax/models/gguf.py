"""GGUF (llama.cpp) files as a tensor source with HF names, plus the HF config they imply.

Tensors are read memory-mapped with the ``gguf`` package and dequantised one at a time
(``gguf.quants.dequantize``). llama.cpp stores Q and K permuted for its interleaved RoPE; HF uses
the half-split layout, so they are un-permuted:
``w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)``.
Only the Llama architecture is supported from GGUF.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from sga_jax.errors import ModelLoadError
from sga_jax.models.sources import TensorSource

# GGUF name (``{i}`` = block) -> HF name, for general.architecture == "llama".
LLAMA_GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.*)$")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (weights ``[d_out, d_in]`` or biases ``[d_out]``)."""
    d_out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, d_out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(d_out, *rest)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


class GGUFSource(TensorSource):
    def __init__(self, path: Path, reader, n_head: int, n_kv_head: int):
        self.path = path
        self.reader = reader
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self._tensors: dict[str, Any] = {}
        for t in reader.tensors:
            m = _BLOCK.match(t.name)
            key = f"blk.{{i}}.{m.group(2)}" if m else t.name
            if key in LLAMA_GGUF_NAMES:
                hf = LLAMA_GGUF_NAMES[key].format(i=m.group(1) if m else "")
                self._tensors[hf] = t

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantise GGUF tensor {t.name!r} in {self.path}: {e}") from None
        # numpy order is the reverse of GGUF's ne[]: [d_out, d_in] like HF.
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".self_attn.q_proj." in name:
            w = unpermute(w, self.n_head)
        elif ".self_attn.k_proj." in name:
            w = unpermute(w, self.n_kv_head)
        return w

    def close(self) -> None:
        self._tensors.clear()


def open_gguf(path: str | Path) -> tuple[dict[str, Any], GGUFSource]:
    """(HF config dict, tensor source with HF names) for a GGUF file."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported (only 'llama'); convert the model to an HF "
            "safetensors directory instead"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF file {path} lacks the metadata field llama.{key}")
        return value

    try:
        hidden = int(need("embedding_length"))
        n_head = int(need("attention.head_count"))
        n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"GGUF file {path}: a size field is not an integer: {e}") from None
    if min(hidden, n_head, n_kv) < 1:
        raise ModelLoadError(
            f"GGUF file {path}: embedding_length / head_count / head_count_kv must be >= 1, "
            f"got {hidden} / {n_head} / {n_kv}"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens) if tokens is not None else 0))
    names = {t.name for t in reader.tensors}
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_head))
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling_type = _field(reader, "llama.rope.scaling.type")
    if scaling_type in ("linear",):
        hf["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(_field(reader, "llama.rope.scaling.factor", 1.0)),
        }
    return hf, GGUFSource(path, reader, n_head, n_kv)
