"""Where training progress goes: a tqdm bar on the console, Weights & Biases, and the loss plot."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from saekit.config import TrainConfig
from saekit.files import save_figure
from saekit.schema import to_dict

# wandb/console names of the logged scalars; loss parts are logged as train/loss/<part>
CONSOLE_KEYS = {"loss": "loss", "l0": "L0", "fvu": "FVU"}


class Tracker:
    """Console progress and optional W&B logging; inert on ranks other than 0."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, start_tokens: int, active: bool,
                 wandb_id: str | None = None):
        self.bar = self.run = None
        if not active:
            return
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.total_tokens, initial=start_tokens, unit="tok", unit_scale=True,
                            dynamic_ncols=True, desc=f"train {cfg.model.kind}")
        if cfg.wandb:
            import wandb

            # resume="allow" with the id saved in the checkpoint continues the same W&B run
            self.run = wandb.init(project=cfg.wandb_project, dir=str(run_dir), config=to_dict(cfg),
                                  name=run_dir.name, id=wandb_id, resume="allow" if wandb_id else None)

    @property
    def wandb_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def advance(self, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(tokens)

    def log(self, step: int, metrics: dict[str, float], histogram=None) -> None:
        """``metrics`` are flat names ("loss", "fvu", "loss/mse", ...); ``histogram`` is
        (counts, edges, n_dead) of log10 feature density."""
        if self.bar is not None:
            self.bar.set_postfix({label: f"{metrics[key]:.4g}" for key, label in CONSOLE_KEYS.items()
                                  if key in metrics}, refresh=False)
        if self.run is not None:
            record = {f"train/{key}": value for key, value in metrics.items()}
            if histogram is not None:
                import wandb

                counts, edges, n_dead = histogram
                record["train/feature_density"] = wandb.Histogram(
                    np_histogram=(counts.tolist(), edges.tolist()))
                record["train/dead_latents_in_density_window"] = n_dead
            self.run.log(record, step=step)

    def summary(self, metrics: dict[str, float]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                self.run.summary[f"final/{key}"] = value

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


def plot_history(history: torch.Tensor, columns: list[str], path: Path) -> None:
    """Loss (and FVU, L0 where logged) against tokens; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history.numel() == 0:
        return
    tokens = history[:, columns.index("tokens")].numpy()
    panels = [c for c in ("loss", "fvu", "l0") if c in columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, name in zip(axes[0], panels):
        values = history[:, columns.index(name)].numpy()
        ax.plot(tokens, values, lw=1)
        ax.set_xlabel("tokens")
        ax.set_title(name)
        if name == "loss" and values.min() > 0 and not math.isnan(values.min()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.3)  # tight_layout is slow
    save_figure(fig, path, dpi=100)
