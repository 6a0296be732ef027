"""curves.png: the losses, the validation accuracy and the learning rates of a run, by epoch."""
from __future__ import annotations

import sys
from pathlib import Path

from utils.training.run_folder import RunFolder, RunFolderError


def plot_to(folder: RunFolder, history: list[dict], title: str) -> None:
    """curves.png, written like the other files: beside its place, then renamed."""
    try:
        folder.write_with("curves.png", lambda tmp: plot(history, tmp, title))
    except RunFolderError as e:
        print(f"warning: {e}; the run goes on", file=sys.stderr)


def plot(metrics: list[dict], path: Path, title: str) -> bool:
    """Draw curves.png (False where matplotlib is not installed)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(metrics, title)
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def figure(metrics: list[dict], title: str):
    """Losses, validation accuracy (0-100%) with the best epoch marked, and the learning rates, by epoch."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    best = max(metrics, key=lambda m: m["val_top1"])
    fig, (loss, top1, lr) = plt.subplots(3, 1, sharex=True, figsize=(7, 7.5), dpi=100,
                                         gridspec_kw={"height_ratios": [3, 3, 2]})
    fig.suptitle(title)
    loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", color="tab:red", label="training (label-smoothed)")
    loss.plot(epochs, [m["val_loss"] for m in metrics], "s-", color="tab:purple", label="validation")
    loss.set_ylabel("cross-entropy loss")
    loss.set_ylim(bottom=0)
    loss.ticklabel_format(axis="y", style="plain", useOffset=False)
    top1.plot(epochs, [m["val_top1"] for m in metrics], "s-", color="tab:blue", label="validation top-1")
    if all("val_top5" in m for m in metrics):
        top1.plot(epochs, [m["val_top5"] for m in metrics], "^--", color="tab:cyan", label="validation top-5")
    top1.axvline(best["epoch"], color="tab:green", linestyle=":", label=f"best: epoch {best['epoch']}, "
                                                                           f"{best['val_top1']:.1f}%")
    top1.set_ylabel("accuracy (%)")
    top1.set_ylim(0, 100)
    lr.plot(epochs, [m["lr"] for m in metrics], "o-", color="tab:gray", label="head")
    if any(m.get("backbone_lr") is not None for m in metrics):
        lr.plot(epochs, [m.get("backbone_lr") for m in metrics], "o--", color="tab:olive", label="backbone")
    lr.set_ylabel("learning rate\n(at epoch end)")
    lr.set_ylim(bottom=0)
    lr.set_xlabel("epoch")
    lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (loss, top1, lr):
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig
