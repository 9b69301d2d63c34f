"""Loading and saving HF checkpoints: round trip through transformers, sharded indexes, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.errors import ModelLoadError
from sga_jax.models import hf


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_hf("llama", tmp_path_factory.mktemp("llama") / "m")


def _ids():
    return np.random.RandomState(0).randint(3, 96, size=(2, 9)).astype(np.int32)


def _torch(tm, ids):
    with torch.no_grad():
        return tm(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        (  # Llama-3.2's shape: tied, llama3 rope
            "llama",
            dict(
                tie_word_embeddings=True,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8,
                },
            ),
        ),
        ("opt", dict(word_embed_proj_dim=16)),
        ("phi", dict(qk_layernorm=True)),
        ("qwen2", {}),
        ("qwen2", dict(use_sliding_window=True, sliding_window=4)),  # layer_types exported
        ("qwen3", {}),  # QK-norm, tied, head_dim 16
        ("qwen3", dict(tie_word_embeddings=False, attention_bias=True)),
        ("mistral", {}),  # sliding window 5
        ("gemma2", {}),  # pre/post norms, soft-caps, alternating windows, tied
        ("gemma2", dict(tie_word_embeddings=False, attention_bias=True)),
        ("gemma", {}),
        ("gemma3_text", {}),  # QK-norm, two rope bases (global scaled), local / global layers
        ("gemma3_text", dict(tie_word_embeddings=False, attention_bias=True)),
        # fused qkv / gate_up written back from our split modules; longrope config exported
        (
            "phi3",
            dict(
                rope_scaling={
                    "rope_type": "longrope",
                    "short_factor": [1.0, 1.2, 1.4, 1.6],
                    "long_factor": [2.0] * 4,
                },
                original_max_position_embeddings=4,
                max_position_embeddings=64,
            ),
        ),
    ],
)
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_round_trip_through_transformers(tmp_path, model_type, overrides, scan):
    import transformers

    src, _ = write_tiny_hf(model_type, tmp_path / "src", **overrides)
    model = sga_jax.load_model(src, scan_layers=scan)
    out = sga_jax.save_model(model, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [".sga_jax_export", "config.json", "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids()
    np.testing.assert_allclose(_torch(reloaded, ids), np.asarray(model(ids)), atol=1e-4)
    # and back into sga_jax: bit-identical parameters
    again = sga_jax.load_model(out, scan_layers=scan)
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_gemma3_multimodal_checkpoint_text_part(tmp_path):
    """A (tiny) Gemma3ForConditionalGeneration checkpoint: its language model is loaded, the vision
    tower and projector ignored; logits on text equal the multimodal model's own, and the export is
    a gemma3_text checkpoint that transformers loads as Gemma3ForCausalLM with the same logits."""
    import transformers
    from tiny_models import _BASE

    text = {
        k: v
        for k, v in _BASE["gemma3_text"].items()
        if k not in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)  # fmt: skip
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=95, boi_token_index=93, eoi_token_index=94)  # fmt: skip
    torch.manual_seed(0)
    tm = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0.0, 0.08) if p.ndim >= 2 else p.uniform_(-0.2, 0.2)
    tm.save_pretrained(tmp_path / "mm")
    names = hf.safetensors_weight_map(tmp_path / "mm")
    assert any(n.startswith("vision_tower.") for n in names)  # the hub layout: language_model.model.*
    # ... and the layout of transformers 5's modules (model.language_model.*, model.vision_tower.*)
    from safetensors.numpy import load_file, save_file

    new = tmp_path / "mm5"
    new.mkdir()
    shutil.copy(tmp_path / "mm" / "config.json", new / "config.json")
    tensors = load_file(str(tmp_path / "mm" / "model.safetensors"))
    renamed = {n.replace("language_model.model.", "model.language_model."): t for n, t in tensors.items()}
    renamed = {
        ("model." + n if n.startswith(("vision_tower.", "multi_modal")) else n): t for n, t in renamed.items()
    }
    save_file(renamed, str(new / "model.safetensors"))
    ids = np.random.RandomState(0).randint(3, 90, size=(2, 9)).astype(np.int32)
    ref = _torch(tm, ids)
    assert ref.std() > 0.1
    assert np.abs(np.asarray(sga_jax.load_model(new)(ids)) - ref).max() <= 1e-4
    model = sga_jax.load_model(tmp_path / "mm")
    assert np.abs(np.asarray(model(ids)) - ref).max() <= 1e-4
    out = sga_jax.save_model(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    assert np.abs(_torch(reloaded, ids) - ref).max() <= 1e-4


def test_sharded_safetensors_index(tmp_path, tiny_llama):
    _, tm = tiny_llama
    tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    model = sga_jax.load_model(tmp_path / "sharded")
    ids = _ids()
    assert np.abs(np.asarray(model(ids)) - _torch(tm, ids)).max() <= 1e-4


def test_sharded_qwen2_index(tmp_path):
    """A sharded Qwen2 checkpoint (tied, q/k/v biases) loads through its index like Llama's."""
    _, tm = write_tiny_hf("qwen2", tmp_path / "src")
    tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ids = _ids()
    assert np.abs(np.asarray(sga_jax.load_model(tmp_path / "sharded")(ids)) - _torch(tm, ids)).max() <= 1e-4


def test_bfloat16_save_round_trip(tmp_path, tiny_llama):
    import transformers

    path, _ = tiny_llama
    model = sga_jax.load_model(path, dtype="bfloat16")
    out = sga_jax.save_model(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = _ids()
    np.testing.assert_allclose(_torch(reloaded.eval(), ids), np.asarray(model(ids)), atol=0.1, rtol=0.05)


def test_convert_hf_dir(tmp_path, tiny_llama):
    path, tm = tiny_llama
    out = hf.convert(path, tmp_path / "conv")
    ids = _ids()
    assert np.abs(np.asarray(sga_jax.load_model(out)(ids)) - _torch(tm, ids)).max() <= 1e-4


# ------------------------------------------------------------------------------------ bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type_lists_supported(tmp_path, tiny_llama):
    d = _copy(tiny_llama[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError,
        match=r"gpt_neox.*gemma, gemma2, gemma3, gemma3_text, llama, mistral, opt, phi, phi3, qwen2, qwen3",
    ):
        sga_jax.load_model(d)


def test_remote_code_config_refused(tmp_path, tiny_llama):
    d = _copy(tiny_llama[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="remote code"):
        sga_jax.load_model(d)


def _rewrite(d, fn):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_named(tmp_path, tiny_llama):
    d = _copy(tiny_llama[0], tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        sga_jax.load_model(d, scan_layers=True)


def test_misshapen_tensor_named(tmp_path, tiny_llama):
    d = _copy(tiny_llama[0], tmp_path / "m")

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    _rewrite(d, shrink)
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight.*shape \(8, 32\), expected \(16, 32\)"):
        sga_jax.load_model(d)


def test_pickle_only_directory_refused(tmp_path, tiny_llama):
    d = _copy(tiny_llama[0], tmp_path / "m")
    (d / "model.safetensors").unlink()
    # a pickle whose unpickling would create a file: proves it is never unpickled
    marker = tmp_path / "pwned"
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelLoadError, match=r"pickled.*pytorch_model\.bin.*never unpickles"):
        sga_jax.load_model(d)
    assert not marker.exists()


def test_corrupt_safetensors(tmp_path, tiny_llama):
    d = _copy(tiny_llama[0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="safetensors"):
        sga_jax.load_model(d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="safetensors"):
        sga_jax.load_model(d)


def test_corrupt_gguf(tmp_path, smollm2_gguf):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(4096))
    with pytest.raises(ModelLoadError, match="GGUF"):
        sga_jax.load_model(bad)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="GGUF"):
        sga_jax.load_model(tmp_path / "junk.gguf")


def test_missing_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        sga_jax.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        sga_jax.load_model(tmp_path / "empty")


def test_fused_tensor_with_wrong_rows_is_one_line_error(tmp_path):
    """A Phi-3 checkpoint whose fused qkv_proj does not hold the q + k + v rows its config implies
    is refused naming the fused tensor, not sliced into a wrong model."""
    path, _ = write_tiny_hf("phi3", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_key_value_heads"] = 2  # expects 32 + 16 + 16 rows; the file has 32 + 32 + 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"qkv_proj.weight' has 96 rows, expected 64") as e:
        sga_jax.load_model(path)
    assert "\n" not in str(e.value)
