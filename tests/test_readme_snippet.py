"""The README's composition snippet runs as written and unlearns (the forget NLL rises)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

CHECK = """
import json
w0 = 0.1 * jax.random.normal(kw, (16, 4))
print("RESULT", json.dumps({
    "forget_before": float(nll(w0, x_f, y_f).mean()), "forget_after": float(nll(w, x_f, y_f).mean()),
    "normal_before": float(nll(w0, x_n, y_n).mean()), "normal_after": float(nll(w, x_n, y_n).mean()),
    "r": float(state[0].r),
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
    assert "sga_loss" in code and "sga(" in code and "sga_jax.train" not in code
    assert 15 <= len(code.strip().splitlines()) <= 40
    script = tmp_path / "snippet.py"
    script.write_text(code + CHECK)
    # A fresh interpreter, as a user would run it (and with no test fixture in the way).
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["forget_after"] > result["forget_before"] + 1.0, result
    assert result["r"] == pytest.approx(-0.8, rel=1e-6)  # float32 state
    # r < 0 descends the normal samples while the forget sample is ascended.
    assert result["normal_after"] < result["forget_after"], result
