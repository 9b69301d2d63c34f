"""MUSE-Books (Harry Potter) beside MUSE-News: the loaders on the real folder (never copied here:
the text is copyrighted), MUSE's training chunks of the raw forget text (jaechan-repo/muse_bench
baselines/baselines/dataset.py l. 56-77), the MUSE evaluation on a tiny random model, and one
``sga-jax unlearn`` run on SmolLM2 that unlearns the chunks and evaluates MUSE-Books."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import write_tiny_hf

import sga_jax
from sga_jax.data import muse
from sga_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
MUSE_KEYS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak", "privleak_auc")

# hand-written, a few hundred tokens
TEXT = " ".join(
    f"Line {i}: the lighthouse keeper counted {i * 7} gulls before the tide turned at dawn."
    for i in range(40)
)


def books(*parts: str) -> Path:
    from sga_jax.paths import data_root

    return data_root().joinpath("muse_books", *parts)


def test_books_loaders_on_the_real_folder(data_dir):
    kw = {"corpus": "books"}
    assert len(muse.load_knowmem("forget", **kw)) == 100 and len(muse.load_knowmem("retain", **kw)) == 100
    icl = muse.load_knowmem("forget", icl=True, **kw)
    assert icl == json.loads(books("knowmem", "forget_qa_icl.json").read_text())
    assert muse.load_knowmem("forget", **kw) != muse.load_knowmem("forget")  # not News's
    v = muse.load_verbmem(limit=5, **kw)
    assert len(muse.load_verbmem(**kw)) == 100 and v[0]["prompt"] and v[0]["gt"]
    for split in ("forget", "holdout", "retain"):
        assert len(muse.load_privleak(split, **kw)) == 100
    for split, n in (("retain1", 12), ("retain2", 13), ("holdout", 3)):
        assert len(muse.load_raw(split, **kw)) == n
    (raw,) = muse.load_raw("forget", **kw)  # raw/forget.txt: one row, the whole text
    assert raw["text"] == books("raw", "forget.txt").read_text(encoding="utf-8")
    with pytest.raises(DataError, match="unknown MUSE corpus"):
        muse.load_verbmem(corpus="poems")


def test_chunk_tokens_as_muse():
    """dataset.py l. 59-77: pieces of max_len - 1 after BOS, the short last one filled from the first."""
    toks = list(range(10, 20))
    assert muse.chunk_tokens(toks, 4, [1]) == [
        [1, 10, 11, 12],
        [1, 13, 14, 15],
        [1, 16, 17, 18],
        [1, 19, 1, 10],
    ]
    assert muse.chunk_tokens(toks, 5) == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert muse.chunk_tokens([7], 4, [1]) == [[1, 7, 1, 7]]
    with pytest.raises(DataError):
        muse.chunk_tokens(toks, 1, [1])


def _check_chunks(chunks, tok, text: str, max_length: int) -> None:
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    prefix = tok("", add_special_tokens=True)["input_ids"]
    step = max_length - len(prefix)
    assert all(len(c["input_ids"]) <= max_length for c in chunks)
    assert all(c["input_ids"][: len(prefix)] == prefix for c in chunks)
    assert len(chunks) == -(-len(tokens) // step)
    body = [t for c in chunks for t in c["input_ids"][len(prefix) :]]
    assert body[: len(tokens)] == tokens  # the concatenation covers the text, in order
    assert tok.decode(body[: len(tokens)]) == tok.decode(tokens)


def test_chunk_text_covers_a_hand_written_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chunks = muse.chunk_text(TEXT, tok, 64)
    assert len(chunks) > 3
    _check_chunks(chunks, tok, TEXT, 64)
    assert "".join(c["text"] for c in chunks).startswith(TEXT)  # the rotated tail follows the text


def test_forget_rows_of_a_run_are_the_real_text_chunks(smollm2_tokenizer, data_dir):
    from sga_jax import config as C
    from sga_jax.data import splits

    d = C.DataConfig(benchmark="muse_books", forget="raw", retain="retain2", max_length=2048)
    forget, retain = splits.load_rows(d, need_retain=True)
    assert len(forget) == 1 and len(retain) == 100
    chunks = splits.prepare_forget_rows(d, forget, smollm2_tokenizer)
    _check_chunks(chunks, smollm2_tokenizer, forget[0]["text"], 2048)
    assert len(chunks) > 100
    d4 = C.DataConfig(benchmark="muse_books", forget="raw", max_length=2048, limit=4)
    assert splits.prepare_forget_rows(d4, forget, smollm2_tokenizer) == chunks[:4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path, _ = write_tiny_hf(
        "llama", tmp_path_factory.mktemp("books") / "llama", vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=4096,
    )  # fmt: skip
    return path, sga_jax.load_model(path)


def test_books_eval_on_a_tiny_model(tiny, smollm2_tokenizer, data_dir, tmp_path):
    from sga_jax.eval.run import evaluate

    path, model = tiny
    res = evaluate(
        "muse_books", path, tmp_path, model=model, tokenizer=smollm2_tokenizer, limit=2,
        retrain_auc=0.5, batch_size=2, progress=False,
    )  # fmt: skip
    assert all(isinstance(res[k], float) for k in MUSE_KEYS) and res["benchmark"] == "muse_books"
    assert 0.0 <= res["knowmem_r"] <= 100.0  # MUSE's utility figure
    logs = json.loads((tmp_path / "muse_logs.json").read_text())
    want = json.loads(books("verbmem", "forget.json").read_text())[:2]
    assert [r["prompt"] for r in logs["verbmem_f"]] == [r["prompt"] for r in want]
    qa = json.loads(books("knowmem", "retain2_qa.json").read_text())[:2]
    assert [r["question"] for r in logs["knowmem_r"]] == [r["question"] for r in qa]
    assert json.loads((tmp_path / "results.json").read_text())["privleak"] == res["privleak"]
    # retrain_auc="official": MUSE's Books retrain AUC (muse_bench constants.py: 0.5393)
    auc = res["privleak_auc"]
    official = evaluate(
        "muse_books", path, tmp_path / "official", model=model, tokenizer=smollm2_tokenizer, limit=2,
        retrain_auc="official", metrics=["privleak"], batch_size=2, progress=False,
    )  # fmt: skip
    assert official["privleak_auc"] == pytest.approx(auc)
    assert official["privleak"] == pytest.approx((auc - 0.5393) / 0.5393 * 100, abs=1e-3)


@pytest.mark.slow
def test_unlearns_and_evaluates_books_through_the_cli(smollm2_gguf, tmp_path, data_dir):
    from sga_jax.cli import main

    out = tmp_path / "run"
    rc = main(
        ["unlearn", "benchmark=muse_books", "method=ga", f"model.path={smollm2_gguf}", f"output_dir={out}",
         "data.limit=4", "data.max_length=128", "train.steps=2", "train.batch_size=2",
         "train.grad_accum=1", "train.progress=false", "eval.benchmark=muse_books",
         "eval.options={limit: 2, batch_size: 2, retrain_auc: 0.5, progress: false}"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["benchmark"] == "muse_books" and res["limit"] == 2
    assert all(isinstance(res[k], float) for k in MUSE_KEYS)
    assert (out / "eval" / "muse_logs.json").is_file()


def test_books_configs_compose():
    from sga_jax import config

    cfg = config.compose([ROOT / "configs/experiment/muse_books_sga.yaml"], ["model.path=/m"])
    assert (cfg.data.benchmark, cfg.data.forget, cfg.data.retain) == ("muse_books", "raw", "retain2")
    assert cfg.eval.benchmark == "muse_books" and cfg.method.name == "sga"


def test_books_from_a_hub_layout(tmp_path, monkeypatch, smollm2_tokenizer):
    """``data.source=hub``: MUSE-Books' hub configs (a local copy in the hub layout, hand-written
    rows); the raw forget rows are joined and chunked as the local text; the default hub id."""
    import datasets

    from sga_jax import config as C
    from sga_jax.data import splits

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "MUSE-Books"
    (repo / "raw").mkdir(parents=True)
    (repo / "privleak").mkdir()
    halves = [TEXT[: len(TEXT) // 2], TEXT[len(TEXT) // 2 :]]
    (repo / "raw" / "forget.json").write_text("".join(json.dumps({"text": t}) + "\n" for t in halves))
    (repo / "privleak" / "retain.json").write_text(json.dumps({"text": "A retain line."}) + "\n")
    lines = ["---", "configs:"]
    for config, split in (("raw", "forget"), ("privleak", "retain")):
        lines += [
            f"- config_name: {config}",
            "  data_files:",
            f"  - split: {split}",
            f"    path: {config}/{split}.json",
        ]
    (repo / "README.md").write_text("\n".join([*lines, "---", ""]))
    d = C.DataConfig(benchmark="muse_books", forget="raw", source="hub", hub_repo=str(repo), max_length=64)
    forget, retain = splits.load_rows(d, need_retain=True)
    assert [r["text"] for r in forget] == halves and retain == [{"text": "A retain line."}]
    chunks = splits.prepare_forget_rows(d, forget, smollm2_tokenizer)
    assert chunks == muse.chunk_text("\n\n".join(halves), smollm2_tokenizer, 64)
    assert muse.CORPORA["books"][1] == "muse-bench/MUSE-Books"
