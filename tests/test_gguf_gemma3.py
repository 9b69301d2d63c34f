"""The real Gemma-3-270M (base, Q4_K_M GGUF: Q4_K / Q6_K / Q5_0 / Q8_0 tensors): sga_jax's own GGUF
path (gemma3 architecture, norms stored as 1 + w, QK-norm, 5:1 local / global layers, two rope
bases) vs transformers' own GGUF loader, and the torch-less Gemma tokenizer vs transformers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

import sga_jax
from sga_jax.models.gguf_tokenizer import load_gguf_tokenizer
from sga_jax.paths import gemma3_270m_gguf

TEXTS = [
    "The capital of France is",
    "  two  spaces, Ünïcödé 東京 😀 1234567",
    "<start_of_turn>user\nHi<end_of_turn>\n",
]


@pytest.fixture(scope="module")
def path():
    return gemma3_270m_gguf()


@pytest.fixture(scope="module")
def ours(path):
    return load_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def model(path):
    return sga_jax.load_model(path, dtype="float32", scan_layers=True)


def test_tokenizer_matches_transformers(path, ours):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert len(ours) == len(ref) == 262144 and ours.get_vocab() == ref.get_vocab()
    assert ours.special_tokens_map == ref.special_tokens_map
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_logits_match_transformers_gguf_and_greedy(path, model, ours):
    import transformers

    c = model.config
    assert (c.num_layers, c.hidden_size, c.head_dim, c.sliding_window) == (18, 640, 256, 512)
    assert sum(c.sliding_layers) == 15 and (c.rope.theta, c.rope_local.theta) == (1e6, 1e4)
    tm = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    ids = ours("The quick brown fox jumps over the lazy dog near the river bank.", return_tensors="np")
    ids = ids["input_ids"].astype(np.int32)
    forward = nnx.jit(lambda m, x, a: m(x, a))
    with torch.no_grad():
        ref = tm.eval()(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    out = np.asarray(forward(model, ids, np.ones_like(ids)))
    assert ref.std() > 1.0
    assert np.abs(out - ref).max() <= 1e-3
    # Greedy completion (a base model: "The capital of France is" continues " the capital of"):
    # token for token the one transformers' model picks.
    prompt = ours("The Eiffel Tower is in the city of", return_tensors="np")["input_ids"][0]
    n, width = len(prompt), len(prompt) + 3
    seq = np.zeros((1, width), np.int32)
    mask = np.zeros((1, width), np.int32)
    seq[0, :n], mask[0, :n] = prompt, 1
    for t in range(n, width):
        seq[0, t] = int(np.argmax(np.asarray(forward(model, seq, mask))[0, t - 1]))
        with torch.no_grad():
            want = tm(torch.tensor(seq[:, :t], dtype=torch.long)).logits[0, -1].argmax()
        assert seq[0, t] == int(want), ours.decode(seq[0, n : t + 1])
        mask[0, t] = 1
    print("completion:", repr(ours.decode(seq[0, n:])))


def test_gemma3_turns_and_default_template(ours):
    """The base GGUF carries no chat template: ``auto`` is TOFU's plain format; ``gemma3`` is Gemma
    3's turn markup as ai.google.dev/gemma/docs/core/prompt-structure gives it (``model`` role, system
    text folded into the first user turn), masked up to the model turn."""
    from sga_jax.data.formatting import PromptFormatter

    assert PromptFormatter(ours, "auto").mode == "plain"
    fmt = PromptFormatter(ours, "gemma3", max_length=64, system_prompt="Be brief.")
    turn = "<bos><start_of_turn>user\nBe brief.\n\nWho wrote Hamlet?<end_of_turn>\n<start_of_turn>model\n"
    assert fmt.generation_prompt("Who wrote Hamlet?") == turn
    enc = fmt.encode_qa("Who wrote Hamlet?", " Shakespeare. ")
    assert enc.input_ids[0] == ours.bos_token_id and enc.input_ids.count(ours.bos_token_id) == 1
    targets = ours.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert targets == "Shakespeare.<end_of_turn>\n"


def test_unlearns_through_the_cli(path, model, ours, tmp_path, data_dir):
    """``sga-jax unlearn`` on the real Gemma-3-270M GGUF: two SGA steps on TOFU forget01 in Gemma 3's
    turn markup raise the forget NLL of the exported model (read back from its HF folder)."""
    from pathlib import Path

    from sga_jax import logprobs
    from sga_jax.cli import main
    from sga_jax.data import splits
    from sga_jax.data.formatting import PromptFormatter
    from sga_jax.data.tofu import load_tofu

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    rc = main(
        ["unlearn", "-c", str(root / "configs/experiment/tofu_sga.yaml"), "benchmark=tofu_forget01",
         f"model.path={path}", f"output_dir={out}", f"data.data_dir={data_dir}", "data.limit=4",
         "data.prompt_format=gemma3", "data.max_length=128", "train.batch_size=2", "train.grad_accum=1",
         "train.steps=2", "train.lr=1e-5", "train.warmup_ratio=0", "eval.benchmark=none",
         "train.progress=false"]
    )  # fmt: skip
    assert rc == 0
    rows = load_tofu("forget01", data_dir=data_dir / "tofu", limit=4)
    batch = splits.encode(rows, PromptFormatter(ours, "gemma3", 128), source="forget01")
    before = float(np.mean(logprobs.batched_nll(model, batch)))
    after = float(np.mean(logprobs.batched_nll(sga_jax.load_model(out / "model"), batch)))
    assert after > before + 0.05, (before, after)


def test_demo_prompts_a_base_model_in_the_plain_format(ours):
    """``sga-jax demo --model gemma3-270m``: each fact is BOS + TOFU's plain question / answer lines,
    with the answer (and nothing else) as targets; the generation prompt ends without a space."""
    from sga_jax import demo

    fact = {
        "question": "What is the capital of France?",
        "lead": "The capital of France is",
        "answer": "Paris",
    }
    batch = demo.encode_facts([fact], ours, 32, model="gemma3-270m")
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    n = int(batch["attention_mask"][0].sum())
    assert ids[0] == ours.bos_token_id
    text = "Question: What is the capital of France?\nAnswer: The capital of France is Paris"
    assert ours.decode(ids[1:n]) == text
    assert ours.decode(ids[mask.astype(bool)]) == " Paris"
    assert demo.DEMO_MODELS["gemma3-270m"].prompt("Q?") == "Question: Q?\nAnswer:"
