"""The report's figures: one PNG per experiment, drawn from the analysis tables (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .experiments import by_rank, rounded

if TYPE_CHECKING:
    from .run import Analysis

__all__ = ["FIGURES", "plot_amplification", "plot_group_layers", "plot_group_map", "plot_key_networks",
           "plot_layer_networks", "plot_recurrence"]

FIGURES = {
    "layer_networks": "fig_layer_networks.png",
    "group_map": "fig_group_network_map.png",
    "group_layers": "fig_group_network_layers.png",
    "recurrence": "fig_recurrence.png",
    "key_networks": "fig_key_networks.png",
    "amplification": "fig_amplification.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 100})
    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_layer_networks(analysis: Analysis, path: Path) -> list[dict]:
    """Per-layer ICA: relevance of every (layer, component) and union of members per layer."""
    plt = _plt()
    rows = analysis.tables["layer_networks"]
    n_layers = max(r["layer"] for r in rows) + 1
    k = max(r["network"] for r in rows) + 1
    rel = np.zeros((n_layers, k))
    for r in rows:
        rel[r["layer"], r["network"]] = r["relevance"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.16 * n_layers + 1.5)),
                               gridspec_kw={"width_ratios": [3, 2]})
    im = a.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    a.set_xlabel("ICA component (per layer)")
    a.set_ylabel("layer")
    a.set_title("Per-layer networks: task relevance (label separation)")
    fig.colorbar(im, ax=a, fraction=0.04)
    for r in analysis.tables["key_networks"]:
        a.plot(r["component"], r["layer"], marker="o" if r["kind"] == "top" else "s", mfc="none",
               mec="red" if r["kind"] == "top" else "white", ms=7)
    summ = analysis.tables["layer_summary"]
    b.barh([s["layer"] for s in summ], [s["union_size"] for s in summ], color="tab:blue")
    b.set_xlabel("neurons in any network (|z| > threshold)")
    b.set_ylabel("layer")
    b.set_title("Per-layer networks: neurons covered")
    b.set_ylim(-0.5, n_layers - 0.5)
    _save(plt, fig, path)
    return [{"layer": i, "component": j, "relevance": rounded(rel[i, j], 5)} for i in range(n_layers) for j in range(k)]


def _top_group(analysis: Analysis, n: int) -> list[int]:
    rows = sorted(analysis.tables["group_networks"], key=by_rank)
    return [r["network"] for r in rows[:n]]


def plot_group_map(analysis: Analysis, path: Path, n: int = 8, bins: int = 64) -> list[dict]:
    """Where each of the top-n group networks' neurons sit: layer x neuron-index bins, member counts."""
    plt = _plt()
    group = analysis.group
    nets = _top_group(analysis, n)
    width = max(group.widths)
    bins = min(bins, width)
    edges = np.linspace(0, width, bins + 1).astype(int)
    cols = 2
    rows_n = (len(nets) + cols - 1) // cols
    n_layers = len(group.widths)
    fig, axes = plt.subplots(rows_n, cols, figsize=(11, max(2.2, rows_n * (0.06 * n_layers + 1.4))), squeeze=False)
    data = []
    for ax, k in zip(axes.flat, nets):
        grid = np.zeros((n_layers, bins))
        for i, idx in enumerate(group.per_layer(k)):
            grid[i] = np.histogram(idx, bins=edges)[0]
        for i, j in zip(*np.nonzero(grid)):
            data.append({"network": k, "layer": int(i), "bin": int(j), "neuron_from": int(edges[j]),
                         "neuron_to": int(edges[j + 1]), "members": int(grid[i, j])})
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest", origin="lower",
                       extent=(0, width, -0.5, n_layers - 0.5), vmin=0, vmax=max(1, grid.max()))
        rel = group.relevance[k]
        ax.set_title(f"group network {k}: {int(group.members[k].sum())} neurons, relevance {rel:.2f}")
        ax.set_ylabel("layer")
        ax.set_xlabel(f"MLP neuron index (bins of {width // bins})")
        fig.colorbar(im, ax=ax, fraction=0.03, label="members")
    for ax in list(axes.flat)[len(nets) :]:
        ax.axis("off")
    fig.suptitle("Cross-layer (group ICA) networks, most task-relevant first")
    _save(plt, fig, path)
    return data


def plot_group_layers(analysis: Analysis, path: Path, n: int = 8) -> None:
    plt = _plt()
    group = analysis.group
    nets = _top_group(analysis, n)
    n_layers = len(group.widths)
    fig, ax = plt.subplots(figsize=(11, 4))
    w = 0.8 / max(len(nets), 1)
    for j, k in enumerate(nets):
        counts = [len(idx) for idx in group.per_layer(k)]
        ax.bar(np.arange(n_layers) + (j - len(nets) / 2 + 0.5) * w, counts, width=w, label=f"network {k}")
    ax.set_xlabel("layer")
    ax.set_ylabel("member neurons")
    ax.set_title("Cross-layer networks: neurons per layer (top networks by task relevance)")
    ax.set_xticks(range(n_layers))
    ax.legend(ncol=4, fontsize=8)
    _save(plt, fig, path)


def plot_recurrence(analysis: Analysis, path: Path) -> None:
    plt = _plt()
    rows = analysis.tables["recurrence"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    rel_order = [r["network"] for r in sorted(analysis.tables["group_networks"], key=by_rank)]
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    w = 0.8 / max(len(tasks), 1)
    x = np.arange(len(rel_order))
    for j, t in enumerate(tasks):
        by = {r["template"]: r for r in rows if r["task"] == t}
        off = (j - len(tasks) / 2 + 0.5) * w
        a.bar(x + off, [by[k]["recurrence_rate"] if k in by else 0 for k in rel_order], width=w, label=t)
        a.plot(x + off, [by[k]["null_rate"] if k in by else 0 for k in rel_order], "k_", ms=8)
        b.bar(x + off, [by[k]["mean_best_iou"] if k in by else 0 for k in rel_order], width=w, label=t)
        b.plot(x + off, [by[k]["null_mean_best_iou"] if k in by else 0 for k in rel_order], "k_", ms=8)
    thr = analysis.spec.iou_threshold
    a.set_ylabel(f"fraction of groups with IoU > {thr:g}")
    a.set_title("Recurrence of group-ICA templates in ICA of small sample groups (black ticks: shuffled null)")
    a.legend()
    b.axhline(thr, color="grey", ls="--", lw=1)
    b.set_ylabel("mean best IoU")
    b.set_xlabel("template (group network id), most task-relevant first")
    b.set_xticks(x)
    b.set_xticklabels([str(k) for k in rel_order], fontsize=7)
    _save(plt, fig, path)


def plot_key_networks(analysis: Analysis, path: Path) -> None:
    plt = _plt()
    rows = analysis.tables["key_networks"]
    seeds = analysis.tables["key_networks_seeds"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    x = np.arange(len(rows))
    dense = analysis.info["dense_accuracy"]
    ax.bar(x - 0.2, [r["fn_drop"] for r in rows], width=0.4, label="network masked",
           color=["tab:red" if r["kind"] == "top" else "tab:gray" for r in rows])
    ax.bar(x + 0.2, [r["random_drop_mean"] for r in rows], width=0.4, yerr=[r["random_acc_std"] or 0 for r in rows],
           capsize=3, label="same number of random neurons, same layer (mean, std over seeds)", color="tab:blue")
    for j, r in enumerate(rows):
        pts = [dense - s["accuracy"] for s in seeds if s["network"] == r["network"]]
        ax.plot([j + 0.2] * len(pts), pts, "k.", ms=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['network']}\n{r['size']} n, {r['kind']}" for r in rows], fontsize=7)
    ax.set_ylabel("accuracy drop (dense - masked)")
    ev = analysis.info["evaluation"]
    ax.set_title(f"Masking one network in its layer ({analysis.info['task']}, {ev['samples']} {ev['split']} examples, "
                 f"dense acc {dense:.3f}); grey bars = random control networks")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_amplification(analysis: Analysis, path: Path) -> None:
    plt = _plt()
    rows = [r for r in analysis.tables["amplification"] if r["target"] == "network"]
    rand = [r for r in analysis.tables["amplification"] if r["target"] == "random"]
    dense = analysis.info["dense_accuracy"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in dict.fromkeys(r["network"] for r in rows):
        pts = sorted([(1.0, dense)] + [(r["scale"], r["accuracy"]) for r in rows if r["network"] == name])
        kind = next(r["kind"] for r in rows if r["network"] == name)
        ax.plot(*zip(*pts), marker="o", ms=3, ls="-" if kind == "top" else ":", label=f"{name} ({kind})")
    if rand:
        ax.plot([r["scale"] for r in rand], [r["accuracy"] for r in rand], "kx", label="random neurons, same layer")
    ax.axhline(dense, color="grey", ls="--", lw=1, label="dense")
    ax.set_xlabel("factor applied to the network's neurons (0 = masked, 1 = unchanged)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Amplification sweep ({analysis.info['task']}, {analysis.info['evaluation']['samples']} examples)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    _save(plt, fig, path)
