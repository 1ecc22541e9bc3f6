"""The four experiments, one function each; every one returns its tables (lists of row dicts, one CSV each).

1. networks:      per-layer ICA maps (the pipeline's) and cross-layer group maps: sizes, relevance, layers.
2. recurrence:    group-ICA templates vs ICA on small groups of held-out samples, matched by IoU of the
                  thresholded maps, against a shuffled null.
3. key networks:  one network's neurons zeroed in its own layer vs the same number of random neurons of that
                  layer over several seeds; `group_mask`: the paper's "mask the top FNs together" test.
4. amplification: a network's neurons scaled by factors; the factor chosen on one half of the evaluation
                  data and its gain measured on the other half, with random-neuron controls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arch import layout_for
from ..calibration import Calibration
from ..capture import capture_activations
from ..data import Example, sample
from ..intervals import draws_difference_interval
from ..tokens import encode_inputs
from .cross_layer import GroupNetworks, concat_layers, match_templates, shuffle_within_layers
from .group_ica import spatial_ica
from .scoring import Scorer, verify_masking
from .spec import AnalysisSpec

__all__ = ["Baseline", "amplification", "dense_baseline", "group_mask", "group_tables", "key_networks",
           "live_neurons", "network_tables", "pick_networks", "recurrence", "rounded"]

log = logging.getLogger("fnprune")
Rows = list[dict[str, Any]]


def rounded(v: Any, digits: int = 6) -> Any:
    """NumPy scalars as plain Python numbers (floats rounded), for CSV and JSON."""
    if isinstance(v, (float, np.floating)):
        return round(float(v), digits)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _std(x: list[float] | np.ndarray) -> float | str:
    """The sample standard deviation, rounded; blank for a single value (one seed shows no spread, not 0)."""
    x = np.asarray(x, dtype=float)
    return rounded(float(x.std(ddof=1)), 4) if x.size > 1 else ""


def _excess_interval(c_fn: np.ndarray, rand: list[np.ndarray], seed: int) -> tuple[float, float]:
    """95% interval of random-masked minus network-masked accuracy over the examples and the random draws
    (fnprune.intervals)."""
    found = draws_difference_interval(torch.from_numpy(c_fn.astype(np.float64)),
                                      torch.from_numpy(np.stack(rand).astype(np.float64)), seed=seed)
    if found is None:  # only without examples, which _load_data refuses
        raise ValueError("no examples to bootstrap")
    return found


def live_neurons(calib: Calibration) -> list[np.ndarray]:
    """Per layer, (width,) bool: the neurons that vary over the calibration tokens. ICA leaves the constant ones
    (ReLU-dead, padding) out of every network, so the random controls leave them out too: masking one changes
    nothing, and a control holding some would mask fewer real neurons than the network."""
    return [~a.constant.numpy() for a in calib.activations]


def _random_same_layer(live: np.ndarray, exclude: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random live neurons of a layer (`live`: its live_neurons mask) outside `exclude`; all of them when
    there are fewer (`_control_size` records and warns)."""
    pool = np.flatnonzero(live & ~np.isin(np.arange(len(live)), exclude))
    return np.sort(rng.choice(pool, min(count, len(pool)), replace=False))


def _control_size(what: str, size: int, control: int) -> int:
    """The random control's size, warned when it is smaller than the network: its layer has too few other live
    neurons, so the control is not "the same number of random neurons" (the tables' random_size)."""
    if control < size:
        log.warning("%s: its layer(s) have only %d live neurons outside it, so its random control masks %d neurons, "
                    "not %d (random_size in the tables)", what, control, control, size)
    return control


# ------------------------------------------------------------------------------------------ 1. networks


def _ranked_networks(calib: Calibration) -> list[tuple[float, int, int]]:
    """(relevance, layer, component) of every per-layer network with members, most relevant first."""
    cands = [(float(calib.relevance[i][k]), i, k) for i, n in enumerate(calib.networks)
             for k in range(n.maps.shape[0]) if n.members[k].any()]
    return sorted(cands, key=lambda c: (-c[0], c[1], c[2]))


def _network_ranks(calib: Calibration) -> dict[tuple[int, int], int]:
    """Relevance rank (1 = most relevant) among per-layer networks with members; empty networks are unranked."""
    return {(i, k): r + 1 for r, (_, i, k) in enumerate(_ranked_networks(calib))}


def network_tables(calib: Calibration) -> dict[str, Rows]:
    """Per-layer networks: one row per (layer, component), and one summary row per layer."""
    layer_rows = []
    for i, (n, rel) in enumerate(zip(calib.networks, calib.relevance)):
        for k in range(n.maps.shape[0]):
            layer_rows.append({"layer": i, "network": k, "size": int(n.members[k].sum()), "relevance": rounded(rel[k]),
                               "converged": n.converged})
    ranks = _network_ranks(calib)
    for row in layer_rows:
        row["relevance_rank"] = ranks.get((row["layer"], row["network"]), "")
    summary = [{
        "layer": i, "networks": int(n.maps.shape[0]), "median_size": float(np.median(n.members.sum(1))),
        "max_size": int(n.members.sum(1).max()), "union_size": int(n.members.any(0).sum()),
        # of the neurons that vary: constant ones (ReLU-dead, padding) are in no network
        "union_fraction": rounded(n.members.any(0).sum() / max(int(live.sum()), 1), 4),
        "max_relevance": rounded(rel.max(), 4), "dead_neurons": n.dead_neurons, "converged": n.converged,
    } for i, (n, rel, live) in enumerate(zip(calib.networks, calib.relevance, live_neurons(calib)))]
    return {"layer_networks": layer_rows, "layer_summary": summary}


def by_rank(row: dict[str, Any]) -> tuple[bool, int]:
    """Sort key of a network row: ranked ones by `relevance_rank`, then the unranked (empty) ones."""
    rank = row["relevance_rank"]
    return (rank == "", rank if rank != "" else 0)


def group_tables(group: GroupNetworks) -> dict[str, Rows]:
    """Cross-layer networks: one row per network (rank, size, layers spanned), and its members per layer."""
    ranked = [int(k) for k in group.by_relevance() if group.members[k].any()]  # empty networks stay unranked
    g_rank = {k: r + 1 for r, k in enumerate(ranked)}
    layer_of = group.layer_of()
    networks = [{
        "network": k, "relevance_rank": g_rank.get(k, ""), "relevance": rounded(group.relevance[k]),
        "size": int(group.members[k].sum()), "fraction": rounded(group.members[k].mean(), 5),
        "layers_spanned": int(len(np.unique(layer_of[group.members[k]]))),
        "top_layer": int(np.bincount(layer_of[group.members[k]], minlength=len(group.widths)).argmax())
        if group.members[k].any() else -1,
    } for k in range(group.members.shape[0])]
    layers = [{"network": k, "layer": i, "members": int(len(idx))}
              for k in range(group.members.shape[0]) for i, idx in enumerate(group.per_layer(k))]
    return {"group_networks": networks, "group_network_layers": layers}


# ---------------------------------------------------------------------------------------- 2. recurrence


def _groups(examples: list[Example], spec: AnalysisSpec, seed: int) -> list[list[Example]]:
    n = min(spec.recurrence_groups, len(examples) // spec.group_size)
    picked = sample(examples, n * spec.group_size, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(picked))
    return [[picked[j] for j in order[g * spec.group_size : (g + 1) * spec.group_size]] for g in range(n)]


def _recurrence_summary(group: GroupNetworks, task_name: str, per_group: Rows) -> Rows:
    summary = []
    for t in range(group.members.shape[0]):
        rows = [r for r in per_group if r["template"] == t]
        if not rows:
            continue
        summary.append({
            "task": task_name, "template": t, "template_size": int(group.members[t].sum()),
            "relevance": rounded(group.relevance[t]), "groups": len(rows),
            "recurrence_rate": rounded(np.mean([r["recurs"] for r in rows])),
            "mean_best_iou": rounded(np.mean([r["best_iou"] for r in rows])),
            "null_rate": rounded(np.mean([r["null_recurs"] for r in rows])),
            "null_mean_best_iou": rounded(np.mean([r["null_best_iou"] for r in rows])),
        })
    return summary


def _task_recurrence(model, tokenizer, spec: AnalysisSpec, group: GroupNetworks, task_name: str,
                     groups: list[list[Example]], progress: bool) -> tuple[Rows, Rows]:
    layout = layout_for(model)
    ica = spec.networks
    rng = np.random.default_rng(spec.seed + 7)
    per_group = []
    for g, examples in enumerate(tqdm(groups, desc=f"recurrence {task_name}", unit="group", disable=not progress)):
        seqs = encode_inputs(tokenizer, examples, 1024, model)
        n_tok = sum(len(s) for s in seqs)
        acts = capture_activations(model, layout, seqs, max_tokens=n_tok, batch_size=spec.calibration.batch_size,
                                   seed=spec.seed, progress=False)
        k = min(ica.components, max(2, n_tok // 2))
        try:
            nets = spatial_ica(concat_layers([a.tokens for a in acts]), k, ica.threshold, ica.seed + g,
                               ica.max_iter, ica.tol)
        except ValueError as exc:
            log.warning("recurrence %s group %d skipped: %s", task_name, g, exc)
            continue
        best, hit = match_templates(group.members, nets.members, spec.iou_threshold)
        null_best, null_hit = match_templates(group.members, shuffle_within_layers(nets.members, group.widths, rng),
                                              spec.iou_threshold)
        for t in range(group.members.shape[0]):
            per_group.append({"task": task_name, "group": g, "tokens": n_tok, "components": k, "template": t,
                              "best_iou": rounded(best[t]), "recurs": bool(hit[t]),
                              "null_best_iou": rounded(null_best[t]), "null_recurs": bool(null_hit[t])})
    return _recurrence_summary(group, task_name, per_group), per_group


def recurrence(model, tokenizer, spec: AnalysisSpec, group: GroupNetworks,
               sources: list[tuple[str, list[Example]]], progress: bool) -> dict[str, Rows]:
    """Per task in `sources` (name, examples the networks were not found on): how often each group network
    recurs in the ICA of small groups of those examples."""
    summary, detail = [], []
    if spec.recurrence_groups:
        for j, (name, examples) in enumerate(sources):
            groups = _groups(examples, spec, spec.seed + 100 + j)
            if not groups:
                log.warning("recurrence: not enough held-out %s examples for one group of %d", name, spec.group_size)
                continue
            if len(groups) < spec.recurrence_groups:
                log.warning("recurrence: %d held-out %s examples make %d groups of %d, not the %d asked", len(examples),
                            name, len(groups), spec.group_size, spec.recurrence_groups)
            s, d = _task_recurrence(model, tokenizer, spec, group, name, groups, progress)
            summary += s
            detail += d
    return {"recurrence": summary, "recurrence_groups": detail}


# -------------------------------------------------------------------------------------- 3. key networks


def pick_networks(calib: Calibration, spec: AnalysisSpec) -> list[dict]:
    """The `top_networks` most relevant per-layer networks, then `control_networks` random others."""
    cands = _ranked_networks(calib)
    rank = _network_ranks(calib)
    top = cands[: spec.top_networks]
    rest = cands[spec.top_networks :]
    rng = np.random.default_rng(spec.seed + 11)
    ctrl_idx = sorted(rng.choice(len(rest), min(spec.control_networks, len(rest)), replace=False).tolist())
    chosen = [("top", c) for c in top] + [("control", rest[j]) for j in ctrl_idx]
    out = []
    for kind, (rel, i, k) in chosen:
        out.append({"name": f"L{i}.N{k}", "kind": kind, "layer": i, "network": k, "rank": rank[(i, k)],
                    "relevance": rel, "members": np.flatnonzero(calib.networks[i].members[k])})
    return out


@dataclass
class Baseline:
    """The dense model on the evaluation subset, which every intervention is measured against."""

    scorer: Scorer
    correct: np.ndarray  # (n,) bool: dense prediction right
    halves: list[np.ndarray]  # two disjoint halves of the examples (indices), for choosing vs measuring
    verify_examples: list[Example]  # examples each masking is checked on (verify_masking)
    live: list[np.ndarray]  # per layer, the live neurons (live_neurons): what random controls are drawn from

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def verified(self, changes: dict[int, np.ndarray], what: str) -> bool:
        check = verify_masking(self.scorer.model, self.scorer.tokenizer, self.verify_examples, changes)
        if not check["ok"]:
            raise RuntimeError(f"masking {what} failed its per-layer check: {check['problems']}")
        return check["ok"]


def dense_baseline(scorer: Scorer, nets: list[dict], spec: AnalysisSpec, live: list[np.ndarray]) -> Baseline:
    """Dense scores (caching what replay from the analyzed networks' layers needs) and the seeded halves."""
    correct = scorer.correct(scorer.prepare({n["layer"] for n in nets}))
    perm = np.random.default_rng(spec.seed + 3).permutation(len(scorer.examples))
    halves = [np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])]
    return Baseline(scorer, correct, halves, scorer.examples[:4], live)


def key_networks(base: Baseline, nets: list[dict], spec: AnalysisSpec,
                 progress: bool) -> tuple[dict[str, Rows], dict[str, np.ndarray]]:
    """Each network zeroed in its own layer vs random neurons of that layer; also returns the per-example
    correctness with each network masked (amplification's factor 0)."""
    scorer, dense, dense_acc, halves = base.scorer, base.correct, base.accuracy, base.halves
    key_rows, seed_rows = [], []
    corrects: dict[str, np.ndarray] = {}
    for n in tqdm(nets, desc="key networks", unit="network", disable=not progress):
        i, members = n["layer"], n["members"]
        verified = base.verified({i: members}, f"network {n['name']}")
        c_fn = scorer.correct(scorer.scores({i: (members, 0.0)}))
        corrects[n["name"]] = c_fn
        rand = []
        for s in range(spec.seeds):
            idx = _random_same_layer(base.live[i], members, len(members), np.random.default_rng(spec.seed * 1000 + s))
            c = scorer.correct(scorer.scores({i: (idx, 0.0)}))
            rand.append(c)
            seed_rows.append({"network": n["name"], "seed": s, "accuracy": rounded(c.mean())})
        random_size = _control_size(f"network {n['name']}", len(members), len(idx))
        rand_acc = np.array([c.mean() for c in rand])
        lo, hi = _excess_interval(c_fn, rand, spec.seed)
        key_rows.append({
            "network": n["name"], "kind": n["kind"], "layer": i, "component": n["network"],
            "relevance_rank": n["rank"], "relevance": rounded(n["relevance"], 4), "size": int(len(members)),
            "random_size": random_size, "masked_fn_acc": rounded(c_fn.mean(), 4),
            "fn_drop": rounded(dense_acc - c_fn.mean(), 4),
            "random_acc_mean": rounded(rand_acc.mean(), 4), "random_acc_std": _std(rand_acc),
            "random_drop_mean": rounded(dense_acc - rand_acc.mean(), 4),
            "excess_drop": rounded(rand_acc.mean() - c_fn.mean(), 4), "excess_ci_low": rounded(lo, 4),
            "excess_ci_high": rounded(hi, 4),
            "fn_drop_half_a": rounded(dense[halves[0]].mean() - c_fn[halves[0]].mean(), 4),
            "fn_drop_half_b": rounded(dense[halves[1]].mean() - c_fn[halves[1]].mean(), 4),
            "masking_verified": verified,
        })
    return {"key_networks": key_rows, "key_networks_seeds": seed_rows}, corrects


def group_mask(base: Baseline, group: GroupNetworks, spec: AnalysisSpec) -> Rows:
    """The top `group_mask` group networks zeroed together, in every layer they span, vs as many random
    neurons in each of those layers."""
    if not spec.group_mask:
        return []
    scorer, widths = base.scorer, base.scorer.widths
    chosen = [int(k) for k in group.by_relevance() if group.members[k].any()][: spec.group_mask]  # empty: skipped
    union = group.members[chosen].any(0)
    per_layer = {i: np.flatnonzero(union[group.offsets[i] : group.offsets[i + 1]]) for i in range(len(widths))}
    per_layer = {i: idx for i, idx in per_layer.items() if len(idx)}
    verified = base.verified(per_layer, "the group networks")
    c_fn = scorer.correct(scorer.scores({i: (idx, 0.0) for i, idx in per_layer.items()}))
    rand = []
    for s in range(spec.seeds):
        rng = np.random.default_rng(spec.seed * 1000 + 500 + s)
        changes = {i: (_random_same_layer(base.live[i], idx, len(idx), rng), 0.0) for i, idx in per_layer.items()}
        rand.append(scorer.correct(scorer.scores(changes)))
    rand_acc = np.array([c.mean() for c in rand])
    lo, hi = _excess_interval(c_fn, rand, spec.seed)
    total = int(sum(len(v) for v in per_layer.values()))
    random_size = _control_size("the group networks", total, int(sum(len(idx) for idx, _ in changes.values())))
    return [{
        "networks": len(chosen), "neurons": total, "random_neurons": random_size,
        "fraction_of_live_neurons": rounded(total / max(int(sum(m.sum() for m in base.live)), 1), 5),
        "layers": len(per_layer), "dense_acc": rounded(base.accuracy, 4), "masked_fn_acc": rounded(c_fn.mean(), 4),
        "random_acc_mean": rounded(rand_acc.mean(), 4), "random_acc_std": _std(rand_acc),
        "random_accs": " ".join(f"{a:.4f}" for a in rand_acc),
        "excess_drop": rounded(rand_acc.mean() - c_fn.mean(), 4), "excess_ci_low": rounded(lo, 4),
        "excess_ci_high": rounded(hi, 4), "masking_verified": verified,
    }]


# ------------------------------------------------------------------------------------- 4. amplification


def _accuracy_row(n: dict, target: str, seed: Any, scale: float, c: np.ndarray, base: Baseline) -> dict:
    halves, dense_acc = base.halves, base.accuracy
    return {"network": n["name"], "kind": n["kind"], "target": target, "seed": seed, "scale": scale,
            "accuracy": rounded(c.mean(), 4), "acc_half_a": rounded(c[halves[0]].mean(), 4),
            "acc_half_b": rounded(c[halves[1]].mean(), 4), "gain": rounded(c.mean() - dense_acc, 4)}


def _amplify(base: Baseline, n: dict, masked: np.ndarray | None, spec: AnalysisSpec) -> tuple[Rows, dict | None]:
    """One network's amplification curve, its best and cross-validated factors, and random controls."""
    scorer, dense, dense_acc, halves = base.scorer, base.correct, base.accuracy, base.halves
    i, members = n["layer"], n["members"]
    rows, curve = [], {}
    for f in spec.scales:
        if f == 1.0:
            continue
        c = masked if f == 0 and masked is not None else scorer.correct(scorer.scores({i: (members, float(f))}))
        curve[float(f)] = c
        rows.append(_accuracy_row(n, "network", "", f, c, base))
    if not curve:
        return rows, None
    gains = {f: c.mean() - dense_acc for f, c in curve.items()}
    best = max(gains, key=lambda f: (gains[f], -abs(f - 1)))
    # honest gain: choose the factor on one half, measure it on the other half
    cv = []
    for a, b in ((0, 1), (1, 0)):
        fa = max(curve, key=lambda f: (curve[f][halves[a]].mean(), -abs(f - 1)))
        cv.append((fa, curve[fa][halves[b]].mean() - dense[halves[b]].mean()))
    rand_gain = []
    if gains[best] > 0:
        for s in range(spec.seeds):
            idx = _random_same_layer(base.live[i], members, len(members),
                                     np.random.default_rng(spec.seed * 1000 + 900 + s))
            c = scorer.correct(scorer.scores({i: (idx, float(best))}))
            rand_gain.append(c.mean() - dense_acc)
            rows.append(_accuracy_row(n, "random", s, best, c, base))
    summary = {
        "network": n["name"], "kind": n["kind"], "size": int(len(members)), "best_scale": best,
        "best_gain": rounded(gains[best], 4),
        "best_gain_half_a": rounded(curve[best][halves[0]].mean() - dense[halves[0]].mean(), 4),
        "best_gain_half_b": rounded(curve[best][halves[1]].mean() - dense[halves[1]].mean(), 4),
        "cv_scale_a_to_b": cv[0][0], "cv_gain_on_b": rounded(cv[0][1], 4),
        "cv_scale_b_to_a": cv[1][0], "cv_gain_on_a": rounded(cv[1][1], 4),
        "random_gain_mean": rounded(np.mean(rand_gain), 4) if rand_gain else "",
        "random_gain_std": _std(rand_gain),
        "random_size": len(idx) if rand_gain else "",
    }
    return rows, summary


def amplification(base: Baseline, nets: list[dict], masked: dict[str, np.ndarray], spec: AnalysisSpec,
                  progress: bool) -> dict[str, Rows]:
    """Every analyzed network scaled by each of `spec.scales` (`masked`: key_networks' factor-0 results)."""
    rows, summary = [], []
    for n in tqdm(nets, desc="amplification", unit="network", disable=not progress):
        r, s = _amplify(base, n, masked.get(n["name"]), spec)
        rows += r
        if s is not None:
            summary.append(s)
    return {"amplification": rows, "amplification_summary": summary}
