"""The README's library example runs as written, on the real SmolLM2-135M-Instruct: three SGA steps
raise the forget sentence's NLL much more than the normal sentence's, with the rate r = -0.8 read
back from the optimizer state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# Appended to the snippet: the snippet's own names, measured once more after its loop.
CHECK = """
import json
_, params0, _ = nnx.split(sga_jax.load_model(gguf, scan_layers=True), nnx.Param, ...)
print("RESULT", json.dumps({
    "forget_before": float(nll(params0, forget)[0]), "forget_after": float(nll(params, forget)[0]),
    "normal_before": float(nll(params0, normal)[0]), "normal_after": float(nll(params, normal)[0]),
    "r": float(optax.tree_utils.tree_get(opt_state, "r")),
}))
"""


def snippet() -> str:
    text = README.read_text()
    m = re.search(
        r"<!-- compose-snippet:start -->\s*```python\n(.*?)```\s*<!-- compose-snippet:end -->", text, re.S
    )
    assert m, "README.md has no compose snippet between the compose-snippet markers"
    return m.group(1)


def test_readme_snippet_runs_and_unlearns(tmp_path):
    code = snippet()
    for used in ("sga_jax.load_model(", "nnx.split(", "nnx.merge(", "sequence_nll", "sga(", "optax.adamw("):
        assert used in code, used
    script = tmp_path / "snippet.py"
    script.write_text(code + CHECK)
    # A fresh interpreter, as a user would run it (and with no test fixture in the way).
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("forget NLL "), proc.stdout
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    rise_f = result["forget_after"] - result["forget_before"]
    rise_n = result["normal_after"] - result["normal_before"]
    # measured: forget 2.67 -> 5.34 nats/token, normal 2.49 -> 2.77
    assert rise_f > 1.0, result  # the forget sentence is unlearned
    assert rise_n < 0.25 * rise_f, result  # r < 0 descends the normal sample: it moves far less
    assert result["r"] == pytest.approx(-0.8, rel=1e-6)  # float32 state
