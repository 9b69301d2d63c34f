"""Loaders on the real benchmark files (../shared/data) and on bad input written by the tests."""

from __future__ import annotations

import json

import pytest

from sga_jax.data import muse, tofu, wmdp
from sga_jax.data.jsonl import load_user_rows, read_records
from sga_jax.errors import DataError

# MANIFEST.md row counts
TOFU_ROWS = {
    "forget01": 40, "forget05": 200, "forget10": 400, "forget10_perturbed": 400,
    "retain90": 3600, "retain95": 3800, "retain99": 3960, "full": 4000,
    "retain_perturbed": 400, "real_authors_perturbed": 100, "world_facts_perturbed": 117,
    "idontknow": 100,
}  # fmt: skip


@pytest.mark.parametrize("config", sorted(TOFU_ROWS))
def test_tofu_configs(data_dir, config):
    rows = tofu.load_tofu(config, data_dir=data_dir / "tofu")
    assert len(rows) == TOFU_ROWS[config]
    if config == "idontknow":
        assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    else:
        assert all(r["question"] and r["answer"] for r in rows)
    if config in ("retain_perturbed", "forget10_perturbed"):
        assert all(len(r["perturbed_answer"]) == 5 and r["paraphrased_answer"] for r in rows)
    if config == "real_authors_perturbed":
        assert rows[0]["answer"] == "William Shakespeare" and len(rows[0]["perturbed_answer"]) == 3


def test_tofu_full_is_retain90_then_forget10(data_dir):
    full = tofu.load_tofu("full")
    assert full[:3600] == tofu.load_tofu("retain90") and full[3600:] == tofu.load_tofu("forget10")
    assert len(tofu.load_tofu("forget10", limit=300)) == 300


def test_muse_news(data_dir):
    assert len(muse.load_knowmem("forget")) == 100 and len(muse.load_knowmem("retain")) == 100
    assert len(muse.load_knowmem("forget", icl=True)) == 10
    v = muse.load_verbmem(limit=5)
    assert len(v) == 5 and v[0]["prompt"] and v[0]["gt"]
    for split in ("forget", "holdout", "retain"):
        assert len(muse.load_privleak(split)) == 100
    raw = muse.load_raw("forget")
    assert len(raw) == 889 and raw[0]["text"].startswith("Greek Prime Minister")


def test_wmdp_format(tmp_path):
    items = [
        {"question": "Which planet is closest to the Sun?",
         "choices": ["Venus", "Mercury", "Earth", "Mars"], "answer": 1},
        {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
        {"question": "Water freezes at how many degrees Celsius?",
         "choices": ["0", "10", "50", "100"], "answer": 0},
    ]  # fmt: skip
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    rows = wmdp.load_wmdp(path)
    assert rows == items
    assert wmdp.format_prompt(rows[1]) == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    bad = dict(items[0], answer=4)
    (tmp_path / "bad.json").write_text(json.dumps([items[1], bad]))
    with pytest.raises(DataError, match="row 1 key 'answer'"):
        wmdp.load_wmdp(tmp_path / "bad.json")
    (tmp_path / "three.json").write_text(json.dumps([dict(items[0], choices=["a", "b", "c"])]))
    with pytest.raises(DataError, match="row 0 key 'choices' has 3 items"):
        wmdp.load_wmdp(tmp_path / "three.json")


def test_user_json_and_jsonl(tmp_path):
    (tmp_path / "qa.json").write_text(json.dumps([{"question": "q1", "answer": "a1"}]))
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_user_rows(tmp_path / "qa.json") == [{"question": "q1", "answer": "a1"}]
    assert [r["text"] for r in load_user_rows(tmp_path / "t.jsonl")] == ["one", "two"]


def test_bad_input(tmp_path, data_dir):
    with pytest.raises(DataError, match="not found"):
        tofu.load_tofu("forget10", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown TOFU config"):
        tofu.load_tofu("forget11")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        read_records(tmp_path / "empty.json")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "blank.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(DataError, match="line 2"):
        read_records(tmp_path / "broken.jsonl")
    rows = [{"question": "q", "answer": "a"}, {"question": "q2", "answr": "typo"}]
    (tmp_path / "malformed.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"row 1 has no key 'answer'"):
        load_user_rows(tmp_path / "malformed.json", kind="qa")
    (tmp_path / "forget10.json").write_text(json.dumps([{"question": "q", "answer": 3}]))
    with pytest.raises(DataError, match="row 0 key 'answer' is a int"):
        tofu.load_tofu("forget10", data_dir=tmp_path)
    (tmp_path / "retain_perturbed.json").write_text(
        json.dumps({"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": ["x"]})
    )
    with pytest.raises(DataError, match="has 1 items, expected 5"):
        tofu.load_tofu("retain_perturbed", data_dir=tmp_path)
