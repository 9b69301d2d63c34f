"""The TOFU protocol end to end through the `sga-jax` command line, on a tiny random Llama.

finetune a target model on TOFU "full" and a retain model on retain90 (first rows only), unlearn
forget01 from the target with SGA, evaluate both with `sga-jax eval` (Forget Quality against the
retain model's logs), and check the exported model in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tofu_reference
from tiny_models import write_tiny_llama_for

import sga_jax
from sga_jax import logprobs
from sga_jax.cli import main
from sga_jax.data import splits
from sga_jax.data.formatting import PromptFormatter
from sga_jax.data.tofu import load_tofu

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer, d=32 Llama over SmolLM2's vocabulary, with its tokenizer (chat template) beside it."""
    tok = smollm2_tokenizer
    path, _ = write_tiny_llama_for(tok, tmp_path_factory.mktemp("e2e") / "tiny", max_position_embeddings=512)
    return path


def _forget_nll(model_dir: Path, tokenizer, data_dir: Path, n: int) -> float:
    rows = load_tofu("forget01", data_dir=data_dir / "tofu", limit=n)
    batch = splits.encode(rows, PromptFormatter(tokenizer, "auto", 256), source="forget01")
    return float(np.mean(logprobs.batched_nll(sga_jax.load_model(model_dir), batch)))


def test_tofu_protocol_end_to_end(tiny_dir, tmp_path, data_dir, smollm2_tokenizer, capsys):
    common = [f"data.data_dir={data_dir}", "data.limit=12", "train.batch_size=4", "train.lr=1e-3", *QUIET]
    # 1. TOFU's first stage: a target model on "full" and a retain model on retain90.
    for name, split in (("target", "full"), ("retain", "retain90")):
        rc = main(
            ["finetune", "-c", str(ROOT / "configs/benchmark/tofu_full.yaml"), f"model.path={tiny_dir}",
             f"output_dir={tmp_path / name}", f"data.forget={split}", "train.steps=2", *common]
        )  # fmt: skip
        assert rc == 0
        assert (tmp_path / name / "model" / "model.safetensors").is_file()
    target = tmp_path / "target" / "model"

    # 2. unlearn forget01 from the target with SGA (K = 4, r = -0.8), checkpoints every 2 steps.
    out = tmp_path / "sga"
    rc = main(
        ["unlearn", "-c", str(ROOT / "configs/experiment/tofu_sga.yaml"), "benchmark=tofu_forget01",
         f"model.path={target}", f"output_dir={out}", "train.steps=4", "train.grad_accum=2",
         "train.warmup_ratio=0", "train.checkpoint_every=2", "train.keep_checkpoints=2",
         "eval.benchmark=none", *common]
    )  # fmt: skip
    assert rc == 0
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "normal_samples.json",
        "model/config.json",
        "model/model.safetensors",
    ):
        assert (out / f).is_file(), f
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["r"] == pytest.approx(-0.8) and np.isfinite(m["loss"]) for m in metrics)
    pairing = json.loads((out / "normal_samples.json").read_text())["forget_to_retain_rows"]
    assert len(pairing) == 12 and all(len(p) == 3 for p in pairing)

    # the forget NLL rose
    before = _forget_nll(target, smollm2_tokenizer, data_dir, 12)
    after = _forget_nll(out / "model", smollm2_tokenizer, data_dir, 12)
    assert after > before + 0.05, (before, after)

    # 3. evaluate: the retain model, then the unlearned model against it (Forget Quality).
    evals = {}
    for name, model_dir in (("retain", tmp_path / "retain" / "model"), ("unlearned", out / "model")):
        out_eval = tmp_path / f"eval_{name}"
        args = ["eval", str(model_dir), "--benchmark", "tofu_forget01", "--out", str(out_eval),
                f"data_dir={data_dir}", "limit=3", "max_new_tokens=4"]  # fmt: skip
        if name == "unlearned":
            args += ["--retain-logs", str(tmp_path / "eval_retain")]
        assert main(args) == 0
        evals[name] = json.loads((tmp_path / f"eval_{name}" / "results.json").read_text())
        for f in ("eval_log.json", "eval_log_forget.json", "eval_real_author_wo_options.json",
                  "eval_real_world_wo_options.json"):  # fmt: skip
            assert (tmp_path / f"eval_{name}" / f).is_file()
    # results.json = TOFU's official aggregation (aggregate_eval_stat.py, re-derived with scipy in
    # tests/tofu_reference.py) of the logs the command wrote: all 12 components, MU and FQ.
    res = evals["unlearned"]
    want = tofu_reference.official_components(tmp_path / "eval_unlearned")
    for official_name, key in tofu_reference.OUR_KEYS.items():
        assert res[key] == pytest.approx(want[official_name], rel=1e-9, abs=1e-12), official_name
    assert res["model_utility"] == pytest.approx(want["Model Utility"], rel=1e-9, abs=1e-12)
    ev_u, ev_r = tmp_path / "eval_unlearned", tmp_path / "eval_retain"
    p_value, ks = tofu_reference.official_forget_quality(ev_u, ev_r)
    assert (res["forget_quality"], res["ks_statistic"]) == pytest.approx((p_value, ks), rel=1e-9)
    # The retain model against its own logs is indistinguishable from itself: FQ = 1 exactly.
    from sga_jax.eval.tofu import aggregate

    same = aggregate(ev_r, ev_r)
    assert same["forget_quality"] == 1.0 and same["ks_statistic"] == 0.0
    # the forget-set losses in the logs are the unlearned model's, not the retain model's
    forget_logs = [json.loads((d / "eval_log_forget.json").read_text()) for d in (ev_u, ev_r)]
    assert forget_logs[0]["gt_loss"] != forget_logs[1]["gt_loss"]
    assert f"forget_quality: {res['forget_quality']:.6g}" in capsys.readouterr().out

    # 4. the exported model loads in transformers and gives the same logits as sga_jax's port.
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = np.array([smollm2_tokenizer("Who is the author of the book?")["input_ids"]], dtype=np.int32)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    got = np.asarray(sga_jax.load_model(out / "model")(ids))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert tok("Paris")["input_ids"] == smollm2_tokenizer("Paris")["input_ids"]


def test_convert_command(tiny_dir, tmp_path):
    dst = tmp_path / "converted"
    assert main(["convert", str(tiny_dir), str(dst), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    model = sga_jax.load_model(dst)
    assert model.config.vocab_size == 49152
