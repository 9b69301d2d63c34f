"""The lm-eval backend (``sga_jax.eval.lm_eval_backend``) against lm-eval's own Hugging Face backend.

Everything is local: a tiny random Llama over SmolLM2's tokenizer written here, and a
multiple-choice task YAML over a JSONL file of hand-written items, loaded through lm-eval's
``TaskManager(include_path=...)`` with the ``json`` dataset builder. The reference is
``lm_eval.models.huggingface.HFLM`` (PyTorch, CPU, float32) on the same folder: accuracies equal,
per-choice log-likelihoods within 1e-4, the same ``is_greedy``, rolling log-likelihoods within
1e-4 and greedy generations identical.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_models import write_tiny_llama_for

from sga_jax.errors import ConfigError
from sga_jax.eval import lm_eval_backend as backend

# Every test but the missing-extra one needs lm-eval (the `test` extra installs it).
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason='lm-eval is not installed (pip install "sga-jax[lm_eval]")',
)

TASK = "sga_tiny_mc"
ITEMS = [
    ("What colour is the sky on a clear day?", [" blue", " green", " red", " purple"], 0),
    ("How many legs does a cat have?", [" two", " four", " six", " eight"], 1),
    ("Which of these is a fruit?", [" carrot", " potato", " apple", " onion"], 2),
    ("What do bees make?", [" milk", " bread", " cheese", " honey"], 3),
    ("Water freezes into", [" ice", " steam", " sand", " glass"], 0),
    ("The opposite of hot is", [" warm", " cold and wet weather", " loud", " tall"], 1),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    path, _ = write_tiny_llama_for(smollm2_tokenizer, tmp_path_factory.mktemp("lmeval") / "tiny")
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmeval_task")
    data = root / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS)
    )
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {root / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return root


@pytest.fixture(scope="module")
def hf_lm(tiny_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=4)


@pytest.fixture(scope="module")
def hf_ref(hf_lm, task_dir) -> dict:
    """lm-eval's own HF backend on the local task, with per-sample records."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir))
    return lm_eval.simple_evaluate(model=hf_lm, tasks=[TASK], task_manager=tm, log_samples=True)


def _per_choice(results: dict) -> list[list[tuple[float, bool]]]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [
        [tuple(r[0]) if isinstance(r[0], list) else tuple(r) for r in s["filtered_resps"]] for s in samples
    ]


@needs_lm_eval
def test_multiple_choice_matches_hf_backend(tiny_dir, task_dir, hf_ref, tmp_path):
    flat = backend.run_lm_eval(
        tiny_dir, [TASK], out_dir=tmp_path, batch_size=4, include_path=task_dir, log_samples=True
    )
    ours = json.loads((tmp_path / "lm_eval_results.json").read_text())
    ref = hf_ref
    mine, theirs = _per_choice(ours), _per_choice(ref)
    assert len(mine) == len(ITEMS) and all(len(m) == 4 for m in mine)
    diff = max(abs(a[0] - b[0]) for m, t in zip(mine, theirs) for a, b in zip(m, t))
    print(f"max |loglikelihood diff| vs HFLM: {diff:.3e}")
    assert diff < 1e-4
    assert [[a[1] for a in m] for m in mine] == [[b[1] for b in t] for t in theirs]
    for metric in ("acc", "acc_norm"):
        assert flat[f"{TASK}/{metric}"] == ref["results"][TASK][f"{metric},none"], metric
        assert f"{TASK}/{metric}_stderr" in flat
    print("acc", flat[f"{TASK}/acc"], "acc_norm", flat[f"{TASK}/acc_norm"])


def _req(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@needs_lm_eval
def test_requests_match_hf_backend(tiny_dir):
    """Truncated and empty-context loglikelihoods, rolling windows (max_length=16: several windows
    per string) and greedy generation with stop strings, request by request."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=3, max_length=16)
    ours = backend.SgaJaxLM(str(tiny_dir), batch_size=3, max_length=16)
    long_ctx = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun"
    ll = [("Hello", " world"), (long_ctx, " and dreams"), ("", "Just a continuation"), ("A B C ", "D E")]
    reqs = [_req("loglikelihood", a) for a in ll]
    mine, theirs = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert max(abs(a[0] - b[0]) for a, b in zip(mine, theirs)) < 1e-4
    assert [a[1] for a in mine] == [b[1] for b in theirs]
    texts = [long_ctx * 2, "Short text."]
    rolling = [_req("loglikelihood_rolling", (t,)) for t in texts]
    r_mine, r_theirs = ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling)
    print("loglikelihood / rolling max |diff| vs HFLM:", max(abs(a[0] - b[0]) for a, b in zip(mine, theirs)),
          max(abs(a - b) for a, b in zip(r_mine, r_theirs)))  # fmt: skip
    assert max(abs(a - b) for a, b in zip(r_mine, r_theirs)) < 1e-4, (r_mine, r_theirs)

    hf_gen = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=3)
    ours_gen = backend.SgaJaxLM(str(tiny_dir), batch_size=3)
    gen = [
        _req(
            "generate_until", ("Once upon a time", {"until": ["."], "max_gen_toks": 40, "do_sample": False})
        ),
        _req(
            "generate_until",
            ("Question: what is two plus two?\nAnswer:", {"until": ["\n"], "max_gen_toks": 12}),
        ),
        _req(
            "generate_until", ("The weather today", {"until": ["."], "max_gen_toks": 40, "do_sample": False})
        ),
    ]
    g_mine, g_theirs = ours_gen.generate_until(gen), hf_gen.generate_until(gen)
    print("generations:", g_mine)
    assert g_mine == g_theirs


@needs_lm_eval
def test_lm_eval_command_line_finds_the_backend(tiny_dir, task_dir, tmp_path, monkeypatch):
    """``python -m sga_jax.eval.lm_eval_backend`` is lm-eval's CLI with ``--model sga_jax`` known."""
    out = tmp_path / "cli"
    argv = ["--model", "sga_jax", "--model_args", f"pretrained={tiny_dir}", "--batch_size", "4"]
    argv += ["--tasks", TASK, "--include_path", str(task_dir), "--limit", "2", "--output_path", str(out)]
    monkeypatch.setattr(sys, "argv", ["lm_eval_backend"])
    backend.main(argv)
    written = list(out.rglob("results_*.json"))
    assert written, list(out.rglob("*"))
    assert "acc,none" in json.loads(written[0].read_text())["results"][TASK]


def test_missing_extra_is_one_config_error(monkeypatch, tmp_path):
    """Runs without lm-eval too: the error comes before any model is read."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ConfigError) as e:
        backend.run_lm_eval(tmp_path / "model", [TASK])
    assert str(e.value) == backend.INSTALL_HINT and "\n" not in str(e.value)
    assert 'pip install "sga-jax[lm_eval]"' in str(e.value)


@needs_lm_eval
def test_bad_model_args_are_config_errors(tiny_dir):
    with pytest.raises(ConfigError, match="mesh"):
        backend.SgaJaxLM(str(tiny_dir), mesh="pipeline:2")
    with pytest.raises(ConfigError, match="unknown sga_jax model_args"):
        backend.SgaJaxLM(str(tiny_dir), temperature=0.5)


@needs_lm_eval
def test_mesh_gives_the_same_scores(tiny_dir):
    """``mesh=data:2+fsdp:2`` (parameters sharded, batches split over 4 of the 8 test devices)."""
    reqs = [_req("loglikelihood", a) for a in [("Hello", " world"), ("A B", " C D"), ("", "x y")]]
    rolling = [_req("loglikelihood_rolling", ("Some text to score, twice over. " * 3,))]
    plain = backend.SgaJaxLM(str(tiny_dir), batch_size=4, max_length=16)
    sharded = backend.SgaJaxLM(str(tiny_dir), batch_size=4, max_length=16, mesh="data:2+fsdp:2")
    for a, b in zip(plain.loglikelihood(reqs), sharded.loglikelihood(reqs)):
        assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == b[1]
    assert plain.loglikelihood_rolling(rolling) == pytest.approx(
        sharded.loglikelihood_rolling(rolling), abs=1e-5
    )
    with pytest.raises(ConfigError, match="multiple of data x fsdp"):
        backend.SgaJaxLM(str(tiny_dir), batch_size=3, mesh="fsdp:2")


@pytest.mark.slow
@needs_lm_eval
def test_smollm2_matches_hf_backend(smollm2_gguf, smollm2_tokenizer, task_dir):
    """The real SmolLM2-135M-Instruct GGUF against HFLM on transformers' own GGUF loader (measured
    2026-12-03 on CPU: max |diff| 5.7e-5, accuracies equal; ~90 s, HFLM most of it)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = HFLM(
        pretrained=str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, tokenizer=smollm2_tokenizer,
        device="cpu", dtype="float32", batch_size=4,
    )  # fmt: skip
    runs = [
        lm_eval.simple_evaluate(
            model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True
        )
        for lm in (backend.SgaJaxLM(str(smollm2_gguf), batch_size=4), hf)
    ]
    mine, theirs = (_per_choice(r) for r in runs)
    assert max(abs(a[0] - b[0]) for m, t in zip(mine, theirs) for a, b in zip(m, t)) < 2e-4
    for metric in ("acc,none", "acc_norm,none"):
        assert runs[0]["results"][TASK][metric] == runs[1]["results"][TASK][metric]


@needs_lm_eval
def test_sga_jax_eval_runs_lm_eval_tasks(tiny_dir, task_dir, hf_ref, tmp_path, capsys):
    """``sga-jax eval MODEL -b lm_eval --tasks T``: the registry's lm_eval benchmark, which leaves
    the model loading to the backend, gives HFLM's accuracies in results.json."""
    from sga_jax.cli import main
    from sga_jax.eval.options import check_options

    out = tmp_path / "eval"
    args = [
        "eval",
        str(tiny_dir),
        "-b",
        "lm_eval",
        "--tasks",
        TASK,
        "--out",
        str(out),
        f"include_path={task_dir}",
    ]
    assert main([*args, "batch_size=4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"] == "lm_eval" and res["tasks"] == [TASK]
    assert (out / "lm_eval_results.json").is_file()
    for metric in ("acc", "acc_norm"):
        assert res[f"{TASK}/{metric}"] == hf_ref["results"][TASK][f"{metric},none"], metric
    with pytest.raises(ConfigError, match="tasks=\\[\\]: must be a non-empty list of names"):
        check_options("lm_eval", {"tasks": []})
    assert main([*args, "tasks=[other]"]) == 2
    assert "--tasks sga_tiny_mc and tasks=['other'] disagree" in capsys.readouterr().err
