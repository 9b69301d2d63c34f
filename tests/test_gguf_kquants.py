"""GGUF K-quants (Q4_K, Q5_K, Q6_K: the blocks of Q4_K_M files): the loader's dequantisation
(``gguf.quants.dequantize`` inside :class:`sga_jax.models.gguf.GGUFSource`) against ggml's formulas,
re-derived here from ``ggml-quants.c`` (``dequantize_row_q4_K`` / ``_q5_K`` / ``_q6_K``), on blocks in
the real byte layout (``block_q4_K``: d, dmin, scales[12], qs[128]; ``block_q5_K``: d, dmin,
scales[12], qh[32], qs[128]; ``block_q6_K``: ql[128], qh[64], scales[16], d), read back from a GGUF
file written with ``gguf.GGUFWriter``."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from sga_jax.models.gguf import GGUFSource

QK = 256


def _scale_min(q: np.ndarray, j: int) -> tuple[int, int]:
    """ggml's get_scale_min_k4: 6-bit scale and min j of the 12 packed bytes."""
    if j < 4:
        return int(q[j] & 63), int(q[j + 4] & 63)
    return int((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)), int((q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _q45k(block: np.ndarray, five: bool) -> np.ndarray:
    d, dmin = (float(x) for x in block[:4].view(np.float16))
    sc = block[4:16]
    qh = block[16:48] if five else None
    qs = block[48:176] if five else block[16:144]
    y, u = [], 1
    for j in range(4):  # 64 values per step: low nibbles then high nibbles of 32 bytes
        q = qs[32 * j : 32 * j + 32].astype(np.int32)
        for k, part in enumerate((q & 0xF, q >> 4)):
            s, m = _scale_min(sc, 2 * j + k)
            if five:
                part = part + np.where(qh & (u << k), 16, 0)
            y.append(d * s * part - dmin * m)
        u <<= 2
    return np.concatenate(y)


def _q6k(block: np.ndarray) -> np.ndarray:
    ql, qh = block[:128].astype(np.int32), block[128:192].astype(np.int32)
    sc = block[192:208].view(np.int8).astype(np.float64)
    d = float(block[208:210].view(np.float16)[0])
    y = np.empty(QK)
    for n in range(2):  # 128 values per half
        l_, h, s = ql[64 * n : 64 * n + 64], qh[32 * n : 32 * n + 32], sc[8 * n : 8 * n + 8]
        for i in range(32):
            q1 = ((l_[i] & 0xF) | ((h[i] & 3) << 4)) - 32
            q2 = ((l_[i + 32] & 0xF) | (((h[i] >> 2) & 3) << 4)) - 32
            q3 = ((l_[i] >> 4) | (((h[i] >> 4) & 3) << 4)) - 32
            q4 = ((l_[i + 32] >> 4) | (((h[i] >> 6) & 3) << 4)) - 32
            base, k = 128 * n, i // 16
            y[base + i], y[base + i + 32] = d * s[k] * q1, d * s[k + 2] * q2
            y[base + i + 64], y[base + i + 96] = d * s[k + 4] * q3, d * s[k + 6] * q4
    return y


KINDS = {
    "Q4_K": (gguf.GGMLQuantizationType.Q4_K, 144, lambda b: _q45k(b, False), (0, 4)),
    "Q5_K": (gguf.GGMLQuantizationType.Q5_K, 176, lambda b: _q45k(b, True), (0, 4)),
    "Q6_K": (gguf.GGMLQuantizationType.Q6_K, 210, _q6k, (208, 210)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kquant_dequantisation_matches_ggml_formula(kind, tmp_path):
    qtype, size, formula, (f0, f1) = KINDS[kind]
    rows, cols = 6, 2 * QK
    rs = np.random.RandomState(0)
    raw = rs.randint(0, 256, size=(rows * cols // QK, size)).astype(np.uint8)
    halves = rs.uniform(-0.05, 0.05, size=(raw.shape[0], (f1 - f0) // 2)).astype(np.float16)
    raw[:, f0:f1] = halves.view(np.uint8)  # finite f16 scales (d, dmin) where the format keeps them
    want = np.concatenate([formula(b) for b in raw]).reshape(rows, cols)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_down.weight", raw.reshape(rows, -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    got = GGUFSource(path, reader, 1, 1).get("model.layers.0.mlp.down_proj.weight")
    assert got.shape == (rows, cols) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
