"""The training loop's progress bar (a tqdm bar fed by a :class:`sga_jax.train.Hook`)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from sga_jax import config as C


class Progress:
    """A tqdm bar fed by a hook."""

    def __init__(self, bar):
        self.bar = bar

    def update_from(self, info: Any) -> None:
        self.bar.update(1)
        self.bar.set_postfix(postfix(info.record), refresh=False)

    def close(self) -> None:
        self.bar.close()


def progress_bar(cfg: C.RunConfig, steps: int, start: int) -> Progress | None:
    if not cfg.train.progress:
        return None
    desc = cfg.mode if cfg.mode == "finetune" else cfg.method.name
    return Progress(tqdm(total=steps, initial=start, desc=desc))


def postfix(rec: dict[str, Any]) -> dict[str, str]:
    short = {"loss": "loss", "forget_nll": "f_nll", "retain_nll": "r_nll", "normal_nll": "n_nll", "r": "r"}
    return {v: f"{rec[k]:.4g}" for k, v in short.items() if k in rec}


__all__ = ["Progress", "postfix", "progress_bar"]
