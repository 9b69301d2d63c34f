"""``sga-jax plan`` (issue 28): targets, the missing-libtpu message, and the compiled step's bytes.

The fast tests run in the default suite (no libtpu needed; the cpu:N plan compiles a tiny step on
the suite's simulated CPU devices). The ``tpu_aot`` ones compile with libtpu for a TPU v5e
topology (no TPU needed) in a fresh ``sga-jax plan --json`` process each: ``make test-tpu-aot``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from sga_jax import cli
from sga_jax import config as C
from sga_jax import plan as PL
from sga_jax import plan_targets as PT
from sga_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SGA = str(ROOT / "configs/experiment/tofu_sga.yaml")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='libtpu is not installed (pip install "sga-jax[tpu]")'
)
needs_cuda_plugin = pytest.mark.skipif(
    PT._cuda_plugin_missing(), reason='jax\'s CUDA plugin is not installed (pip install "sga-jax[gpu-aot]")'
)

# Every parameter shard of this Llama is whole TPU tiles over 4 chips ((8, 128) float32 tiles: the
# minor dimension a multiple of 128 once split over fsdp = 4; 8 layers stack the norm scales to
# [8, 512]), so XLA's argument bytes on a TPU carry no layout padding and equal the hand count.
ALIGNED = dict(
    model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)  # fmt: skip


# The test suite's tiny Llama (tests/tiny_models.py): every matrix splits evenly over fsdp = 4.
TINY = dict(
    model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)  # fmt: skip


def _param_counts(c: dict) -> tuple[int, int]:
    """(parameters sharded over fsdp, replicated parameters: the RMSNorm scales) of a Llama."""
    d, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = d // c["num_attention_heads"]
    attn = 2 * d * d + 2 * d * c["num_key_value_heads"] * hd
    return n * (attn + 3 * d * f) + 2 * v * d, (2 * n + 1) * d


def _model_dir(tmp_path: Path, config: dict) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    return out


def expected_argument_bytes(config: dict, chips: int, batch: int, k: int, t: int) -> int:
    """float32 parameters + Adam mu and nu = 12 bytes per parameter (the sharded ones / chips),
    plus the int32 batch (3 arrays [rows, T]; SGA reads the forget rows and their K-1 normal rows;
    the retain rows step_batch also carries are unused, and jax.jit drops them) over the chips."""
    sharded, replicated = _param_counts(config)
    rows = batch * k
    return 12 * (sharded // chips + replicated) + 3 * rows * t * 4 // chips


# ----------------------------------------------------------------------------- default suite


@pytest.mark.parametrize(
    "text, chips, topology",
    [
        ("tpu:v5e-64", 64, "v5e:8x8"),
        ("tpu:v5e-4", 4, "v5e:2x2"),
        ("tpu:v6e-256", 256, "v6e:16x16"),
        ("tpu:v5p-128", 64, "v5p:4x4x4"),  # v5p-N counts TensorCores: 128 cores = 64 chips
        ("cpu:8", 8, None),
        ("gpu:h100-8", 8, "1x1x8"),  # one HGX host
        ("gpu:h100-2", 2, "1x1x2"),
        ("gpu:h200-64", 64, "1x8x8"),  # 8 hosts of 8
    ],
)
def test_parse_target(text, chips, topology):
    t = PL.parse_target(text)
    assert (t.chips, t.topology) == (chips, topology)
    assert (t.chip is None) == (t.platform == "cpu")


@pytest.mark.parametrize(
    "text",
    ["tpu:v5e-3", "tpu:v4-8", "gpu:h100-12", "gpu:a100-8", "gpu:h100", "cpu:0", "cpu:x", "v5e-64", "tpu:v5e"],
)
def test_parse_target_refuses(text):
    with pytest.raises(ConfigError, match="--target"):
        PL.parse_target(text)


def test_missing_libtpu_is_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        PT.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    rc = cli.main(["plan", "--config", SGA, "model.path=llama2-7b", "--target", "tpu:v5e-64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("sga-jax: error:") and 'pip install "sga-jax[tpu]"' in err[0]


def test_missing_cuda_plugin_is_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        PT.importlib.util, "find_spec", lambda name, *a: None if "cuda" in name else real(name, *a)
    )
    rc = cli.main(["plan", "--config", SGA, "model.path=llama2-7b", "--target", "gpu:h100-8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("sga-jax: error:") and 'pip install "sga-jax[gpu-aot]"' in err[0]


def test_gpu_target_config_is_the_chip():
    """The device description the GPU compiler reads: Hopper's SM counts, each chip's HBM."""
    h100, h200 = PT.gpu_target_config("h100"), PT.gpu_target_config("h200")
    assert "core_count: 132\n" in h100 and "major: 9 minor: 0" in h100 and 'platform_name: "CUDA"' in h100
    assert "device_memory_size: 80000000000\n" in h100 and "memory_bandwidth: 3350000000000\n" in h100
    assert "device_memory_size: 141000000000\n" in h200 and "memory_bandwidth: 4800000000000\n" in h200


def test_bad_target_and_model_are_one_line(capsys, tmp_path):
    assert cli.main(["plan", "--config", SGA, "model.path=llama2-7b", "--target", "tpu:v5e-5"]) == 2
    assert "v5e sizes: 4, 8, 16" in capsys.readouterr().err
    rc = cli.main(["plan", "--config", SGA, f"model.path={tmp_path}", "--target", "cpu:4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "config.json" in err[0]


def test_cpu_plan_argument_bytes(tmp_path):
    """The whole path on 4 of the suite's CPU devices: XLA:CPU pads nothing, so the arguments are
    exactly the parameters, both Adam moments and the batch (plus the optimizer's scalars)."""
    cfg = C.compose(
        [SGA],
        [f"model.path={_model_dir(tmp_path, TINY)}", "data.max_length=64", "train.batch_size=8",
         "train.grad_accum=1", "mesh.fsdp=4"],
    )  # fmt: skip
    report = PL.plan(cfg, "cpu:4", search=False)
    p = report["plan"]
    assert p["error"] is None and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    want = expected_argument_bytes(TINY, 4, 8, 4, 64)
    assert 0 <= p["argument_bytes"] - want <= 64, (p["argument_bytes"], want)  # + Adam's count etc.
    assert p["rows"] == 8 * 4 and p["tokens"] == 8 * 4 * 64
    assert p["fits"] is None and p["bound_s"] is None  # a CPU target has no datasheet
    assert "fits unknown" in PL.format_report(report)
    assert len(jax.devices()) == 8  # the suite's devices: a plan for fewer never lowers the count


# ---------------------------------------------------------------------------------- tpu_aot


def _plan_json(*args: str) -> dict:
    cmd = [sys.executable, "-m", "sga_jax.cli", "plan", "--config", SGA, "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.tpu_aot
@needs_libtpu
def test_tpu_plan_compiles_and_counts_arguments(tmp_path):
    report = _plan_json(
        f"model.path={_model_dir(tmp_path, ALIGNED)}", "data.max_length=128", "train.batch_size=8",
        "train.grad_accum=1", "mesh.fsdp=4", "--target", "tpu:v5e-4",
    )  # fmt: skip
    p = report["plan"]
    assert report["target"]["topology"] == "v5e:2x2" and p["error"] is None
    want = expected_argument_bytes(ALIGNED, 4, 8, 4, 128)
    # + the optimizer's scalar state (Adam's count, SGA's rate record), a few padded words on a TPU
    assert 0 <= p["argument_bytes"] - want <= 4096, (p["argument_bytes"], want)
    assert p["fits"] is True and p["flops"] > 0 and p["bound_s"] > 0
    assert report["versions"]["libtpu"]


@pytest.mark.tpu_aot
@needs_libtpu
def test_tpu_plan_too_big_suggests_a_fit(tmp_path):
    """Activations dominate (long rows, a big batch): the configured step does not fit a (here:
    made small) chip, and a candidate that does is suggested."""
    args = [
        f"model.path={_model_dir(tmp_path, ALIGNED)}", "data.max_length=128", "train.batch_size=16",
        "train.grad_accum=1", "mesh.fsdp=4", "model.remat=none", "--target", "tpu:v5e-4",
    ]  # fmt: skip
    base = _plan_json(*args, "--candidates", "0")["plan"]
    hbm = 0.8 * base["peak_bytes"] / 2**30  # 80 % of what the step needs
    report = _plan_json(*args, "--hbm-gib", f"{hbm:.6f}", "--candidates", "3")
    assert report["plan"]["fits"] is False and report["candidates"]
    best = report["suggestion"]
    assert best is not None and best["fits"] and best["peak_bytes"] <= hbm * 2**30
    assert best["overrides"]


# ---------------------------------------------------------------------------------- gpu_aot


@pytest.mark.gpu_aot
@needs_cuda_plugin
@pytest.mark.parametrize("gpu, name", [("h100", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200")])
def test_gpu_plan_compiles_and_counts_arguments(tmp_path, gpu, name):
    """jax's CUDA plugin compiles the step for 4 GPUs with no GPU here: the compiler holds the
    parameters, both Adam moments and the batch, as on the CPU (XLA:GPU pads nothing), against the
    chip's HBM; it gives no cost analysis deviceless, so the bound comes from the model count."""
    report = _plan_json(
        f"model.path={_model_dir(tmp_path, ALIGNED)}", "data.max_length=128", "train.batch_size=8",
        "train.grad_accum=1", "mesh.fsdp=4", "--target", f"gpu:{gpu}-4",
    )  # fmt: skip
    p = report["plan"]
    assert report["target"]["topology"] == "1x1x4" and p["error"] is None, p["error"]
    want = expected_argument_bytes(ALIGNED, 4, 8, 4, 128)
    assert 0 <= p["argument_bytes"] - want <= 64, (p["argument_bytes"], want)
    assert p["fits"] is True and p["model_flops"] > 0 and p["bound_s"] > 0
    assert report["capacity_bytes"] == PT.GPU_CHIPS[gpu].hbm_bytes
    assert report["device_kind"] == name and report["versions"]["jax-cuda12-plugin"]


@pytest.mark.gpu_aot
@needs_cuda_plugin
def test_gpu_plan_too_big_is_reported(tmp_path):
    """A step bigger than the (here: made small) GPU memory does not fit, with a fitting candidate."""
    args = [
        f"model.path={_model_dir(tmp_path, ALIGNED)}", "data.max_length=128", "train.batch_size=16",
        "train.grad_accum=1", "mesh.fsdp=4", "model.remat=none", "--target", "gpu:h100-4",
    ]  # fmt: skip
    base = _plan_json(*args, "--candidates", "0")["plan"]
    hbm = 0.8 * base["peak_bytes"] / 2**30
    report = _plan_json(*args, "--hbm-gib", f"{hbm:.6f}", "--candidates", "3")
    assert report["plan"]["fits"] is False
    best = report["suggestion"]
    assert best is not None and best["fits"] and best["peak_bytes"] <= hbm * 2**30
