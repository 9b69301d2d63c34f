"""GGUF (llama.cpp) files as a tensor source with HF names, plus the HF config they imply.

Tensors are read memory-mapped with the ``gguf`` package and dequantised one at a time
(``gguf.quants.dequantize``: F32 / F16 / BF16, Q8_0, Q4_0 / Q5_0 and friends, the K-quants
Q4_K / Q5_K / Q6_K of the ``Q4_K_M`` files and the rest; ``tests/test_gguf_kquants.py`` checks the
K-quants against ggml's formulas re-derived there). Two architectures:

* ``llama``: llama.cpp stores Q and K permuted for its interleaved RoPE; HF uses the half-split
  layout, so they are un-permuted:
  ``w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)``;
* ``gemma3`` (text): not permuted; llama.cpp's converter (``Gemma3Model.modify_tensors``) stores every
  RMSNorm weight as ``1 + w`` (its norm multiplies by the weight), so 1 is subtracted back, as
  transformers' GGUF loader does. The config follows llama.cpp's ``LLM_ARCH_GEMMA3`` hyperparameters:
  local layers unless ``(i + 1) % 6 == 0``, local rope base 10k, attention scale
  ``1/√head_dim`` (27B, 62 blocks: ``1/√(hidden / heads)``), ``rope.scaling`` on global layers.
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
GEMMA3_GGUF_NAMES: dict[str, str] = {
    **{k: v for k, v in LLAMA_GGUF_NAMES.items() if not k.endswith(".bias") and "ffn_norm" not in k},
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# general.architecture -> (name table, un-permute Q/K, norm weights stored as 1 + w)
ARCHITECTURES: dict[str, tuple[dict[str, str], bool, bool]] = {
    "llama": (LLAMA_GGUF_NAMES, True, False),
    "gemma3": (GEMMA3_GGUF_NAMES, False, True),
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
    def __init__(self, path: Path, reader, n_head: int, n_kv_head: int, arch: str = "llama"):
        self.path = path
        self.reader = reader
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        table, self.permuted, self.norm_plus_one = ARCHITECTURES[arch]
        self._tensors: dict[str, Any] = {}
        for t in reader.tensors:
            m = _BLOCK.match(t.name)
            key = f"blk.{{i}}.{m.group(2)}" if m else t.name
            if key in table:
                hf = table[key].format(i=m.group(1) if m else "")
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
        if self.norm_plus_one and name.endswith("norm.weight"):
            return w - np.float32(1.0)
        if not self.permuted:
            return w
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
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported (only {', '.join(map(repr, ARCHITECTURES))}); "
            "convert the model to an HF safetensors directory instead"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF file {path} lacks the metadata field {arch}.{key}")
        return value

    try:
        hidden = int(need("embedding_length"))
        n_head = int(need("attention.head_count"))
        n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"GGUF file {path}: a size field is not an integer: {e}") from None
    if min(hidden, n_head, n_kv) < 1:
        raise ModelLoadError(
            f"GGUF file {path}: embedding_length / head_count / head_count_kv must be >= 1, "
            f"got {hidden} / {n_head} / {n_kv}"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    names = {t.name for t in reader.tensors}
    hf: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // n_head)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type in ("linear",):
        hf["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)),
        }
    if arch == "gemma3":
        hf.update(_gemma3_keys(reader, hf))
    else:
        hf.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            hidden_act="silu",
            attention_bias="blk.0.attn_q.bias" in names,
            mlp_bias=False,
        )
    return hf, GGUFSource(path, reader, n_head, n_kv, arch)


def _gemma3_keys(reader, hf: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 3 config keys of a ``gemma3`` GGUF (llama.cpp ``llama-model.cpp``, LLM_ARCH_GEMMA3:
    the swa pattern 6, local base 10k, the attention scale per size; transformers' GGUF loader reads
    the same file with Gemma3TextConfig's defaults, which agree below 27B)."""
    layers, hidden, heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    window = _field(reader, "gemma3.attention.sliding_window")
    cap = _field(reader, "gemma3.final_logit_softcapping")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": float(_field(reader, "gemma3.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(_field(reader, "gemma3.rope.freq_base_swa", 10_000.0)),
        "sliding_window": int(window) if window is not None else 4096,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": hidden // heads if layers == 62 else hf["head_dim"],
        "final_logit_softcapping": None if cap is None else float(cap),
        "attention_bias": False,
    }
