"""PNG figures that people look at: sample grids and loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ditlab.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Write `fig` to `path` as PNG atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def grid(images_uint8: np.ndarray, nrow: int) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*H, nrow*W, C] image with 1-pixel gaps."""
    n, h, w, c = images_uint8.shape
    rows = -(-n // nrow)
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i, img in enumerate(images_uint8):
        r, col = divmod(i, nrow)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    return canvas


def save_sample_grid(images_uint8: np.ndarray, path: str | Path, title: str = "", limit: int = 100,
                     nrow: int = 10) -> Path:
    """The first `limit` samples, `nrow` a row; with balanced labels 0..K-1 and 10 a row each column
    is one class."""
    plt = pyplot()
    images_uint8 = images_uint8[:limit]
    nrow = min(nrow, len(images_uint8))
    canvas = grid(images_uint8, nrow)
    fig, ax = plt.subplots(figsize=(max(4, nrow * 0.6), max(3, canvas.shape[0] / canvas.shape[1] * nrow * 0.6)))
    ax.imshow(canvas[:, :, 0] if canvas.shape[-1] == 1 else canvas, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    path = save_png(fig, Path(path))
    plt.close(fig)
    return path


def save_loss_curve(history: list[dict], path: str | Path) -> Path:
    """Training loss per logged step; with a learned variance also its two terms (mse, vb)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    keys = ("loss", "mse", "vb") if history and "vb" in history[0] else ("loss",)
    for key in keys:
        if history and key in history[0]:
            ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    path = save_png(fig, Path(path))
    plt.close(fig)
    return path


def save_trial_curves(curves: list[dict], path: str | Path, metric: str, title: str = "") -> Path:
    """A sweep's comparison figure: `metric` over steps, one line per trial. Each curve is
    {"label", "steps", "values", "state"}; stopped trials end with a cross, failed ones dashed, and
    the curve labelled best (state "best") is drawn thick."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for curve in curves:
        if not curve["steps"]:
            continue
        best = curve["state"] == "best"
        (line,) = ax.plot(curve["steps"], curve["values"], lw=2.5 if best else 1.2, marker=".",
                          ls="--" if curve["state"] == "failed" else "-",
                          label=f"{curve['label']} ({curve['state']})", zorder=3 if best else 2)
        if curve["state"] in ("stopped early", "failed"):
            ax.plot(curve["steps"][-1], curve["values"][-1], "x", color=line.get_color(), ms=8)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    values = [v for c in curves for v in c["values"]]
    if values and min(values) > 0 and max(values) / min(values) > 10:  # a diverging trial would flatten the rest
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=1 if len(curves) <= 8 else 2)
    if title:
        ax.set_title(title)
    path = save_png(fig, Path(path))
    plt.close(fig)
    return path


def save_steps_comparison(rows: list[dict], path: str | Path,
                          metrics: tuple[str, ...] = ("fid", "conditional_accuracy"), title: str = "") -> Path:
    """Figures against sampling steps, one line per model: a distilled student and its teacher.
    Each row is {"model", "steps", "seconds_per_100", <metric>: value, ...}; the legend gives each
    model's sampling time per 100 images at its fewest and most steps."""
    plt = pyplot()
    metrics = tuple(m for m in metrics if any(m in r for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for model in models:
            mine = sorted((r for r in rows if r["model"] == model and metric in r), key=lambda r: r["steps"])
            if not mine:
                continue
            times = ", ".join(f"{r['seconds_per_100']:.1f} s" for r in (mine[0], mine[-1])[: len(mine)])
            ax.plot([r["steps"] for r in mine], [r[metric] for r in mine], marker="o",
                    label=f"{model} ({times} per 100 images)")
            for r in mine:
                ax.annotate(str(r["steps"]), (r["steps"], r[metric]), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps (a guided teacher: 2 forward passes a step)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: never over a point
    if title:
        fig.suptitle(title)
    path = save_png(fig, Path(path))
    plt.close(fig)
    return path
