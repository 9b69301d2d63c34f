"""The benchmark registry (issue 26, part 1): adding a benchmark is one module.

A toy benchmark is written as one new module in a folder added to ``sga_jax.benchmarks``' search path
(no other file names it). Then, with nothing else changed: its options are checked, the run config
accepts it as ``data.benchmark`` and ``eval.benchmark``, ``sga-jax unlearn`` trains on its rows and
evaluates with its runner (a real perplexity of a real tiny model), ``sga-jax eval`` finds it and
its alias, and ``--help`` lists it. The same module through the ``sga_jax.benchmarks`` entry-point
group is found too.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from tiny_models import write_tiny_llama_for

import sga_jax.benchmarks as package
from sga_jax import config as C
from sga_jax.benchmarks import registry
from sga_jax.cli import build_parser, main
from sga_jax.data import splits
from sga_jax.errors import ConfigError
from sga_jax.eval.options import check_options

TOY = '''
"""A toy benchmark: rows from a JSONL file, evaluated by their perplexity times ``scale``."""

from sga_jax.benchmarks.registry import Benchmark, register
from sga_jax.eval.options import whole


def _rows(d, where, need_retain):
    import json

    rows = [json.loads(line) for line in open(d.forget)][: where["limit"]]
    return rows, (rows[::-1] if need_retain else None)


def _run(r):
    from sga_jax.eval.mia import perplexity

    texts = ["What is 2+2? Four.", "Sky? Blue."]
    return {"score": r.options.pop("scale", 1) * perplexity(r.model, r.tokenizer, texts)}

register(Benchmark(
    name="{name}", run=_run, options={"scale": whole}, load_rows=_rows, result_keys=("score",),
    aliases={"{name}_big": {"scale": 10}}, help="  {name}:  scale=N",
))
'''

ROWS = [{"question": "What is 2+2?", "answer": "Four."}, {"question": "Sky?", "answer": "Blue."}] * 4


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as a fresh process finds it, restored after the test. It is loaded first, so
    that what is restored is the loaded registry with its modules imported: restoring an unloaded
    one while its modules stay imported would leave every later test with an empty registry (the
    modules register when first imported, and a second import does not run them)."""
    registry.names()
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", False)
    for mod in [m for m in sys.modules if m.startswith("sga_jax.benchmarks.")]:
        if mod != "sga_jax.benchmarks.registry":
            monkeypatch.delitem(sys.modules, mod)


@pytest.fixture
def toy(tmp_path, monkeypatch, fresh_registry):
    """One new module, ``toy.py``, in a folder on sga_jax.benchmarks' search path."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy.py").write_text(TOY.replace("{name}", "toy"))
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    return folder


def test_builtin_benchmarks_are_registered(fresh_registry):
    from sga_jax.benchmarks.tofu import FILES
    from sga_jax.eval import tofu

    assert set(registry.names("eval")) == {"tofu", "muse_news", "muse_books", "ppl", "mia", "wmdp", "lm_eval"}
    assert set(registry.names("data")) == {"tofu", "muse_news", "muse_books", "jsonl", "wmdp"}
    assert FILES == tuple(tofu.FILES)
    spec, preset = registry.resolve("tofu_forget05")
    assert spec.name == "tofu" and preset == {"forget_split": "forget05"}
    with pytest.raises(ConfigError, match="unknown benchmark 'glue'; choose one of"):
        registry.resolve("glue")
    with pytest.raises(ConfigError, match="data.benchmark: unknown benchmark 'ppl'"):
        registry.get("ppl", kind="data", key="data.benchmark")  # ppl evaluates only
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.Benchmark(name="tofu"))


def test_a_new_module_is_a_new_benchmark(toy, tmp_path, smollm2_tokenizer, capsys):
    assert "toy" in registry.names("eval") and "toy" in registry.names("data")
    check_options("toy", {"scale": 3})
    with pytest.raises(ConfigError, match="scale=0: must be a whole number"):
        check_options("toy", {"scale": 0})
    with pytest.raises(ConfigError, match="'k': not an option of the toy evaluation"):
        C.EvalConfig(benchmark="toy", options={"k": 1})
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    forget, retain = splits.load_rows(
        C.DataConfig(benchmark="toy", forget=str(rows_file), limit=6), need_retain=True
    )
    assert forget == ROWS[:6] and retain == ROWS[:6][::-1]
    assert "toy:  scale=N" in build_parser()._subparsers._group_actions[0].choices["eval"].format_help()

    # sga-jax unlearn trains on its rows and evaluates with its runner; nothing else names it
    model, _ = write_tiny_llama_for(smollm2_tokenizer, tmp_path / "tiny")
    out = tmp_path / "run"
    rc = main(
        ["unlearn", f"model.path={model}", f"output_dir={out}", "method=ga", "data.benchmark=toy",
         f"data.forget={rows_file}", "train.steps=1", "train.batch_size=2", "train.progress=false",
         "eval.benchmark=toy", "eval.options.scale=2"]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["benchmark"] == "toy" and results["options"] == {"scale": 2}
    assert results["score"] > 2.0  # 2 x a perplexity (> 1)

    # sga-jax eval: the alias presets its option, and the score scales with it
    assert main(["eval", str(model), "-b", "toy_big", "--out", str(tmp_path / "e10")]) == 0
    assert main(["eval", str(model), "-b", "toy", "--out", str(tmp_path / "e1")]) == 0
    big, one = (json.loads((tmp_path / e / "results.json").read_text()) for e in ("e10", "e1"))
    assert big["options"] == {"scale": 10} and big["score"] == pytest.approx(10 * one["score"], rel=1e-6)


def test_an_entry_point_registers_a_benchmark(tmp_path, monkeypatch, fresh_registry):
    (tmp_path / "toy_plugin.py").write_text(TOY.replace("{name}", "toy2"))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="toy2", value="toy_plugin", group="sga_jax.benchmarks")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "sga_jax.benchmarks" else [])
    assert registry.get("toy2", kind="eval").result_keys == ("score",)


def test_a_runner_missing_its_result_keys_is_a_bug_said_plainly(toy, monkeypatch, tmp_path):
    from sga_jax.eval.run import evaluate

    spec = registry.get("toy")
    monkeypatch.setitem(registry._REGISTRY, "toy", registry.Benchmark(
        name="toy", run=lambda r: {}, result_keys=spec.result_keys))  # fmt: skip
    with pytest.raises(RuntimeError, match="returned no score"):
        evaluate("toy", "unused", tmp_path / "out", model=object(), tokenizer=object())
    assert not (tmp_path / "out" / "results.json").exists()


def test_the_design_doc_says_how_to_add_one():
    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    assert "sga_jax/benchmarks/" in text and "register(" in text
