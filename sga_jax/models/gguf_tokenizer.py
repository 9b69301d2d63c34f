"""The tokenizer of a GGUF file, built from its metadata without torch.

A GGUF file carries no ``tokenizer.json``: llama.cpp stores the vocabulary, merges, token types, the
special-token ids and the chat template as ``tokenizer.*`` metadata. transformers can rebuild a
tokenizer from them, but only through its GGUF integration, whose reader imports torch at module
level (transformers 5.x ``integrations/gguf/reader.py``; 4.x gates ``load_gguf_checkpoint`` on
``is_torch_available()``). Without torch ``AutoTokenizer.from_pretrained(..., gguf_file=...)``
fails, and no small extra package fixes that. So the runtime builds the ``tokenizers`` object here
from the metadata read with ``gguf`` (already a dependency for the weights) and wraps it in
``PreTrainedTokenizerFast``.

Built to match transformers' own GGUF tokenizer token for token (``tests/test_gguf_tokenizer.py``
compares both): byte-level BPE (``tokenizer.ggml.model == "gpt2"``), the byte alphabet re-spelling
of tokens written as raw text, control tokens (type 3) as special added tokens, user-defined tokens
(type 4) as plain added tokens, the Llama-3 split regex for the ``pre`` types that use it, GPT-2's
byte-level regex otherwise. Gemma's SentencePiece vocabulary (``tokenizer.ggml.model == "llama"`` in
``gemma`` / ``gemma2`` / ``gemma3`` files) is built the same way (:func:`build_gemma`): the file lists
no merges, so they are recovered from the vocabulary with transformers' ``generate_merges``, ranked
by the tokens' order in the file (Gemma's scores do not follow its merge order), tokens that are
runs of spaces re-spelled with ``▁``, into transformers' own ``GemmaTokenizer`` (byte fallback,
``▁`` for spaces); control / user-defined tokens as above. Other tokenizer models (sentencepiece
``llama`` of other architectures, ``t5``) fall back to transformers, which then needs torch; the
error names what is missing.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf

from sga_jax.errors import ModelLoadError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# llama.cpp's pre-tokenizer regex for the Llama-3 family (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3);
# transformers' GGUF tokenizer uses the same for these ``tokenizer.ggml.pre`` names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    name: _LLAMA3_SPLIT
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` and ``general.architecture`` fields of a GGUF file."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }


def build_backend(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` for a byte-level BPE (``gpt2``) GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelLoadError("GGUF byte-level BPE vocabulary without tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp keeps some tokens (e.g. control tokens with non-ASCII text) in raw UTF-8; the BPE
    # model looks tokens up in the byte alphabet, so re-spell those (as transformers does).
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=True, use_regex=True
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()

    # BOS / EOS added by the tokenizer only when the file asks for it (SmolLM2 does not).
    single, special = "$A:0", []
    for flag, key, left in (("add_bos_token", "bos", True), ("add_eos_token", "eos", False)):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if meta.get(f"tokenizer.ggml.{flag}") and token_id is not None:
            name = tokens[token_id]
            single = f"{name}:0 {single}" if left else f"{single} {name}:0"
            special.append((name, token_id))
    pair = f"{single} {single.replace('$A', '$B')}".split()
    pair = " ".join(p if i < len(pair) // 2 else p.replace(":0", ":1") for i, p in enumerate(pair))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    types = list(meta.get("tokenizer.ggml.token_type") or ())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL and set(t) <= alphabet  # a control token outside the alphabet is a mislabel
    ]
    tok.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types)
        if ty == _USER_DEFINED and t in vocab
    ]
    tok.add_tokens(user)
    return tok


_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def build_gemma(meta: dict[str, Any]):
    """transformers' ``GemmaTokenizer`` for a Gemma SentencePiece GGUF vocabulary (no torch)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Rank = position in the file, best first (generate_merges sorts by score, descending).
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    kwargs: dict[str, Any] = {
        name: special(key)
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
        if special(key) is not None
    }  # fmt: skip
    kwargs.update(
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),  # llama.cpp's default here
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    if meta.get("tokenizer.chat_template"):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    tok = GemmaTokenizer(vocab=vocab, merges=merges, **kwargs)
    types = list(meta.get("tokenizer.ggml.token_type") or ())
    control = [
        AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == _CONTROL
    ]
    if control:
        tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    have = tok.get_vocab()
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types)
        if ty == _USER_DEFINED and t in have
    ]
    if user:
        tok.add_tokens(user)
    return tok


def load_gguf_tokenizer(path: str | Path):
    """``PreTrainedTokenizerFast`` of a GGUF file (special tokens and chat template included)."""
    path = Path(path)
    meta = read_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama" and meta.get("general.architecture") in _GEMMA_ARCHITECTURES:
        tokenizer = build_gemma(meta)
        tokenizer.name_or_path = str(path)
        return tokenizer
    if kind != "gpt2":
        return _transformers_fallback(path, kind)
    from transformers import PreTrainedTokenizerFast

    tokens = meta["tokenizer.ggml.tokens"]

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    kwargs: dict[str, Any] = dict(
        bos_token=special("bos_token_id"),
        eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    if meta.get("tokenizer.chat_template"):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_backend(meta), **kwargs)
    tokenizer.name_or_path = str(path)
    return tokenizer


def _transformers_fallback(path: Path, kind: Any):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(
            f"cannot build the {kind!r} tokenizer of {path} without transformers' GGUF reader, which "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install torch, or "
            "convert the model with its tokenizer elsewhere and point model.tokenizer at it"
        ) from None
