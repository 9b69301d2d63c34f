"""Membership inference: LOSS / zlib / Min-K% / Min-K%++ AUCs of ``members=`` against ``nonmembers=``
(default MUSE-News' privleak forget vs holdout), plus open-unlearning's gradient-norm
(``gradnorm_p=``) and reference-model (``reference_model=``) attacks (:mod:`sga_jax.eval.mia`)."""

from __future__ import annotations

from typing import Any

from sga_jax.benchmarks.registry import Benchmark, EvalRun, register
from sga_jax.eval.options import fraction, p_norm, text, whole


def _run(r: EvalRun) -> dict[str, Any]:
    from sga_jax.data.texts import load_texts
    from sga_jax.eval.mia import SCORES, auc, text_gradnorm_scores, text_scores
    from sga_jax.models.hf import load_model

    members = r.options.pop("members", "muse:privleak/forget")
    nonmembers = r.options.pop("nonmembers", "muse:privleak/holdout")
    p, reference = r.options.pop("gradnorm_p", None), r.options.pop("reference_model", None)
    texts = {
        "in": load_texts(members, r.limit, r.data_dir),
        "out": load_texts(nonmembers, r.limit, r.data_dir),
    }
    s = {side: text_scores(r.model, r.tokenizer, t, **r.options) for side, t in texts.items()}
    aucs = {f"auc_{name}": auc(s["in"][name], s["out"][name]) for name in SCORES if name in s["in"]}
    length = {k: r.options[k] for k in ("max_length",) if k in r.options}
    if p is not None:  # open-unlearning's mia_gradnorm
        g = {
            side: text_gradnorm_scores(r.model, r.tokenizer, t, p=float(p), **length)
            for side, t in texts.items()
        }
        aucs["auc_gradnorm"] = auc(g["in"], g["out"])
    if reference is not None:  # open-unlearning's mia_reference: the same tokenizer is assumed
        ref = load_model(reference, scan_layers=False)
        opts = {k: v for k, v in r.options.items() if k != "k"}
        ref_nll = {
            side: text_scores(ref, r.tokenizer, t, which=(), **opts)["nll"] for side, t in texts.items()
        }
        gap = {side: ref_nll[side] - s[side]["nll"] for side in texts}
        aucs["auc_ref"] = auc(gap["in"], gap["out"])
    return {"members": members, "nonmembers": nonmembers, **aucs}


MIA = register(
    Benchmark(
        name="mia",
        run=_run,
        options={
            "members": text,
            "nonmembers": text,
            "k": fraction,
            "max_length": whole,
            "batch_size": whole,
            "gradnorm_p": p_norm,
            "reference_model": text,
        },
        result_keys=("members", "nonmembers", "auc_loss"),
        help="""  mia:             members=SPEC  nonmembers=SPEC (as ppl's data=)  k=0.2  max_length=512
                   gradnorm_p=1|2|inf  reference_model=DIR""",
    )
)
