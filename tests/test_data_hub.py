"""``data.source=hub``: TOFU through ``datasets.load_dataset``, offline. The "hub" is a local folder
laid out as a Hugging Face dataset repository (a README whose YAML names each config's data
files, one JSON file per config), holding the first rows of the real TOFU files."""

from __future__ import annotations

import json

import pytest

from sga_jax import config as C
from sga_jax.data import splits, tofu
from sga_jax.errors import ConfigError

N = 3


@pytest.fixture
def hub_copy(tmp_path, data_dir, monkeypatch):
    import datasets

    # datasets' cache (Arrow files of what it loads) goes to tmp_path, not the user's home
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    repo = tmp_path / "TOFU"
    repo.mkdir()
    configs = ("forget01", "retain99")
    lines = ["---", "configs:"]
    for name in configs:
        lines += [f"- config_name: {name}", f"  data_files: {name}.json"]
        rows = json.loads((data_dir / "tofu" / f"{name}.json").read_text())[:N]
        (repo / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text("\n".join([*lines, "---", "", "A few TOFU rows.", ""]))
    return repo


def test_hub_source_reads_the_configs_through_datasets(hub_copy, data_dir):
    cfg = C.compose([], ["data.source=hub", f"data.hub_repo={hub_copy}", "data.forget=forget01"])
    assert (cfg.data.source, cfg.data.hub_repo) == ("hub", str(hub_copy))
    forget, retain = splits.load_rows(cfg.data, need_retain=True)  # retain: forget01's retain99
    for got, name in ((forget, "forget01"), (retain, "retain99")):
        want = tofu.load_tofu(name, data_dir=data_dir / "tofu", limit=N)
        assert len(got) == N
        assert [(r["question"], r["answer"]) for r in got] == [(r["question"], r["answer"]) for r in want]


def test_hub_source_errors_are_one_line(hub_copy):
    cfg = C.compose([], ["data.source=hub", f"data.hub_repo={hub_copy}", "data.forget=forget05"])
    with pytest.raises(tofu.DataError, match="cannot load .* config 'forget05' with datasets") as e:
        splits.load_rows(cfg.data, need_retain=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.source"):
        C.compose([], ["data.source=web"])
