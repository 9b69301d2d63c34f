"""The training recipes the method configs carry (configs/recipe/*.yaml), the warm-up they size
and PDU's dual variable, on the config and the transform alone."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sga_jax import config as C
from sga_jax import optim
from sga_jax.errors import ConfigError
from sga_jax.transforms import primal_dual


@pytest.mark.parametrize(
    ("method", "recipe"),
    [
        # open-unlearning: finetune.yaml (8 x 4) + experiment/unlearn/tofu/default.yaml
        ("ga", (32, 1.0, "linear", 10.0, 1.0)),
        ("rmu", (32, 1.0, "linear", 10.0, 1.0)),
        ("pdu", (32, 1.0, "linear", 10.0, 1.0)),
        ("sga", (32, 1.0, "linear", 10.0, 1.0)),
        # tmlr-group/GRU forget_llama.yaml (4 x 8), forget_auto_tofu.py: no warm-up, constant, no clip
        ("gru_ga", (32, 0.0, "constant", 5.0, None)),
        ("gru_rmu", (32, 0.0, "constant", 5.0, None)),
        # UCSC-REAL/FLAT config/forget.yaml (16 x 4) and unlearn.py
        ("flat", (64, 1.0, "linear", 5.0, 1.0)),
    ],
)
def test_method_configs_carry_their_codes_recipe(method, recipe):
    t = C.compose([], [f"method={method}"]).train
    assert (t.batch_size, t.warmup_epochs, t.schedule, t.epochs, t.max_grad_norm) == recipe
    assert t.lr == 1e-5 and t.weight_decay == 0.01


def test_any_train_key_set_wins_over_the_recipe_wherever_it_comes(tmp_path):
    assert C.compose([], ["method=ga"]).train.batch_size == 32
    assert C.compose([], ["method=ga", "train.batch_size=4"]).train.batch_size == 4
    assert C.compose([], ["train.batch_size=4", "method=ga"]).train.batch_size == 4
    # a sweep's shared budget in its file stays the budget of every method it lists
    f = tmp_path / "budget.yaml"
    f.write_text("train:\n  epochs: 2\n  batch_size: 8\n")
    for method in ("ga", "gru_sga", "flat"):
        t = C.compose([f], [f"method={method}"]).train
        assert (t.epochs, t.batch_size) == (2.0, 8), method
    # the last method's recipe replaces the earlier one's
    assert C.compose([], ["method=flat", "method=gru_ga"]).train.schedule == "constant"
    assert C.compose([], ["method=gru_ga", "method.recipe=null"]).train.schedule == "linear"  # the default
    assert C.compose([], ["method=gru_ga", "method.recipe=null"]).train.batch_size == 4


def test_an_unknown_recipe_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"method.recipe=tofu2: no such recipe config.*open_unlearning"):
        C.compose([], ["method=ga", "method.recipe=tofu2"])


def test_warmup_precedence_and_open_unlearnings_epoch_count():
    # int(warmup_epochs * rows // batch) (open-unlearning src/trainer/__init__.py l. 39-42)
    t = C.TrainConfig(batch_size=32, warmup_epochs=1.0)
    assert optim.warmup_steps(t, 100, num_rows=400) == 12
    assert optim.warmup_steps(C.TrainConfig(batch_size=32, warmup_epochs=2.5), 100, num_rows=400) == 31
    # steps, then ratio, then epochs: the first that is set
    both = C.TrainConfig(batch_size=32, warmup_ratio=0.25, warmup_epochs=1.0)
    assert optim.warmup_steps(both, 100, num_rows=400) == 25
    explicit = C.TrainConfig(batch_size=32, warmup_steps=0, warmup_ratio=0.25, warmup_epochs=1.0)
    assert optim.warmup_steps(explicit, 100, num_rows=400) == 0
    assert optim.warmup_steps(C.TrainConfig(), 100) == 0
    assert optim.warmup_steps(C.TrainConfig(warmup_steps=50), 10) == 9  # at most steps - 1
    _, schedule = optim.make_optimizer(t, 100, num_rows=400)
    assert float(schedule(0)) == 0.0 and float(schedule(12)) == pytest.approx(1e-5)
    assert float(schedule(6)) == pytest.approx(0.5e-5)


def test_steps_per_epoch_is_a_ceil_over_the_forget_rows():
    t = C.TrainConfig(batch_size=32, epochs=10)
    assert optim.steps_per_epoch(t, 130, 400) == 13
    assert optim.steps_per_epoch(t, 130, None) == 13  # steps / epochs when the rows are unknown


def _run(tx, losses):
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    duals, updates = [], []
    for loss in losses:
        u, state = tx.update(
            {"w": jnp.ones(3)}, state, params, retain_grads={"w": jnp.full(3, 2.0)}, retain_loss=loss
        )
        duals.append((float(state.used), float(state.dual)))
        updates.append(float(u["w"][0]))
    return duals, updates


def test_primal_dual_moves_the_dual_after_its_warmup():
    """λ ← max(0, λ + η(l_r - ε)) after each step once ``warmup_steps`` have passed (pdu.py l. 57-62);
    each update is g_f + λ·g_r with the λ from before the step."""
    tx = primal_dual(1.0, eps=0.5, step_size=2.0, warmup_steps=2)
    duals, updates = _run(tx, [1.5, 1.5, 1.5, 0.0, 0.0])
    assert [d for d, _ in duals] == [1.0, 1.0, 1.0, 3.0, 2.0]  # λ of each step: held for 2 steps
    assert [n for _, n in duals] == [1.0, 1.0, 3.0, 2.0, 1.0]
    np.testing.assert_allclose(updates, [1 + 2 * d for d, _ in duals])
    duals, _ = _run(primal_dual(0.5, eps=1.0, step_size=1.0), [0.0, 0.0])
    assert [n for _, n in duals] == [0.0, 0.0]  # projected onto λ >= 0


def test_gru_does_not_go_over_pdu():
    with pytest.raises(ConfigError, match="GRU does not go over pdu"):
        C.method_schema("gru", "pdu")
    with pytest.raises(ConfigError, match="primal_dual"):
        primal_dual(-1.0, eps=0.1)
