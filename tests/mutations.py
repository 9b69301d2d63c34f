"""Mutation check: does the suite catch the bugs that matter? (issue 17; not part of the default suite)

Each mutant is one small, realistic bug: an exact-string replacement in one file of the package. The
harness copies the repository once into a temporary folder, then for each mutant writes the bug into
the copy, runs the test files that should catch it there (pytest with the copy first on
``PYTHONPATH`` and as the working directory; the copy's own ``sga_jax`` is checked to be the one
imported), restores the file and records the outcome:

* ``killed``: the tests failed (what we want);
* ``SURVIVED``: every test passed with the bug in place (a hole in the suite);
* ``TIMEOUT``: the tests ran past ``--timeout`` (no verdict).

A replacement whose target string is missing, or occurs more than once, is an error of the harness
(the code moved on): it stops before running anything. The exit status is 0 only when every mutant
run was killed.

    python tests/mutations.py                  # every mutant (tens of minutes on 2 CPU cores)
    python tests/mutations.py --only rope_theta_ignored --only privleak_swapped
    python tests/mutations.py --baseline       # first check the selected tests pass unmutated
    python tests/mutations.py --list           # the mutants
    make mutants
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids, relative to the repository root
    why: str


def _runner(*methods: str) -> tuple[str, ...]:
    """The per-method runner tests (tests/test_runner_methods.py) of ``methods``."""
    return tuple(
        f"tests/test_runner_methods.py::test_method_through_cli_and_runner_step[{m}]" for m in methods
    )


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "tofu_forget_truth_ratio_max",
        "sga_jax/eval/tofu.py",
        "tr = float(np.mean(np.minimum(r, 1.0 / r)))",
        "tr = float(np.mean(np.maximum(r, 1.0 / r)))",
        ("tests/test_eval_tofu.py",),
        "TOFU's forget truth ratio aggregated with max(R, 1/R) instead of min",
    ),
    Mutant(
        "tofu_truth_ratio_sign",
        "sga_jax/eval/tofu.py",
        "return np.exp(pert - para)",
        "return np.exp(para - pert)",
        ("tests/test_eval_tofu.py",),
        "the aggregated truth ratio R inverted (sign error in its exponent)",
    ),
    Mutant(
        "tofu_logged_truth_ratio_sign",
        "sga_jax/eval/tofu.py",
        "float(np.exp(avg_base - avg_pert.mean()))",
        "float(np.exp(avg_pert.mean() - avg_base))",
        ("tests/test_eval_tofu.py",),
        "the per-sample truth ratio written to the eval log inverted",
    ),
    Mutant(
        "knowmem_no_few_shot",
        "sga_jax/eval/muse.py",
        """prompts = [general + f"Question: {r['question']}\\nAnswer: " for r in rows]""",
        """prompts = [f"Question: {r['question']}\\nAnswer: " for r in rows]""",
        ("tests/test_eval_muse.py::test_knowmem_prompt_and_score_as_muse",),
        "MUSE KnowMem drops the few-shot prefix",
    ),
    Mutant(
        "privleak_swapped",
        "sga_jax/eval/muse.py",
        'a = auc(scores["holdout"], scores["forget"])',
        'a = auc(scores["forget"], scores["holdout"])',
        ("tests/test_eval_muse.py::test_privleak_direction_as_muse",),
        "MUSE PrivLeak swaps members and non-members",
    ),
    Mutant(
        "ekfac_diagonal_halved",
        "sga_jax/curvature.py",
        'return {k: eigen[k]._replace(s=acc["g"][k] / count) for k in eigen}',
        'return {k: eigen[k]._replace(s=acc["g"][k] / (2 * count)) for k in eigen}',
        ("tests/test_curvature.py",),
        "EK-FAC diagonal on the model halved (normalised by 2M tokens)",
    ),
    Mutant(
        "kfac_damping_squared",
        "sga_jax/kfac_math.py",
        "to_eigenbasis(eig, v) / (eigenvalues(eig) + damping))",
        "to_eigenbasis(eig, v) / (eigenvalues(eig) + damping * damping))",
        ("tests/test_curvature.py",),
        "K-FAC damping error: λ² added to the eigenvalues instead of λ",
    ),
    Mutant(
        "rope_theta_ignored",
        "sga_jax/models/rope.py",
        'theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))',
        "theta = 10000.0",
        ("tests/test_models_parity.py::test_logits_match_transformers",),
        "RoPE theta ignored (always 1e4); the tiny-model parity alone must catch it",
    ),
    Mutant(
        "attention_mask_dropped",
        "sga_jax/models/attention.py",
        "return (causal[None, None] & keys) | jnp.eye(t, dtype=bool)[None, None]",
        "return causal[None, None] | jnp.eye(t, dtype=bool)[None, None]",
        ("tests/test_models_parity.py::test_logits_match_transformers",),
        "the attention mask dropped (padded keys attended to)",
    ),
    Mutant(
        "logprob_vocab_chunk_skipped",
        "sga_jax/kernels/logprob.py",
        "jax.lax.scan(body, init, (w_chunks, b_chunks, starts))",
        "jax.lax.scan(body, init, (w_chunks[:-1], b_chunks[:-1], starts[:-1]))",
        ("tests/test_kernels.py",),
        "the chunked log-prob kernel skips the last vocabulary chunk",
    ),
    # ---- runner level (issue 17, phase 2): each method's step against its objective written out in
    # tests/test_runner_methods.py
    Mutant(
        "npo_reference_is_current_model",
        "sga_jax/methods.py",
        'loss = O.npo_loss(nll, batch["ref_nll"], beta=m.beta)',
        "loss = O.npo_loss(nll, nll, beta=m.beta)",
        _runner("npo"),
        "NPO's reference NLL taken from the model being trained (NPO becomes GA)",
    ),
    Mutant(
        "npo_reference_token_mean",
        "sga_jax/runner.py",
        'data.ref_nll = batched_nll(model, data.forget, reduction="sum")',
        "data.ref_nll = batched_nll(model, data.forget)",
        _runner("npo"),
        "NPO's reference NLL the token mean while the trained NLL is the sum",
    ),
    Mutant(
        "gru_retain_grad_from_forget_batch",
        "sga_jax/methods.py",
        """def retain_loss(model, batch):
        return plain_nll(m, model, batch["retain"])  # type: ignore[arg-type]""",
        """def retain_loss(model, batch):
        return plain_nll(m, model, batch["forget"])  # type: ignore[arg-type]""",
        _runner("gru_ga"),
        "GRU's retain gradient computed on the forget batch",
    ),
    Mutant(
        "gru_sign_error",
        "sga_jax/transforms/gru.py",
        "(g.astype(jnp.float32) - coef * r_)",
        "(g.astype(jnp.float32) + coef * r_)",
        _runner("gru_ga"),
        "GRU's projection added instead of subtracted (the conflicting component doubled)",
    ),
    Mutant(
        "gru_ema_weights_swapped",
        "sga_jax/transforms/gru.py",
        "lambda now, prev: m * now.astype(jnp.float32) + (1 - m) * prev",
        "lambda now, prev: (1 - m) * now.astype(jnp.float32) + m * prev",
        _runner("gru_ga"),
        "GRU's EMA weights the past by m and the current retain gradient by 1 - m",
    ),
    Mutant(
        "sga_normal_samples_misaligned",
        "sga_jax/train.py",
        "normal = data.normal_index[idx].reshape(-1)",
        "normal = data.normal_index[(idx + 1) % data.num_forget].reshape(-1)",
        _runner("sga_fixed"),
        "SGA's normal samples are those of the next forget row (off by one)",
    ),
    Mutant(
        "sga_sign_error",
        "sga_jax/transforms/sga.py",
        "direction = jax.tree.map(lambda gf, uu_: (-gf - r_t",
        "direction = jax.tree.map(lambda gf, uu_: (gf - r_t",
        _runner("sga_paper"),
        "SGA's transform descends the forget NLL instead of ascending it",
    ),
    Mutant(
        "sga_loss_sign_error",
        "sga_jax/objectives.py",
        "return jnp.mean(-c_f * nll_forget - c_n * jnp.sum(nll_normal, axis=1))",
        "return jnp.mean(c_f * nll_forget - c_n * jnp.sum(nll_normal, axis=1))",
        _runner("sga_fixed"),
        "SGA's loss descends the forget NLL (fixed rate) instead of ascending it",
    ),
    Mutant(
        "sga_rate_sign_swapped",
        "sga_jax/transforms/sga.py",
        'sign = 1.0 if rate == "paper" else -1.0',
        'sign = -1.0 if rate == "paper" else 1.0',
        _runner("sga_paper", "sga_min_norm"),
        "SGA's paper and min_norm per-step rates swapped",
    ),
    Mutant(
        "simnpo_forget_weight_dropped",
        "sga_jax/methods.py",
        "forget_weight=m.forget_weight)",
        "forget_weight=1.0)",
        _runner("simnpo"),
        "SimNPO's forget weight (open-unlearning's gamma, 0.125) ignored",
    ),
    Mutant(
        "flat_template_fixed",
        "sga_jax/runner.py",
        'per_epoch=m.template_sampling == "epoch",',
        "per_epoch=False,",
        ("tests/test_runner_methods.py::test_flat_draws_a_new_template_per_row_each_epoch",),
        "FLAT's template fixed per row for the whole run instead of drawn anew each epoch",
    ),
    Mutant(
        "lm_eval_continuation_off_by_one",
        "sga_jax/eval/lm_eval_backend.py",
        "pos[b] = np.clip(np.arange(n - c, n), 0, None)",
        "pos[b] = np.clip(np.arange(n - c - 1, n - 1), 0, None)",
        ("tests/test_lm_eval_backend.py::test_multiple_choice_matches_hf_backend",),
        "the lm-eval backend scores each continuation token from the position one before its own",
    ),
    Mutant(
        "lm_eval_no_left_truncation",
        "sga_jax/eval/lm_eval_backend.py",
        "[-(max_length + 1) :][:-1]",
        "[:-1]",
        ("tests/test_lm_eval_backend.py::test_requests_match_hf_backend",),
        "the lm-eval backend reads the whole request past max_length instead of HFLM's left truncation",
    ),
)


# ------------------------------------------------------------------------------------- machinery


def data_dir() -> str | None:
    """The benchmark data the copy's tests must read (the copy has no shared/ beside it)."""
    env = os.environ.get("SGA_JAX_DATA_DIR")
    if env:
        return env
    for base in (Path.cwd(), ROOT):
        for candidate in (base / "shared" / "data", base.parent / "shared" / "data"):
            if candidate.is_dir():
                return str(candidate)
    return None


def make_copy(dest: Path) -> Path:
    """The repository without its virtual environment, git data and caches. ``configs/`` is installed
    as ``sga_jax.configs`` (pyproject's package-dir): a symlink inside the copy's package makes the
    copy read its own files."""
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        "__pycache__",
        "*.egg-info",
        ".ruff_cache",
        ".pytest_cache",
        "runs",
        "build",
        "shared",
    )
    copy = dest / "repo"
    shutil.copytree(ROOT, copy, ignore=ignore, symlinks=True)
    for sub in ("configs",):
        link = copy / "sga_jax" / sub
        if not link.exists():
            link.symlink_to(Path("..") / sub, target_is_directory=True)
    return copy


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    data = data_dir()
    if data:
        env["SGA_JAX_DATA_DIR"] = data
    return env


def check_imports_copy(copy: Path) -> None:
    """Fail loudly unless the copy's sga_jax (and its kernels) are the modules imported there."""
    code = "import sga_jax, sga_jax.kernels.logprob as k; print(sga_jax.__file__); print(k.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True, check=True
    ).stdout.split()
    for f in out:
        if not Path(f).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"mutations: the copy imports {f}, not its own sga_jax under {copy}")


def check_targets(mutants: tuple[Mutant, ...]) -> None:
    for m in mutants:
        path = ROOT / m.file
        if not path.is_file():
            raise SystemExit(f"mutations: {m.name}: file {m.file} not found")
        n = path.read_text(encoding="utf-8").count(m.old)
        if n != 1:
            raise SystemExit(f"mutations: {m.name}: target string found {n} times in {m.file}: {m.old!r}")
        for t in m.tests:
            if not (ROOT / t.split("::")[0]).is_file():
                raise SystemExit(f"mutations: {m.name}: test file {t} not found")


def run_mutant(m: Mutant, copy: Path, timeout: float) -> tuple[str, float, str]:
    path = copy / m.file
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace(m.old, m.new, 1), encoding="utf-8")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0", *m.tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout
        )
        out = proc.stdout + proc.stderr
        if proc.returncode == 0:
            verdict = "SURVIVED"
        elif proc.returncode in (1, 2, 3):  # failures / errors (an import error counts as caught)
            verdict = "killed"
        else:  # 4 usage error, 5 no tests collected: the harness's fault
            verdict = f"ERROR(rc={proc.returncode})"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        verdict = "TIMEOUT"
    finally:
        path.write_text(original, encoding="utf-8")
    lines = [line for line in out.splitlines() if line.strip()]
    first_failure = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    summary = (lines[-1] if lines else "") + (f" | {first_failure[:160]}" if first_failure else "")
    return verdict, time.perf_counter() - t0, summary


def run_baseline(tests: tuple[str, ...], copy: Path, timeout: float) -> bool:
    """The tests pass on the unmutated copy (so that a kill is the mutant's doing)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *tests]
    proc = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
    last = next((line for line in reversed(proc.stdout.splitlines()) if line.strip()), "")
    print(f"{'baseline':9} {'(no mutant)':32} {' '.join(tests)}: {last}", flush=True)
    return proc.returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", default=[], help="run only this mutant (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutants")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    p.add_argument(
        "--baseline", action="store_true", help="first run each test selection unmutated (must pass)"
    )
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32} {m.file:28} {m.why}")
        return 0
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only) - names)
    if unknown:
        print(f"mutations: unknown mutant(s) {unknown}; see --list", file=sys.stderr)
        return 2
    chosen = tuple(m for m in MUTANTS if not args.only or m.name in args.only)
    check_targets(chosen)
    results = []
    with tempfile.TemporaryDirectory(prefix="sga_jax_mutants_") as tmp:
        copy = make_copy(Path(tmp))
        check_imports_copy(copy)
        if args.baseline:
            selections = list(dict.fromkeys(m.tests for m in chosen))
            if not all(run_baseline(t, copy, args.timeout) for t in selections):
                print("mutations: the unmutated tests fail in the copy; no verdict", file=sys.stderr)
                return 2
        for m in chosen:
            verdict, seconds, summary = run_mutant(m, copy, args.timeout)
            results.append((m, verdict))
            print(f"{verdict:9} {m.name:32} {seconds:6.0f} s  {summary}", flush=True)
    bad = [(m, v) for m, v in results if v != "killed"]
    killed = len(results) - len(bad)
    print(f"\n{killed} of {len(results)} mutants killed")
    for m, v in bad:
        print(f"  {v}: {m.name} ({m.why}) in {m.file}; tests: {' '.join(m.tests)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
