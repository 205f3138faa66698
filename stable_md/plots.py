"""PNG figures of refine and evaluate runs (matplotlib, no display needed)."""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PHASE_COLOURS = {"simulation": "tab:blue", "learning": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def unstable_fraction_figure(history: Sequence[dict], path: Path) -> Path:
    """Unstable fraction per epoch, coloured by phase (the paper's Fig. 3a), with the observable loss below."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    epochs = np.array([row["epoch"] for row in history])
    fractions = np.array([row["unstable_fraction"] for row in history])
    phases = [row["phase"] for row in history]
    top.plot(epochs, fractions, color="0.6", lw=1, zorder=1)
    for phase, colour in PHASE_COLOURS.items():
        chosen = np.array([p == phase for p in phases])
        if chosen.any():
            top.scatter(epochs[chosen], fractions[chosen], color=colour, s=18, label=f"{phase} phase", zorder=2)
    for epoch, phase in zip(epochs, phases):
        if phase == "learning":
            top.axvspan(epoch - 0.5, epoch + 0.5, color=PHASE_COLOURS["learning"], alpha=0.12, lw=0)
    top.set_ylabel("fraction of replicas unstable")
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="upper left", frameon=False)
    # Unweighted ||ĝ − g_ref||² per observable: with --obs-weight auto the weights change from epoch to
    # epoch, so the weighted sum would show the weights rather than the fit.
    names = sorted({key[len("loss_"):] for row in history for key in row if key.startswith("loss_")})
    for name, marker in zip(names, itertools.cycle("os^vD<>")):
        losses = np.array([row.get(f"loss_{name}", np.nan) for row in history], dtype=float)
        for phase, colour in PHASE_COLOURS.items():
            chosen = np.array([p == phase for p in phases]) & np.isfinite(losses) & (losses > 0)
            if chosen.any():
                bottom.semilogy(epochs[chosen], losses[chosen], marker, ms=3, color=colour,
                                label=name if phase == "learning" and len(names) > 1 else None)
    if bottom.get_legend_handles_labels()[1]:
        bottom.legend(loc="upper right", frameon=False, fontsize="small")
    bottom.set_ylabel("observable loss\n(unweighted)" if len(names) == 1 else "observable losses\n(unweighted)")
    bottom.set_xlabel("epoch (t steps each)")
    return _save(plt, fig, path)


def observable_figure(x: np.ndarray, reference: np.ndarray, curves: dict[str, np.ndarray], path: Path,
                      x_label: str, y_label: str, title: Optional[str] = None,
                      panels: Optional[Sequence[tuple[str, np.ndarray]]] = None,
                      categories: Optional[Sequence[str]] = None) -> Path:
    """Reference vs model curves (top) and their differences from the reference (bottom), saved to ``path``.

    ``panels`` splits the vector into titled panels side by side (an element RDF: one per pair);
    ``categories`` names entries that are categories (bond types): drawn as markers at named ticks, not
    as a line along an axis.
    """
    plt = _pyplot()
    figure = build_observable_figure(x, reference, curves, x_label, y_label, title, panels, categories)
    return _save(plt, figure, path)


def build_observable_figure(x: np.ndarray, reference: np.ndarray, curves: dict[str, np.ndarray], x_label: str,
                            y_label: str, title: Optional[str] = None,
                            panels: Optional[Sequence[tuple[str, np.ndarray]]] = None,
                            categories: Optional[Sequence[str]] = None):
    """The matplotlib figure of :func:`observable_figure`, unsaved."""
    plt = _pyplot()
    panels = list(panels) if panels else [("", np.arange(len(reference)))]
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(4.2 * columns if columns > 1 else 7, 5.5 * rows),
                             squeeze=False, height_ratios=[2, 1] * rows)
    x, reference = np.asarray(x), np.asarray(reference)
    colours = _colours(plt)
    every = [reference] + [np.asarray(v) for v in curves.values()]
    for k, (name, index) in enumerate(panels):
        top, bottom = axes[2 * (k // columns), k % columns], axes[2 * (k // columns) + 1, k % columns]
        bottom.sharex(top)
        index = np.asarray(index)
        if categories is not None:
            style = dict(linestyle="none", marker="o", markersize=5)
            where = np.arange(len(index))
            top.plot(where, reference[index], color="black", linestyle="none", marker="_", markersize=16,
                     markeredgewidth=2, label="reference (data)")
        else:
            style = dict(lw=1.2)
            where = x[index]
            top.plot(where, reference[index], color="black", lw=1.5, label="reference (data)")
        for j, (label, values) in enumerate(curves.items()):
            values = np.asarray(values)[index]
            top.plot(where, values, color=colours[j % len(colours)], label=label, **style)
            bottom.plot(where, values - reference[index], color=colours[j % len(colours)], **style)
        bottom.axhline(0.0, color="black", lw=0.8)
        if categories is not None:
            bottom.set_xticks(where, [categories[i] for i in index], rotation=45 if len(index) > 6 else 0,
                              ha="right" if len(index) > 6 else "center")
            top.tick_params(labelbottom=False)
            top.set_xlim(-0.5, len(index) - 0.5)
        elif len(where) > 1:
            # Crop the empty tail (h(r) of a small molecule ends well before 10 Å).
            scale = np.max(np.abs(reference[index])) or 1.0
            filled = np.flatnonzero(np.max(np.abs([v[index] for v in every]), axis=0) > 1e-3 * scale)
            if len(filled):
                top.set_xlim(where[0], min(where[-1], where[filled[-1]] + 0.05 * (where[-1] - where[0])))
        if name:
            top.set_title(name)
        if k % columns == 0:
            top.set_ylabel(y_label)
            unit = re.search(r" (\([^()]*\))$", y_label)
            bottom.set_ylabel("difference" + (f" {unit.group(1)}" if unit else ""))
        bottom.set_xlabel(x_label)
        if k == 0:
            top.legend(frameon=False, fontsize="small" if len(panels) > 1 else None)
    for k in range(len(panels), rows * columns):  # unused cells of the last row
        axes[2 * (k // columns), k % columns].set_visible(False)
        axes[2 * (k // columns) + 1, k % columns].set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def refine_figures(history: Sequence[dict], terms, first_means: Optional[dict], last_means: Optional[dict],
                   directory: Path) -> list[Path]:
    """The refine run's figures: unstable fraction over training and each observable at the start and end."""
    paths = []
    if history:
        paths.append(unstable_fraction_figure(history, Path(directory) / "unstable_fraction.png"))
    if first_means and last_means:
        for term in terms:
            name = term.observable.name
            if name not in first_means or name not in last_means:
                continue
            x = term.observable.x if len(term.observable.x) == len(term.reference) else np.arange(len(term.reference))
            curves = {"samples, first epoch": np.asarray(first_means[name]),
                      "samples, last epoch": np.asarray(last_means[name])}
            paths.append(observable_figure(x, term.reference.numpy(), curves, Path(directory) / f"{name}.png",
                                           term.observable.x_label, term.observable.y_label or name,
                                           panels=term.observable.panels(), categories=term.observable.categories))
    return paths


def _colours(plt) -> list[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def stability_curves_figure(curves: dict[str, dict], total_ps: float, path: Path,
                            title: Optional[str] = None) -> Path:
    """Fraction of replicas unstable against time (1 − Kaplan-Meier), one line per model, with the 95 % band
    shaded (the paper's Fig. 3b/4a); ``curves`` holds :meth:`SurvivalSummary.to_json`'s ``kaplan_meier``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, (label, curve) in enumerate(curves.items()):
        colour = _colours(plt)[k % 10]
        time = np.concatenate([[0.0], np.asarray(curve["time_ps"], dtype=float), [total_ps]])
        steps = {key: np.concatenate([[1.0], np.asarray(curve[key], dtype=float)]) for key in
                 ("survival", "lower", "upper")}
        steps = {key: np.concatenate([values, values[-1:]]) for key, values in steps.items()}
        ax.step(time, 1.0 - steps["survival"], where="post", lw=1.6, color=colour, label=label)
        ax.fill_between(time, 1.0 - steps["upper"], 1.0 - steps["lower"], step="post", color=colour, alpha=0.18,
                        lw=0)
    ax.set_xlim(0.0, total_ps)
    ax.set_xlabel("simulation time (ps)")
    ax.set_ylabel("fraction of replicas unstable (Kaplan-Meier, 95% CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(frameon=False, loc="upper left")
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


def stable_time_figure(times: dict[str, Sequence[float]], total_ps: float, path: Path) -> Path:
    """Per-replica stable times of each model as points over a box plot; the top line is the evaluated time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(times), 4.2))
    labels = list(times)
    data = [np.asarray(times[label], dtype=float) for label in labels]
    ax.boxplot(data, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)
    for k, values in enumerate(data, start=1):
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6,
                   color=_colours(plt)[(k - 1) % 10], zorder=3)
    ax.axhline(total_ps, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right")
    ax.set_ylabel("stable time per replica (ps)")
    return _save(plt, fig, path)


def vacf_figure(curves: dict[str, dict], path: Path, reference: Optional[dict] = None) -> Path:
    """Velocity autocorrelation (normalised) of each model, mean ± one standard deviation over replicas, and the
    data's own (``reference``: evaluate's ``reference_vacf``) up to the models' longest lag, when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if reference:
        longest = max(curve["lag_fs"][-1] for curve in curves.values())
        lag, values = np.asarray(reference["lag_fs"]), np.asarray(reference["values"])
        shown = lag <= longest + 1e-9
        ax.plot(lag[shown], values[shown], color="black", lw=1.4, ls="--", label="data")
    for k, (label, curve) in enumerate(curves.items()):
        lag, mean, std = (np.asarray(curve[key]) for key in ("lag_fs", "mean", "std"))
        colour = _colours(plt)[k % 10]
        ax.plot(lag, mean, lw=1.4, color=colour, label=label)
        ax.fill_between(lag, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("lag (fs)")
    ax.set_ylabel("VACF (normalised)")
    ax.legend(frameon=False)
    return _save(plt, fig, path)
