"""Unlearning happens on a real model, in the default suite: 3 SGA steps (arXiv 2510.22376, eq. 6;
K = 4, fixed r = -0.8) on SmolLM2-135M-Instruct make it forget 3 facts it knows (each answer's
probability falls below a tenth of its start; measured: ≤ 0.011) while 3 unrelated held-out facts,
never trained on, keep at least 0.75 of theirs (measured: 0.98-1.12). About 40 s on a 2-core CPU.

The normal samples are given explicitly (every forget fact with the same 3 retain facts), and the
probabilities are computed here from the full logits, not with the library's log-prob kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import sga_jax
from sga_jax import config as C
from sga_jax import demo, train

FORGET = (0, 2, 3)  # France -> Paris, Japan -> Tokyo, Germany -> Berlin (demo_facts.json "forget")
NORMAL = (0, 1, 2)  # Italy, Spain, United Kingdom ("retain"): the SGA normal samples
HELD_OUT = (18, 19, 22)  # sodium -> Na, largest desert -> Sahara, largest bone -> femur ("retain")
LENGTH = 32


def answer_probs(model, batch) -> np.ndarray:
    """P(answer | question, lead) per row: exp of the summed log-softmax of the answer tokens."""
    ids = jnp.asarray(batch["input_ids"])
    logits = model(ids, jnp.asarray(batch["attention_mask"]))[:, :-1].astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[:, 1:, None], axis=-1)[..., 0]
    return np.exp(np.asarray(jnp.sum(logp * batch["loss_mask"][:, 1:], axis=-1), np.float64))


def test_sga_forgets_facts_and_keeps_held_out_ones(tmp_path, smollm2_gguf, smollm2_tokenizer):
    tok = smollm2_tokenizer
    facts = demo.load_facts()
    forget = demo.encode_facts([facts["forget"][i] for i in FORGET], tok, LENGTH)
    normal = demo.encode_facts([facts["retain"][i] for i in NORMAL], tok, LENGTH)
    held_out = demo.encode_facts([facts["retain"][i] for i in HELD_OUT], tok, LENGTH)
    # its own copy: training is in place, and the session's smollm2_jax is shared
    model = sga_jax.load_model(smollm2_gguf, dtype="float32", scan_layers=True)
    forget_before, held_before = answer_probs(model, forget), answer_probs(model, held_out)
    assert forget_before.min() > 0.5 and held_before.min() > 0.5  # facts the model knows

    cfg = C.compose(
        base={
            "output_dir": str(tmp_path),
            "model": {"path": str(smollm2_gguf), "scan_layers": True, "freeze": ["embed_tokens"]},
            "method": {"name": "sga", "r": -0.8, "k": 4},
            "train": {
                "steps": 3, "batch_size": 3, "lr": 2e-5, "schedule": "constant", "warmup_steps": 0,
                "weight_decay": 0.0, "max_grad_norm": 1.0, "checkpoint_every": 0,
                "final_checkpoint": False, "max_forget_nll": None, "progress": False,
            },
        }
    )  # fmt: skip
    data = train.TrainData(forget=forget, retain=normal, normal_index=np.array([NORMAL] * 3))
    result = train.train_loop(model, data, cfg, tmp_path, export=False)
    assert result.steps == 3

    forget_ratio = answer_probs(result.model, forget) / forget_before
    held_ratio = answer_probs(result.model, held_out) / held_before
    assert forget_ratio.max() < 0.1, forget_ratio
    assert held_ratio.min() > 0.75, held_ratio
