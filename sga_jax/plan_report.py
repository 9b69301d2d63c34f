"""The text form of an ``sga-jax plan`` report (:func:`sga_jax.plan.plan`'s dict; ``--json`` prints
the dict itself)."""

from __future__ import annotations

from typing import Any

GB = 10**9
GiB = 2**30


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.2f} MiB"


def _step_lines(p: dict[str, Any], report: dict[str, Any]) -> list[str]:
    cap, chip = report["capacity_bytes"], report["target"]["chip"]
    fits = {True: "yes", False: "NO", None: "unknown (no capacity: --hbm-gib)"}[p["fits"]]
    of = ""
    if cap:
        of = f" of {_gib(cap)}" + (
            f" ({chip['hbm_bytes'] / GB:.0f} GB HBM, {chip['source']})" if chip else ""
        )
    lines = [
        f"  per chip: arguments {_gib(p['argument_bytes'])} (parameters, optimizer state, batch), "
        f"outputs {_gib(p['output_bytes'])}, donated {_gib(p['alias_bytes'])}, "
        f"temporaries {_gib(p['temp_bytes'])}",
        f"  peak {_gib(p['peak_bytes'])}{of}: fits {fits}",
        f"  compiler, per chip and step: {_costs(p)}; "
        f"model count (sga_jax.eval.flops, 3 or 2 forwards): {p['model_flops']:.3e} FLOPs",
    ]
    if p["bound_s"] is not None:
        lines.append(
            f"  roofline lower bound (not a measurement): {p['bound_s']:.3g} s/step, {p['bound_by']}-bound "
            f"({chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bandwidth'] / GB:.0f} GB/s HBM)"
        )
    return lines


def _costs(p: dict[str, Any]) -> str:
    if not p["flops"] and not p["bytes_accessed"]:  # XLA's GPU compiler answers None deviceless
        return "no cost analysis"
    return f"{p['flops']:.3e} FLOPs, {p['bytes_accessed']:.3e} bytes accessed"


def format_report(report: dict[str, Any]) -> str:
    """The plan as text: the configured step, then the tried candidates and the suggestion."""
    t, c, p = report["target"], report["config"], report["plan"]
    where = (
        f"{t['chips']} x {t['chip']['name']}, topology {t['topology']}"
        if t["chip"]
        else f"{t['chips']} CPU devices"
    )
    lora = "LoRA" if c["lora"] else "full training"
    lines = [
        f"plan: {report['model']} on {t['text']} ({where})",
        f"  step: {c['mode']} {c['method']}" + (f" K={c['k']}" if c["k"] else "")
        + f", {c['batch_size']} forget rows/step ({p['rows']} rows x {c['max_length']} tokens), "
        f"grad_accum {c['grad_accum']}, mesh {p['mesh'] or c['mesh']}, {c['dtype']}/{c['param_dtype']}, "
        f"scan {c['scan_layers']}, remat {c['remat'] or 'auto'}, {lora} "
        f"({p['trainable_params']:,} parameters trained)",
    ]  # fmt: skip
    if t["platform"] == "gpu" and c["attention"] in ("auto", "cudnn"):
        lines.append(
            "  attention compiled as XLA's (a deviceless compile has no cuDNN): on the GPUs, "
            "model.attention=auto runs cuDNN flash attention, with fewer temporaries than shown"
        )
    if p["error"]:
        lines.append(f"  does not compile: {p['error']}")
    else:
        lines += _step_lines(p, report) + [f"  compiled in {p['compile_s']:.1f} s ({_vers(report)})"]
    for q in report["candidates"]:
        head = f"candidate {q['label']} ({' '.join(q['overrides'])}):"
        if q["error"]:
            lines += [head, f"  does not compile: {q['error']}"]
        else:
            lines += [head, *_step_lines(q, report)]
    s = report["suggestion"]
    if s is not None:
        lines.append(f"suggestion: add `{' '.join(s['overrides'])}` (peak {_gib(s['peak_bytes'])} per chip)")
    elif report["candidates"]:
        lines.append("suggestion: none of the candidates fits; more chips, LoRA or a shorter data.max_length")
    return "\n".join(lines)


def _vers(report: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in report["versions"].items())
