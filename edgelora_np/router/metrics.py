"""How good a router's decisions are, on prompts labelled with the adapter that should serve
them ("none": the base model). Used by `edgelora route eval` and tools/eval_router.py.

    top-1            in-scope prompts routed to their adapter (abstaining counts as wrong)
    top-2 recall     in-scope prompts whose adapter is among the two most probable candidates
    none precision   of the prompts routed to the base model, the share labelled "none"
    none recall      of the prompts labelled "none", the share routed to the base model
    macro-F1         F1 of every label (each adapter and "none"), averaged
    ECE              expected calibration error (Guo et al. 2017, eq. 3) of the most probable
                     choice, the base model included: sum over 10 equal-width confidence bins
                     of |bin| / n * |accuracy(bin) - mean confidence(bin)|
"""

from __future__ import annotations

import numpy as np

NONE = "none"            # the label of prompts no adapter should serve
N_BINS = 10


def top_choice(route) -> tuple[str, float]:
    """The most probable choice of a Route and its probability ("none": the base model)."""
    if route.candidates and route.candidates[0][1] > route.base_probability:
        return route.candidates[0]
    return NONE, route.base_probability


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS):
    """Per equal-width bin of confidence: (count, mean confidence, accuracy); empty bins NaN."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    which = np.minimum((confidence * n_bins).astype(int), n_bins - 1)            # [n]
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        conf = np.bincount(which, confidence, n_bins) / count
        acc = np.bincount(which, correct, n_bins) / count
    return count, conf, acc


def ece(confidence, correct, n_bins: int = N_BINS) -> float:
    count, conf, acc = reliability(confidence, correct, n_bins)
    full = count > 0
    return float((count[full] / count.sum() * np.abs(acc[full] - conf[full])).sum())


def macro_f1(labels: list[str], predicted: list[str]) -> float:
    scores = []
    for c in sorted(set(labels)):
        tp = sum(y == c and p == c for y, p in zip(labels, predicted))
        fp = sum(y != c and p == c for y, p in zip(labels, predicted))
        fn = sum(y == c and p != c for y, p in zip(labels, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def evaluate(labels: list[str], routes: list) -> dict:
    """The table's numbers for Routes of prompts labelled `labels` (adapter names or "none")."""
    predicted = [r.adapter or NONE for r in routes]
    inside = [i for i, y in enumerate(labels) if y != NONE]
    none = [i for i, y in enumerate(labels) if y == NONE]
    to_base = [i for i, p in enumerate(predicted) if p == NONE]
    tops = [top_choice(r) for r in routes]
    return {
        "n": len(labels), "n_in_scope": len(inside), "n_none": len(none),
        "top1": np.mean([predicted[i] == labels[i] for i in inside]) if inside else float("nan"),
        "top2": (np.mean([labels[i] in [a for a, _ in routes[i].candidates[:2]] for i in inside])
                 if inside else float("nan")),
        "none_precision": (np.mean([labels[i] == NONE for i in to_base]) if to_base
                           else float("nan")),
        "none_recall": np.mean([predicted[i] == NONE for i in none]) if none else float("nan"),
        "macro_f1": macro_f1(labels, predicted),
        "ece": ece([p for _, p in tops], [a == y for (a, _), y in zip(tops, labels)]),
    }


def format_table(results: dict[str, dict], extra: tuple[str, ...] = ()) -> str:
    """A markdown table, one row per entry of `results` (name -> evaluate()'s dict)."""
    cols = [("top-1", "top1"), ("top-2 recall", "top2"), ("none P", "none_precision"),
            ("none R", "none_recall"), ("macro-F1", "macro_f1"), ("ECE", "ece"),
            *((c, c) for c in extra)]
    lines = ["| router | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, r in results.items():
        cells = []
        for _, key in cols:
            v = r.get(key)
            cells.append(v if isinstance(v, str) else "n/a" if v is None or np.isnan(v)
                         else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
