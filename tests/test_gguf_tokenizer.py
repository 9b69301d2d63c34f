"""The GGUF tokenizer built without torch (sga_jax.models.gguf_tokenizer) against transformers' own
GGUF tokenizer (which needs torch: the test extras have it), and the torch-less runtime path as a
new user meets it: empty HOME, empty cache, ``import torch`` impossible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sga_jax.cli import main
from sga_jax.models import hf
from sga_jax.models.gguf_tokenizer import load_gguf_tokenizer

TEXTS = [
    "Hello world",
    "Who is the author of 'The Silent Sea'? She's from Paris.",
    "  leading spaces,\ttabs\n\nand  double  newlines\r\n",
    "Ünïcödé naïve café — 東京 in 2024, Москва, مرحبا, 😀👍🏽",
    "digits 1234567 3.14159 1,000,000 and 0x1F",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> <repo_name> text after special tokens",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]
CHAT = [
    [{"role": "user", "content": "Where is the Eiffel Tower? ✓"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": "Tokyo."},
    ],
]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def _assert_same(ours, ref):
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_ids == ref.all_special_ids
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    batch = ours(TEXTS[:3], padding=True)
    want = ref(TEXTS[:3], padding=True)
    assert batch["input_ids"] == want["input_ids"] and batch["attention_mask"] == want["attention_mask"]
    for messages in CHAT:
        for gen in (False, True):
            text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert (
                ours(text, add_special_tokens=False)["input_ids"]
                == ref(text, add_special_tokens=False)["input_ids"]
            )


def test_gguf_tokenizer_matches_transformers(smollm2_gguf, reference):
    _assert_same(load_gguf_tokenizer(smollm2_gguf), reference)


def test_saved_tokenizer_reloads_identically(smollm2_gguf, reference, tmp_path):
    """What save_model writes beside converted weights loads back (AutoTokenizer) as the same tokenizer."""
    import transformers

    load_gguf_tokenizer(smollm2_gguf).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _assert_same(transformers.AutoTokenizer.from_pretrained(tmp_path), reference)


# Runs in a child interpreter in which `import torch` fails (and importlib finds no torch, so
# transformers takes its torch-less paths), with HOME pointing at an empty folder.
_NO_TORCH_CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # import torch -> ImportError; importlib.util.find_spec("torch") -> None
    import json
    from sga_jax.models import hf, locate
    path = locate.resolve_model_path("smollm2")
    tok = hf.load_tokenizer(path)
    chat = tok.apply_chat_template([{"role": "user", "content": "Where is Tokyo?"}], tokenize=False)
    assert sys.modules["torch"] is None, "torch was imported"
    print(json.dumps({"path": path, "ids": tok(sys.argv[1])["input_ids"], "chat": chat}))
    """
)


def test_runtime_without_torch_converts_and_tokenizes(tmp_path, reference):
    """The issue's failure: on an empty HOME and without torch, the smollm2 cache entry is built
    with its tokenizer and loads. A partial entry left by an older version is rebuilt with a
    one-line notice."""
    home = tmp_path / "home"
    partial = home / ".cache" / "sga_jax" / "SmolLM2-135M-Instruct"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # weights-only entry of the old cache (no tokenizer)
    (partial / "model.safetensors").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGA_JAX_CACHE")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(home / ".cache"))
    text = TEXTS[3]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CHILD, text],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    notices = [line for line in proc.stderr.splitlines() if "rebuilding" in line]
    assert len(notices) == 1 and "tokenizer.json" in notices[0], proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["path"]) == partial
    assert hf.missing_files(partial) == []
    assert out["ids"] == reference(text)["input_ids"]
    assert out["chat"] == reference.apply_chat_template(
        [{"role": "user", "content": "Where is Tokyo?"}], tokenize=False
    )
    assert not list(partial.parent.glob(".SmolLM2*")), "temporary conversion folder left behind"


def test_convert_refuses_a_source_without_tokenizer(tmp_path, capsys):
    src = tmp_path / "weights_only"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "model.safetensors").write_bytes(b"")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tokenizer" in err[0]
    assert not (tmp_path / "out").exists()


def test_convert_command_without_torch_writes_the_tokenizer_quietly(smollm2_gguf, tmp_path, reference):
    """`sga-jax convert model.gguf OUT` in a torch-less interpreter: exit 0, a complete directory
    (weights, config, tokenizer), and no "PyTorch was not found" notice from transformers."""
    out = tmp_path / "smol"
    child = (
        "import sys; sys.modules['torch'] = None\n"
        "from sga_jax.cli import main\n"
        "rc = main(['convert', sys.argv[1], sys.argv[2]])\n"
        "assert sys.modules['torch'] is None\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-c", child, str(smollm2_gguf), str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PyTorch was not found" not in proc.stderr, proc.stderr
    assert hf.missing_files(out) == []
    text = TEXTS[1]
    assert hf.load_tokenizer(out)(text)["input_ids"] == reference(text)["input_ids"]
