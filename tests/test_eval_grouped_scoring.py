"""Shared-prefix scoring (sga_jax.eval.scoring.grouped_sequence_nll) gives each sequence the NLL it
gets scored on its own by the plain forward path, whatever the batching and padding."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.data.formatting import Encoded
from sga_jax.eval.scoring import (
    grouped_sequence_nll,
    split_shared_prefix,
    suffix_batches,
    suffix_length,
    summed_nll,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = write_tiny_hf("llama", tmp_path_factory.mktemp("grouped") / "llama")
    return sga_jax.load_model(path)


def qa(prompt: list[int], answer: list[int]) -> Encoded:
    return Encoded(prompt + answer, [0] * len(prompt) + [1] * len(answer))


def groups_of_questions(seed: int = 0) -> list[list[Encoded]]:
    """Questions with 2-7 answers of ragged lengths each (as TOFU's gt / paraphrase / perturbed)."""
    rng = np.random.default_rng(seed)
    out = []
    for n_prompt, n_answers in [(5, 7), (12, 3), (3, 2), (20, 5), (8, 7), (15, 4), (6, 2)]:
        prompt = rng.integers(3, 96, size=n_prompt).tolist()
        out.append(
            [qa(prompt, rng.integers(3, 96, size=rng.integers(1, 30)).tolist()) for _ in range(n_answers)]
        )
    return out


def test_split_shared_prefix_stops_before_the_first_predicted_token():
    a, b = qa([5, 6, 7, 8], [9, 10]), qa([5, 6, 7, 8], [11])
    prefix, (sa, sb) = split_shared_prefix([a, b])
    # token 8 predicts the first target, so it starts every suffix
    assert prefix == [5, 6, 7] and sa.input_ids == [8, 9, 10] and sb.input_ids == [8, 11]
    assert sa.loss_mask == [0, 1, 1]
    # different prompts: only their common start is shared
    prefix, _ = split_shared_prefix([qa([5, 6, 7, 8], [9]), qa([5, 1, 7, 8], [9])])
    assert prefix == [5]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_grouped_equals_one_by_one(model, batch_size):
    groups = groups_of_questions()
    got = grouped_sequence_nll(model, groups, pad_id=0, batch_size=batch_size)
    for g, (total, count) in zip(groups, got):
        for k, seq in enumerate(g):
            want_total, want_count = summed_nll(model, [seq], pad_id=0, batch_size=1)
            assert count[k] == want_count[0] == sum(seq.loss_mask)
            np.testing.assert_allclose(total[k], want_total[0], rtol=2e-5)


def test_grouped_scoring_of_a_scanned_model(tmp_path):
    """Scanned layers stack the cache as [L, B, ...]: each suffix must read its group's row of the
    batch axis, not a layer (the bug: ``c[group_row]`` picked layers, or failed on a shape)."""
    path, _ = write_tiny_hf("llama", tmp_path / "llama")
    scanned = sga_jax.load_model(path, scan_layers=True)
    groups = groups_of_questions(seed=1)[:4]
    got = grouped_sequence_nll(scanned, groups, pad_id=0, batch_size=3)
    for g, (total, _) in zip(groups, got):
        want, _ = summed_nll(scanned, g, pad_id=0, batch_size=len(g))
        np.testing.assert_allclose(total, want, rtol=2e-5)


def test_padding_the_last_batch_changes_nothing(model):
    """A small token budget (many batches, padded last ones) and a big one (everything in one
    prefill and few suffix batches) give the same numbers."""
    groups = groups_of_questions(seed=1)
    calls: list[tuple] = []
    padded = grouped_sequence_nll(model, groups, pad_id=0, token_budget=64, calls=calls)
    exact = grouped_sequence_nll(model, groups, pad_id=0, token_budget=4096)
    for (t1, c1), (t2, c2) in zip(padded, exact):
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_allclose(t1, t2, rtol=2e-5)
    suffix = [c for c in calls if c[0] == "suffix"]
    assert len(suffix) > 3 and all(rows * t <= 64 for _, rows, t, _ in suffix)


def test_suffix_batches_fill_a_token_budget():
    """Short suffixes go in big batches (rows × length about the budget), the shapes are powers of
    two rows on a few lengths, and every item lands in exactly one batch."""
    lengths = [5] * 150 + [7] * 10 + [40] * 30 + [70] * 3
    batches = suffix_batches(lengths, 2048, 16)
    assert sorted(j for _, _, take in batches for j in take) == list(range(len(lengths)))
    for rows, t, take in batches:
        assert rows & (rows - 1) == 0 and len(take) <= rows and rows * t <= 2048
        assert all(lengths[j] <= t for j in take)
    assert {(rows, t) for rows, t, _ in batches} == {(16, 80), (32, 48), (256, 8)}
    assert [suffix_length(n, 16) for n in (1, 3, 5, 9, 16, 17, 40)] == [1, 4, 8, 16, 16, 32, 48]


def test_no_common_prefix(model):
    """Sequences with different first tokens: an empty prefix, still the right numbers."""
    groups = [[qa([4, 5], [6, 7]), qa([9, 5], [6])]]
    ((total, count),) = grouped_sequence_nll(model, groups, pad_id=0, batch_size=2)
    want_total, want_count = summed_nll(model, groups[0], pad_id=0, batch_size=2)
    np.testing.assert_array_equal(count, want_count)
    np.testing.assert_allclose(total, want_total, rtol=2e-5)
