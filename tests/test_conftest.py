"""The session set-up of tests/conftest.py holds: offline mode is forced and the model cache is a
temporary folder (no test may reach the network or write into the user's home)."""

from __future__ import annotations

import os
from pathlib import Path

from sga_jax.paths import cache_root


def test_offline_mode_is_forced():
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ.get(name) == "1", name
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_cache_dir_is_a_session_temporary_folder(session_cache_dir, tmp_path_factory):
    assert cache_root() == session_cache_dir
    assert session_cache_dir.is_relative_to(tmp_path_factory.getbasetemp())
    assert not session_cache_dir.is_relative_to(Path.home() / ".cache")
