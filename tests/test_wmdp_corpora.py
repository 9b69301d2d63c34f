"""WMDP as RMU trains on it (issue 26, part 5), offline: hand-written harmless stand-ins for the
corpora (the real ones come from the hub) in the files RMU's ``data/`` folder holds, read through
the registry's WMDP loader, and the shipped RMU run config run end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import write_tiny_llama_for

from sga_jax import config as C
from sga_jax.cli import main
from sga_jax.data import splits, wmdp
from sga_jax.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
FORGET = [  # harmless passages standing in for the cyber forget corpus
    "The lighthouse keeper logged the tides every morning at six and every evening at six.",
    "Bread rises because yeast ferments sugar and releases carbon dioxide into the dough.",
    "A sundial tells the time from the shadow its gnomon casts on a marked plate.",
    "Honeybees dance in figures of eight to tell the hive where the flowers are.",
]
# Wikitext-2's raw lines include empty ones and short headings; RMU keeps len(text) > 0
WIKI = ["", " = Valkyria Chronicles = \n", "", " The game began development in 2010 , carrying over "
        "a large portion of the work done on its predecessor . \n", " \n"]  # fmt: skip
QUESTIONS = [
    {"question": "Which gas makes bread rise?", "choices": ["Oxygen", "Carbon dioxide", "Helium", "Neon"],
     "answer": 1},
    {"question": "What casts the shadow on a sundial?", "choices": ["The plate", "The gnomon", "The dial",
     "The hour"], "answer": 1},
]  # fmt: skip


def _write(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cyber-forget-corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in FORGET))
    (folder / "wikitext.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in WIKI))
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return folder


def test_corpora_as_rmu_reads_them(tmp_path):
    folder = _write(tmp_path / "wmdp")
    d = C.DataConfig(
        benchmark="wmdp", forget="cyber-forget-corpus", retain="wikitext", data_dir=str(tmp_path)
    )
    forget, retain = splits.load_rows(d, need_retain=True)
    assert [r["text"] for r in forget] == FORGET
    assert [r["text"] for r in retain] == [w for w in WIKI if len(w) > 0]  # RMU: len(text) > min_len = 0
    # the default retain set is Wikitext; a file path works as either corpus; limit applies to both
    d = C.DataConfig(
        benchmark="wmdp", forget=str(folder / "cyber-forget-corpus.jsonl"), data_dir=str(folder), limit=2
    )
    forget, retain = splits.load_rows(d, need_retain=True)
    assert [r["text"] for r in forget] == FORGET[:2] and len(retain) == 2


def test_bad_corpora_are_one_clear_error(tmp_path):
    _write(tmp_path)
    with pytest.raises(DataError, match="unknown WMDP corpus 'cyber-forget'; use one of bio-forget-corpus"):
        wmdp.load_corpus("cyber-forget", data_dir=tmp_path)
    with pytest.raises(DataError, match="data file not found: .*cyber-retain-corpus.jsonl"):
        wmdp.load_corpus("cyber-retain-corpus", data_dir=tmp_path)
    (tmp_path / "notext.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="row 0.*'text'"):
        wmdp.load_corpus(str(tmp_path / "notext.jsonl"))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no text longer than 0 characters"):
        wmdp.load_corpus(str(tmp_path / "blank.jsonl"))
    with pytest.raises(ConfigError, match="data.benchmark"):
        C.DataConfig(benchmark="wmdp_cyber")


def test_rmu_run_config_end_to_end(tmp_path, smollm2_tokenizer):
    """configs/experiment/wmdp_rmu.yaml as shipped, offline: the local stand-ins, a 2-layer model
    (layer 1 steered, its down projection trained), 2 steps, then the WMDP-format evaluation."""
    folder = _write(tmp_path / "data")
    model, _ = write_tiny_llama_for(smollm2_tokenizer, tmp_path / "tiny", max_position_embeddings=1024)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped 1 of 3 rows.*shorter than two tokens"):  # " \n"
        rc = main(
            ["unlearn", "-c", str(ROOT / "configs/experiment/wmdp_rmu.yaml"), f"model.path={model}",
             f"output_dir={out}", "data.source=local", f"data.data_dir={folder}", "train.steps=2",
             "method.layer=1", r"method.trainable=['model\.layers\.1\.mlp\.down_proj\.weight']",
             f"eval.options.data={folder / 'questions.jsonl'}", "train.progress=false"]
        )  # fmt: skip
    assert rc == 0
    resolved = (out / "config.yaml").read_text()
    for line in ("steering_coeff: 6.5", "retain_weight: 1200.0", "seed: 42", "max_length: 768", "steps: 2"):
        assert line in resolved, line
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["benchmark"] == "wmdp" and 0.0 <= results["accuracy"] <= 1.0
    assert len(results["predictions"]) == len(QUESTIONS)
