"""`loom plot RUN_DIR [RUN_DIR ...] --out FILE`: one picture of the metrics of one or more runs, overlaid.

Panels: train loss, validation loss, learning rate, gradient norm (global L2, before clipping; log scale),
throughput (tokens/s), and, when a run has MoE layers, each MoE layer's expert load imbalance (max over experts of
the assignments / their mean, per logged step; 1 = balanced). Every panel is against tokens seen (default) or
optimizer steps (`--x step`). A validation record has no token count of its own: its tokens are the train records'
(step, tokens) interpolated linearly (exact at a logged step; tokens grow linearly with steps at a fixed batch).

Each run is one colour, labelled with its folder name (with as many parent folders as it takes to tell runs with
equal names apart). The history of each run follows framework/train/metrics_reader.py (a resume's repeated steps
keep their last record). The format follows --out's extension: .png, .pdf or .svg. matplotlib is imported here
only, and without pyplot: the figure is drawn on the Agg canvas, so no display and no global state is involved.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from framework.config.errors import ConfigError
from framework.outputs import atomic_file, check_output
from framework.train.metrics_reader import RunHistory, metrics_path, read_history

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = (".png", ".pdf", ".svg")
X_AXES = ("tokens", "step")
PANEL_SIZE = (6.0, 3.2)
"""Inches of one panel; two panels a row."""
DPI = 100


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    kind: str
    """The record kind it reads: "train" or "val"."""
    key: str
    log: bool = False


PANELS = (
    Panel("train loss", "loss (nats)", "train", "loss"),
    Panel("validation loss", "loss (nats)", "val", "val_loss"),
    Panel("learning rate", "lr", "train", "lr"),
    Panel("gradient norm", "global L2 norm, before clipping", "train", "grad_norm", log=True),
    Panel("throughput", "tokens/s", "train", "tokens_per_s"),
)
MOE_TITLE = "MoE expert load imbalance, per layer"
MOE_KEY = "moe_tokens_per_expert"
NAMED_LAYERS = 8
"""Up to this many MoE layers a run's lines are named at their ends; more would only be clutter."""


def plot_command(run_dirs: Sequence[str], out: str, *, x: str = "tokens", overwrite: bool = False) -> str:
    """Check everything, read the runs, write the figure atomically to `out`; returns the one-line report."""
    if x not in X_AXES:
        raise ConfigError("command line", "--x", x, f"must be one of {', '.join(X_AXES)}", "e.g. --x tokens")
    inputs = [metrics_path(run_dir) for run_dir in run_dirs]
    _refuse_repeats(run_dirs)
    # the input rule first: `--out RUN/metrics.jsonl` is refused for what it would destroy, not for its suffix
    out_path = check_output(out, inputs=inputs, overwrite=overwrite, key="--out", want_dir=False)
    _check_format(out_path)
    histories = [read_history(run_dir) for run_dir in run_dirs]
    for history in histories:
        for warning in history.warnings:
            print(f"loom: warning: {warning}", file=sys.stderr)
    figure = build_figure(histories, x=x)
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, format=out_path.suffix[1:].lower(), dpi=DPI)
    return f"wrote {out_path} ({len(histories)} run{'s' * (len(histories) > 1)}, x axis: {x})"


def _check_format(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        rule = f"has extension {path.suffix or '(none)'!r}; the picture's format comes from it"
        raise ConfigError("command line", "--out", str(path), rule, f"end it in one of {', '.join(FORMATS)}")


def _refuse_repeats(run_dirs: Sequence[str]) -> None:
    seen: dict[Path, str] = {}
    for run_dir in run_dirs:
        resolved = Path(run_dir).resolve()
        if resolved in seen:
            rule = f"is given twice (also as {seen[resolved]!r})"
            raise ConfigError("command line", "RUN_DIR", run_dir, rule, "pass each run once")
        seen[resolved] = run_dir


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name; runs with equal labels take one more parent folder until all differ."""
    parts = [Path(run_dir).resolve().parts for run_dir in run_dirs]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = [
            i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])
        ]
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1


def build_figure(histories: Sequence[RunHistory], *, x: str = "tokens") -> Figure:
    """The figure of `histories` (one colour and legend entry per run, in order); not yet saved."""
    from matplotlib.figure import Figure

    moe = any(MOE_KEY in r for h in histories for r in h.train)
    n_panels = len(PANELS) + moe
    rows = (n_panels + 1) // 2
    figure = Figure(figsize=(2 * PANEL_SIZE[0], rows * PANEL_SIZE[1] + 0.6), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False).ravel()
    # one x range for all panels (validation starts later); unlike subplots(sharex=True), each keeps its ticks
    for ax in axes[1:n_panels]:
        ax.sharex(axes[0])
    labels = run_labels([h.run_dir for h in histories])
    for panel, ax in zip(PANELS, axes):
        _draw_panel(ax, panel, histories, labels, x)
    if moe:
        _draw_moe(axes[len(PANELS)], histories, labels, x)
    for ax in axes[n_panels:]:
        ax.remove()
    handles = list(axes[0].get_lines())  # the train-loss panel: one line per run, in order
    figure.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4))
    return figure


def _style(index: int) -> dict[str, Any]:
    """Run `index`'s colour (the ten of matplotlib's cycle), then a new line style every ten runs."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}


def _draw_panel(ax: Axes, panel: Panel, histories: Sequence[RunHistory], labels: list[str], x: str) -> None:
    for index, (history, label) in enumerate(zip(histories, labels)):
        records = getattr(history, panel.kind)
        marker = "o" if panel.kind == "val" else None
        ax.plot(_x_values(history, records, x), _values(records, panel.key), label=label, marker=marker,
                markersize=3, linewidth=1.2, **_style(index))  # fmt: skip
    if panel.log and any(np.nanmax(line.get_ydata(), initial=0) > 0 for line in ax.get_lines()):
        ax.set_yscale("log")  # non-positive values are masked
    else:  # 2e-4 rather than 0.00020 (lr); losses and tokens/s below 1e5 stay plain
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 5), useMathText=True)
    _decorate(ax, panel.title, panel.ylabel, x)


def _draw_moe(ax: Axes, histories: Sequence[RunHistory], labels: list[str], x: str) -> None:
    """One thin line per MoE layer in its run's colour (legend: the runs), named L0, L1, ... at its end when the
    run has few MoE layers (L<i>: the i-th MoE layer, counted over MoE layers only)."""
    for index, (history, label) in enumerate(zip(histories, labels)):
        if not any(MOE_KEY in r for r in history.train):
            continue
        xs, per_layer = _x_values(history, history.train, x), layer_imbalance(history.train)
        for layer in range(per_layer.shape[1]):
            line, = ax.plot(xs, per_layer[:, layer], label=f"{label}: MoE layer {layer}", linewidth=0.9,
                            alpha=0.7, **_style(index))  # fmt: skip
            if per_layer.shape[1] <= NAMED_LAYERS:
                _name_at_end(ax, line, f"L{layer}")
    _decorate(ax, MOE_TITLE, "max / mean assignments per expert", x)
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":", label="_balanced")  # "_": not in a legend


def _name_at_end(ax: Axes, line: Any, name: str) -> None:
    xs, ys = line.get_xdata(), line.get_ydata()
    finite = np.flatnonzero(np.isfinite(xs) & np.isfinite(ys))
    if finite.size:
        end = finite[-1]
        ax.annotate(name, (xs[end], ys[end]), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=7, color=line.get_color())  # fmt: skip


def _decorate(ax: Axes, title: str, ylabel: str, x: str) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
    ax.grid(True, alpha=0.3)
    if x == "tokens":
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: short_count(value)))
    if not ax.get_lines() or all(np.isnan(line.get_ydata()).all() for line in ax.get_lines()):
        ax.text(0.5, 0.5, "no records", transform=ax.transAxes, ha="center", va="center", color="0.5")


def short_count(value: float) -> str:
    """1234567 -> '1.23M' (K, M, B, T: thousands to trillions), for a token axis."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _values(records: list[dict[str, Any]], key: str) -> np.ndarray:
    """records' `key` as floats; a missing or null value (e.g. the loss of a non-finite step) is NaN: a gap."""
    values = [r.get(key) for r in records]
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _x_values(history: RunHistory, records: list[dict[str, Any]], x: str) -> np.ndarray:
    steps = _values(records, "step")
    if x == "step":
        return steps
    if records is history.train:
        return _values(records, "tokens")
    return tokens_at(history, steps)


def tokens_at(history: RunHistory, steps: np.ndarray) -> np.ndarray:
    """Tokens seen after `steps`, from the train records: linear between logged steps (step 0: 0 tokens), and
    past the last one at its mean tokens per step (a killed run's validation can come after its last log)."""
    known = [(r["step"], r["tokens"]) for r in history.train if r.get("tokens") is not None]
    at_step = np.array([0] + [step for step, _ in known], dtype=float)
    tokens = np.array([0] + [count for _, count in known], dtype=float)
    estimate = np.interp(steps, at_step, tokens)
    beyond = steps > at_step[-1]
    estimate[beyond] = tokens[-1] / at_step[-1] * steps[beyond] if at_step[-1] > 0 else np.nan
    return estimate


def layer_imbalance(records: list[dict[str, Any]]) -> np.ndarray:
    """[records, MoE layers]: max over experts of a layer's assignments / their mean (NaN where not logged)."""
    loads = [r.get(MOE_KEY) or [] for r in records]
    out = np.full((len(records), max(map(len, loads), default=0)), np.nan)
    for row, layers in enumerate(loads):
        for layer, counts in enumerate(layers):
            mean = float(np.mean(counts)) if counts else 0.0
            out[row, layer] = max(counts) / mean if mean > 0 else np.nan
    return out
