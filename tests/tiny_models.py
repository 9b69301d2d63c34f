"""Small random Hugging Face checkpoints written by the tests themselves (no weights are committed).

``write_tiny_hf("llama", tmp_path / "m", rope_scaling={...})`` builds the transformers PyTorch model
from a small config, saves it as safetensors and returns ``(path, torch_model)``; the torch model is
the reference the JAX port is compared with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_BASE: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "opt": dict(
        vocab_size=96,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        do_layer_norm_before=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
    ),
    "phi": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        partial_rotary_factor=0.5,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        qk_layernorm=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    ),
    # Qwen2.5's small-size shape: tied embeddings, rope theta 1e6, q/k/v biases, GQA.
    "qwen2": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=64,
        max_window_layers=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attention_dropout=0.0,
    ),
    # Qwen3-0.6B's shape: QK-norm, head_dim 16 != 32 / 4 (0.6B: 128 != 1024 / 16), GQA, tied,
    # rope theta 1e6, no biases; the window settings used only where a variant turns them on.
    "qwen3": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=64,
        max_window_layers=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attention_dropout=0.0,
    ),
    # Mistral-7B-v0.1's shape (GQA, no biases, untied) with a sliding window shorter than the
    # test sequences (T = 12), so the window changes the logits.
    "mistral": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        sliding_window=5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attention_dropout=0.0,
    ),
    # Gemma 2's shape: head_dim 16 != 32 / 4, query_pre_attn_scalar != head_dim, GQA, tied; caps
    # small enough to bite on these scores / logits, window 4 < T on the even (sliding) layers.
    "gemma2": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=3.0,
        sliding_window=4,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        attention_dropout=0.0,
    ),
    # Gemma 3's shape: QK-norm, head_dim 16 != 32 / 4, query_pre_attn_scalar != head_dim, GQA, tied;
    # local / global alternation 1:1 (pattern 2, released: 6) so that both kinds are in 2 layers,
    # window 4 < T; global rope 1e6 with linear scaling 8 (the 4B-27B models), local 1e4.
    "gemma3_text": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=24,
        sliding_window=4,
        sliding_window_pattern=2,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        attention_dropout=0.0,
    ),
    # Gemma 1's shape (gemma-2b: multi-query attention, head_dim 256 != 2048 / 8), scaled down.
    "gemma": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        hidden_act="gelu",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        attention_dropout=0.0,
    ),
    # Phi-3-mini's shape: fused qkv / gate_up in HF, untied, no biases.
    "phi3": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    ),
}


def tiny_config(model_type: str, **overrides: Any):
    """A small transformers config of ``model_type`` (a key of ``_BASE``) with overrides applied."""
    import transformers

    kwargs = {**_BASE[model_type], **overrides}
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def write_tiny_hf(model_type: str, path: str | Path, *, seed: int = 0, **overrides: Any):
    """Write a random tiny HF checkpoint (safetensors) to ``path``; return ``(path, torch_model)``.

    Weights are drawn with a fixed seed and scaled up a little from HF's default init so that the
    logits are not all near zero (a parity test on near-constant logits proves little).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name or "layer_norm" in name or "ln" in name:
                p.uniform_(0.8, 1.2) if name.endswith("weight") else p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.05)
    model.eval()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def write_tiny_llama_for(
    tokenizer, path: str | Path, *, max_position_embeddings: int = 256, **overrides: Any
):
    """A tiny random Llama that speaks ``tokenizer`` (its vocabulary and special ids), saved with the
    tokenizer beside it so the runner and ``sga-jax`` commands can load the directory on its own."""
    path, model = write_tiny_hf(
        "llama", path, vocab_size=len(tokenizer), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=max_position_embeddings, **overrides,
    )  # fmt: skip
    tokenizer.save_pretrained(path)
    return path, model
