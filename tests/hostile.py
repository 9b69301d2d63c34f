"""Helpers of the hostile-input tests (tests/test_hostile_*.py): the one-line refusal and a folder's
contents, to show that nothing was written."""

from __future__ import annotations

from pathlib import Path


def one_error_line(capsys, *fragments: str) -> str:
    """The single ``sga-jax: error:`` line on stderr (warnings aside), holding every fragment."""
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "warning" not in x.lower()]
    assert len(err) == 1 and err[0].startswith("sga-jax: error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
