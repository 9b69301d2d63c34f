"""Benchmark loaders (TOFU, MUSE-News / MUSE-Books, WMDP, plain JSON/JSONL), prompt formatting and batching.

Submodules: ``tofu``, ``muse``, ``wmdp``, ``jsonl``, ``formatting``, ``batching`` (and
``normal_samples`` for SGA). The most used names are re-exported here.
"""

from sga_jax.data.batching import bucket_length, collate, iterate_batches
from sga_jax.data.formatting import Encoded, EncodeStats, PromptFormatter
from sga_jax.data.jsonl import load_user_rows, read_records
from sga_jax.data.muse import load_knowmem, load_privleak, load_raw, load_verbmem
from sga_jax.data.tofu import load_idontknow, load_tofu
from sga_jax.data.wmdp import load_wmdp

__all__ = [
    "EncodeStats",
    "Encoded",
    "PromptFormatter",
    "bucket_length",
    "collate",
    "iterate_batches",
    "load_idontknow",
    "load_knowmem",
    "load_privleak",
    "load_raw",
    "load_tofu",
    "load_user_rows",
    "load_verbmem",
    "load_wmdp",
    "read_records",
]
