"""Evaluate the router (edgelora_np/router/) on prompts it never fitted: the tables and plots
of docs/router.md.

    tox -e router            or: python tools/eval_router.py [--quick] [--json out.json]

Data: tests/data/router_eval.jsonl (340 prompts: 40 per adapter, 60 "none"), the shipped
adapters' cards (models/adapters/*/card.json: example prompts and router examples, all from
the training templates) and the router's base card (edgelora_np/router/base_card.json).

Protocols. The centroids and BM25 documents come from the cards alone, always. What is fitted
on labelled prompts is the calibration (three weights, router/calibrate.py):
  - k-fold: repeated (--repeats) stratified --folds-fold cross-validation over router_eval:
    calibration fitted on the cards' own examples (leave-one-out: each example scored without
    itself in its centroid and its BM25 document) plus the other folds; tested on the fold.
  - templates: the same, but whole phrasing templates held out (each task's templates split
    over 3 folds), so no test prompt shares a wording with a fitted one.
  - cards only: fitted on the cards' examples alone, tested on all of router_eval.
  - hand-written: tests/data/router_handwritten.jsonl (95 prompts written for this check in
    other phrasings), routed with the shipped calibration; never used to fit or choose anything.
The shipped calibration (RouterSettings' defaults) is the fit on the cards plus all of
router_eval at the chosen n_layers; the tool prints it.

Measurements: the table (top-1, top-2 recall, none precision/recall, macro-F1, ECE, latency as a
ratio of the same prompt's full prefill), baselines (always the first adapter, keyword only,
embedding only per layer, full-depth last-token embedding), the layer sweep, routing cost at
10,000 adapters, end-to-end task accuracy with the routed vs the named adapter, and the
cache-aware rule on a Zipf trace. Plots: docs/router_layers.png, docs/router_reliability.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from router_eval_data import (  # noqa: E402
    ADAPTERS,
    NONE,
    Embeddings,
    Row,
    eval_rows,
    hand_rows,
    shipped_cards,
)

from edgelora_np.router import Router, RouterSettings  # noqa: E402
from edgelora_np.router import calibrate as cal_mod  # noqa: E402
from edgelora_np.router import index as index_mod  # noqa: E402
from edgelora_np.router.choice import CHOICES  # noqa: E402
from edgelora_np.router.embed import Moments  # noqa: E402
from edgelora_np.router.metrics import evaluate, format_table, reliability  # noqa: E402

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
SWEEP = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 25, 30)
L2 = 1e-5                 # calibration prior (calibrate.fit): the template-held-out log-loss's best
TAUS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SEED = 0


# --- routers built from cached embeddings ---------------------------------------------------

class Lab:
    """Routers over the shipped cards at any depth, from the cached embeddings."""

    def __init__(self, model, emb: Embeddings, cards: dict[str, dict], settings: RouterSettings):
        self.model, self.emb, self.cards, self.settings = model, emb, cards, settings
        self.examples = {n: index_mod.examples(c, n) for n, c in cards.items()}
        self.base_examples = index_mod.examples(index_mod.base_card(), index_mod.BASE_NAME)
        self.names = sorted(cards)
        self._card_data: dict = {}

    def vectors(self, depth, prompts: list[str]) -> np.ndarray:
        return self.emb.last(prompts) if depth == "last" else self.emb.at(depth, prompts)

    def router(self, depth, drop: str | None = None, drop_base: str | None = None) -> Router:
        """A router at `depth` (blocks, or "last"); `drop`: leave this example prompt out of its
        card (leave-one-out), `drop_base` likewise for the base card."""
        moments, cards = {}, {}
        for n in self.names:
            ex = [p for p in self.examples[n] if p != drop]
            moments[n] = Moments.of(self.vectors(depth, ex))
            cards[n] = {**self.cards[n], "example_prompts": ex, "router_examples": []}
        base = Moments.of(self.vectors(depth, [p for p in self.base_examples if p != drop_base]))
        n_layers = self.model.config.n_layers if depth == "last" else depth
        return Router(self.model, moments, cards, base, replace(self.settings, n_layers=n_layers))

    def scores(self, depth, prompts: list[str], router: Router | None = None):
        router = router or self.router(depth)
        return router, router.scores(self.vectors(depth, prompts), prompts)

    def card_data(self, depth):
        """Leave-one-out scores of every card example (labelled with its adapter) and every
        base-card example (labelled none): (e [n, N], k [n, N], e0 [n], labels)."""
        if depth in self._card_data:
            return self._card_data[depth]
        e, k, e0, labels = [], [], [], []
        for n in self.names:
            for p in self.examples[n]:
                _, (ei, ki, e0i) = self.scores(depth, [p], self.router(depth, drop=p))
                e.append(ei[0]), k.append(ki[0]), e0.append(e0i[0]), labels.append(n)
        for p in self.base_examples:
            _, (ei, ki, e0i) = self.scores(depth, [p], self.router(depth, drop_base=p))
            e.append(ei[0]), k.append(ki[0]), e0.append(e0i[0]), labels.append(NONE)
        self._card_data[depth] = np.array(e), np.array(k), np.array(e0), labels
        return self._card_data[depth]


def fit_calibration(names, e, k, e0, labels, kind: str) -> cal_mod.Calibration:
    """Fit the three weights; kind "keyword" / "embedding" fits with the other score zeroed."""
    e = np.zeros_like(e) if kind == "keyword" else e
    e0 = np.zeros_like(e0) if kind == "keyword" else e0
    k = np.zeros_like(k) if kind == "embedding" else k
    y = np.array([0 if y == NONE else 1 + names.index(y) for y in labels])
    return cal_mod.fit(cal_mod.features(e, k, e0), y, l2=L2)


def decide_all(router: Router, cal, e, k, e0, choice="best"):
    r = router.with_settings(replace(router.settings.calibrated(cal), choice=choice, top_k=3))
    return [r.decide(e[i], k[i], float(e0[i])) for i in range(len(e0))]


# --- protocols -------------------------------------------------------------------------------

def kfold_splits(rows: list[Row], folds: int, rng: random.Random, by_template: bool) -> list[int]:
    """Fold of each row: stratified by label; by_template keeps each template in one fold."""
    fold = [0] * len(rows)
    for label in sorted({r.label for r in rows}):
        mine = [i for i, r in enumerate(rows) if r.label == label]
        if by_template and label != NONE:
            templates = sorted({rows[i].template for i in mine})
            rng.shuffle(templates)
            where = {t: j % folds for j, t in enumerate(templates)}
            for i in mine:
                fold[i] = where[rows[i].template]
        else:
            rng.shuffle(mine)
            for j, i in enumerate(mine):
                fold[i] = j % folds
    return fold


def cross_validate(lab: Lab, depth, rows: list[Row], kind: str, folds: int, repeats: int,
                   by_template: bool = False):
    """Out-of-fold routes, one list per repeat, and the calibrations fitted."""
    prompts = [r.prompt for r in rows]
    router, (e, k, e0) = lab.scores(depth, prompts)
    ce, ck, ce0, cl = lab.card_data(depth)
    runs = []
    for rep in range(repeats):
        fold = kfold_splits(rows, folds, random.Random(SEED + rep), by_template)
        routes = [None] * len(rows)
        for f in range(folds):
            train = [i for i in range(len(rows)) if fold[i] != f]
            test = [i for i in range(len(rows)) if fold[i] == f]
            cal = fit_calibration(lab.names, np.concatenate([ce, e[train]]),
                                  np.concatenate([ck, k[train]]), np.concatenate([ce0, e0[train]]),
                                  cl + [rows[i].label for i in train], kind)
            for i, route in zip(test, decide_all(router, cal, e[test], k[test], e0[test])):
                routes[i] = route
        runs.append(routes)
    return runs


def log_loss(rows: list[Row], routes: list) -> float:
    """Mean -log P(right choice); a label outside the listed candidates counts as P = 1e-6."""
    p = [r.base_probability if row.label == NONE else dict(r.candidates).get(row.label, 0.0)
         for row, r in zip(rows, routes)]
    return float(-np.log(np.maximum(p, 1e-6)).mean())


def summarize(rows: list[Row], runs: list[list]) -> dict:
    """Mean (and spread over repeats) of evaluate() over the repeats' out-of-fold routes."""
    labels = [r.label for r in rows]
    each = [evaluate(labels, routes) for routes in runs]
    out = {key: float(np.mean([m[key] for m in each])) for key in each[0]}
    out.update({key + "_sd": float(np.std([m[key] for m in each])) for key in ("top1", "macro_f1")})
    out["log_loss"] = float(np.mean([log_loss(rows, routes) for routes in runs]))
    return out


# --- latency -----------------------------------------------------------------------------------
# This VM has 2 cores shared with other work (another engineer's test runs), and OpenMP threads
# of two busy processes slow each other down by large factors. So every time is the best of
# REPEATS runs, and a route is always timed right beside the prefill it is compared with.

REPEATS = 5


def best_seconds(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(min(times))


def prefill(model, ids) -> None:
    """One full prefill of `ids` from a fresh cache (logits of the last position only)."""
    from edgelora_np.model.batch import Batch

    model.llama.forward(Batch.single(ids), model.llama.new_cache(len(ids)))


def paired(model, router: Router, prompt: str, chat: bool = False) -> tuple[float, float]:
    """(route seconds, prefill seconds) of one prompt, interleaved, best of REPEATS each."""
    ids = model.prompt_ids(prompt, chat=chat)
    routes, prefills = [], []
    for _ in range(REPEATS):
        routes.append(best_seconds(lambda: router.route(prompt), 1))
        prefills.append(best_seconds(lambda: prefill(model, ids), 1))
    return min(routes), min(prefills)


def latency(model, router: Router, prompts: list[str]) -> dict:
    """Route time over the same prompt's prefill (raw text, and as the chat prompt the engine
    prefills), per prompt: p50 and p95 of the ratios, and of the route's milliseconds."""
    ratio, ratio_chat, ms = [], [], []
    for p in prompts:
        t_route, t_prefill = paired(model, router, p)
        t_route_chat, t_prefill_chat = paired(model, router, p, chat=True)
        ratio.append(t_route / t_prefill)
        ratio_chat.append(t_route_chat / t_prefill_chat)
        ms.append(1e3 * t_route)
    pct = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    return {"ratio_p50": pct(ratio, 50), "ratio_p95": pct(ratio, 95),
            "ratio_chat_p50": pct(ratio_chat, 50), "ratio_chat_p95": pct(ratio_chat, 95),
            "ms_p50": pct(ms, 50), "ms_p95": pct(ms, 95), "n": len(prompts),
            "load_average": os.getloadavg()}


def depth_cost(model, lab: Lab, depth, prompts: list[str]) -> float:
    """p50 over prompts of (embedding at this depth + scoring) / full prefill."""
    router = lab.router(depth)
    ratios = [a / b for a, b in (paired(model, router, p) for p in prompts)]
    return float(np.median(ratios))


def scale(model, lab: Lab, depth: int, prompts: list[str], n_adapters: int) -> dict:
    """Routing cost beyond the partial prefill with n_adapters: the shipped cards plus synthetic
    ones (random centroids, random cards from the shipped cards' words), scores + decide."""
    rng = np.random.default_rng(SEED)
    real = lab.router(depth)
    dim = model.config.dim
    vocab = sorted({w for n, c in lab.cards.items()
                    for w in " ".join([c["description"], *lab.examples[n]]).split()})
    moments, cards = {}, {}
    for n in lab.names:
        ex = lab.examples[n]
        moments[n], cards[n] = Moments.of(lab.vectors(depth, ex)), lab.cards[n]
    base_vecs = lab.vectors(depth, lab.base_examples)
    spread = base_vecs.std(axis=0)
    for i in range(n_adapters - len(lab.names)):
        fake = base_vecs.mean(axis=0) + spread * rng.standard_normal((3, dim)).astype(np.float32)
        moments[f"synthetic-{i:05d}"] = Moments.of(fake)
        words = rng.choice(vocab, size=24)
        cards[f"synthetic-{i:05d}"] = {"description": " ".join(words[:12]), "keywords": [],
                                       "example_prompts": [" ".join(words[12:])]}
    t0 = time.perf_counter()
    big = Router(model, moments, cards, Moments.of(base_vecs), real.settings)
    build = time.perf_counter() - t0
    x = lab.vectors(depth, prompts)
    times, matvec = [], []
    right = 0
    for i, p in enumerate(prompts):
        def score_and_decide(i=i, p=p):
            e, k, e0 = big.scores(x[i:i + 1], [p])
            return big.decide(e[0], k[0], float(e0[0]))
        times.append(best_seconds(score_and_decide, 3))
        matvec.append(best_seconds(lambda i=i: big._state.centroids @ big._state.standardize(x[i]), 3))
        alone = real.decide(*[a[0] for a in real.scores(x[i:i + 1], [p])]).adapter
        right += score_and_decide().adapter == alone
    return {"adapters": n_adapters, "ms_p50": 1e3 * float(np.median(times)),
            "ms_p95": 1e3 * float(np.percentile(times, 95)),
            "matvec_ms_p50": 1e3 * float(np.median(matvec)), "build_s": build,
            "same_choice_as_7": right / len(prompts)}


# --- end to end ------------------------------------------------------------------------------

def end_to_end(model, rows: list[Row], routes: list, n_heldout: int) -> dict:
    """Task accuracy with the routed adapter vs the named one (tools/eval_adapters.py's
    engine and checkers): router_eval's in-scope prompts routed out of fold, and the first
    n_heldout held-out training-template prompts per task routed by the shipped router."""
    from adapter_tasks import TASKS, Example
    from eval_adapters import MAX_BATCH_TOKENS, MAX_SEQS, answer_all

    import edgelora_np as el

    engine = el.Engine(model, max_batch_tokens=MAX_BATCH_TOKENS, max_seqs=MAX_SEQS,
                       max_adapters=16)
    for name in TASKS:
        engine.add_adapter(name, ADAPTERS / name)
    items = [(Example(r.label, r.prompt, r.answer), route.adapter)
             for r, route in zip(rows, routes) if r.label != NONE]
    named = answer_all(engine, [(e, e.task) for e, _ in items])
    differ = [i for i, (e, auto) in enumerate(items) if auto != e.task]
    auto = list(named)
    for i, reply in zip(differ, answer_all(engine, [(items[i][0], items[i][1]) for i in differ])):
        auto[i] = reply
    out = {}
    for name in TASKS:
        mine = [i for i, (e, _) in enumerate(items) if e.task == name]
        out[name] = {
            "n": len(mine),
            "named": float(np.mean([TASKS[name].check(named[i], items[i][0].answer) for i in mine])),
            "auto": float(np.mean([TASKS[name].check(auto[i], items[i][0].answer) for i in mine])),
            "misrouted": sum(items[i][1] != name for i in mine)}
    return out


def end_to_end_heldout(model, router: Router, n: int) -> dict:
    from adapter_tasks import TASKS, examples
    from eval_adapters import MAX_BATCH_TOKENS, MAX_SEQS, answer_all

    import edgelora_np as el

    engine = el.Engine(model, max_batch_tokens=MAX_BATCH_TOKENS, max_seqs=MAX_SEQS, max_adapters=16)
    for name in TASKS:
        engine.add_adapter(name, ADAPTERS / name)
    items = [e for name in TASKS for e in examples(TASKS[name], "heldout", n, 0)]
    chosen = [router.route(e.prompt).adapter for e in items]
    named = answer_all(engine, [(e, e.task) for e in items])
    differ = [i for i, (e, c) in enumerate(zip(items, chosen)) if c != e.task]
    auto = list(named)
    for i, reply in zip(differ, answer_all(engine, [(items[i], chosen[i]) for i in differ])):
        auto[i] = reply
    out = {}
    for name in TASKS:
        mine = [i for i, e in enumerate(items) if e.task == name]
        out[name] = {"n": len(mine),
                     "named": float(np.mean([TASKS[name].check(named[i], items[i].answer) for i in mine])),
                     "auto": float(np.mean([TASKS[name].check(auto[i], items[i].answer) for i in mine])),
                     "misrouted": sum(chosen[i] != name for i in mine)}
    return out


# --- the cache-aware rule on a Zipf trace ----------------------------------------------------

def zipf_trace(rows: list[Row], routes: list, settings: RouterSettings, *, pool_size: int,
               length: int = 4000, s: float = 1.0, deltas=(0.1,), ks=(1, 2, 3)) -> list[dict]:
    """Requests drawn by Zipf popularity over the adapters (and "none" prompts at their share
    of router_eval), each a random router_eval prompt of that label routed with its out-of-fold
    probabilities; an LRU pool of pool_size adapters. Accuracy and pool hit rate per (k, delta)."""
    rng = random.Random(SEED)
    labels = sorted({r.label for r in rows if r.label != NONE})
    rng.shuffle(labels)                                       # popularity order, seeded
    weights = np.array([1 / (i + 1) ** s for i in range(len(labels))])
    p_none = sum(r.label == NONE for r in rows) / len(rows)
    by_label = {y: [i for i, r in enumerate(rows) if r.label == y] for y in labels + [NONE]}
    trace = []
    for _ in range(length):
        y = NONE if rng.random() < p_none else rng.choices(labels, weights)[0]
        trace.append(rng.choice(by_label[y]))
    out = []
    for k in ks:
        for delta in (deltas if k > 1 else deltas[:1]):
            policy = CHOICES["best" if k == 1 else "cache"]
            lru: list[str] = []
            hits = loads = right = changed = 0
            for i in trace:
                r = routes[i]
                chosen, why = policy.choose(list(r.candidates), r.base_probability, set(lru),
                                            tau=settings.tau, delta=delta, top_k=k)
                changed += why == "cache"
                right += (chosen or NONE) == rows[i].label
                if chosen is not None:
                    loads += 1
                    if chosen in lru:
                        hits += 1
                        lru.remove(chosen)
                    elif len(lru) == pool_size:
                        lru.pop(0)
                    lru.append(chosen)
            out.append({"k": k, "delta": delta if k > 1 else None, "pool": pool_size,
                        "accuracy": right / len(trace), "hit_rate": hits / max(loads, 1),
                        "changed": changed / len(trace)})
    return out


# --- plots -----------------------------------------------------------------------------------

def plot_layers(sweep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = sorted(sweep["fused"])
    for key, style, label in (("fused", "o-", "embedding + keywords: macro-F1"),
                              ("embedding", "s--", "embedding only: macro-F1")):
        ax.plot(layers, [sweep[key][d]["macro_f1"] for d in layers], style, label=label)
    ax.plot(layers, [sweep["fused"][d]["top1"] for d in layers], "^:", label="embedding + keywords: top-1")
    ax.set_xlabel("blocks run for the prompt embedding (of 30)")
    ax.set_ylabel("k-fold score")
    ax.set_ylim(0.5, 1.0)
    ax.grid(alpha=0.3)
    if sweep.get("cost"):
        ax2 = ax.twinx()
        cost_layers = sorted(sweep["cost"])
        ax2.plot(cost_layers, [sweep["cost"][d] for d in cost_layers], "k.-", alpha=0.5,
                 label="router cost / full prefill (p50)")
        ax2.set_ylabel("router cost / full prefill")
        ax2.set_ylim(0, 1.2)
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower center", fontsize=8)
    ax.set_title("Router layer sweep (router_eval, 5-fold x 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_reliability(routes: list, labels: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgelora_np.router.metrics import ece, top_choice

    tops = [top_choice(r) for r in routes]
    conf = np.array([p for _, p in tops])
    correct = np.array([a == y for (a, _), y in zip(tops, labels)])
    count, mean_conf, acc = reliability(conf, correct)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    edges = np.linspace(0, 1, len(count) + 1)
    full = count > 0
    ax.bar(edges[:-1][full], acc[full], width=0.1, align="edge", edgecolor="k", alpha=0.7,
           label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for x, c, n in zip(edges[:-1][full], acc[full], count[full]):
        ax.text(x + 0.05, min(c + 0.02, 0.97), str(n), ha="center", fontsize=7)
    ax.set_xlabel("confidence of the most probable choice")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (k-fold, ECE {ece(conf, correct):.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    import edgelora_np as el

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=RouterSettings().n_layers,
                    help="n_layers of the main router [default: RouterSettings']")
    ap.add_argument("--latency", type=int, default=100, help="prompts timed for the main router")
    ap.add_argument("--sweep-latency", type=int, default=20, help="prompts timed per sweep depth")
    ap.add_argument("--scale", type=int, default=10_000, help="adapters in the routing-cost test")
    ap.add_argument("--e2e-heldout", type=int, default=30,
                    help="held-out training-template prompts per task in the end-to-end run")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end generation")
    ap.add_argument("--quick", action="store_true", help="1 repeat, no latency sweep, no e2e")
    ap.add_argument("--cache", type=Path, default=None, help="cache the embeddings here (.npz)")
    ap.add_argument("--plots", type=Path, default=DOCS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.sweep_latency, args.no_e2e, args.latency = 1, 0, True, 40

    model = el.load_model(progress=False)
    rows, hand = eval_rows(), hand_rows()
    cards = shipped_cards()
    settings = replace(RouterSettings(), n_layers=args.layers)
    everything = ([r.prompt for r in rows + hand] + [p for c in cards.values() for p in index_mod.examples(c)]
                  + index_mod.examples(index_mod.base_card()))
    key = Embeddings.key(model, everything, settings.max_tokens)
    emb = Embeddings.load(args.cache, key) if args.cache else None
    if emb is None:
        t0 = time.perf_counter()
        emb = Embeddings.compute(model, everything, settings.max_tokens)
        print(f"embedded {len(emb.prompts)} prompts at every layer in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        if args.cache:
            emb.save(args.cache, key)
    lab = Lab(model, emb, cards, settings)
    labels = [r.label for r in rows]
    results: dict = {"settings": settings.__dict__}
    F, R = args.folds, args.repeats

    # The layer sweep: fused and embedding-only, k-fold.
    sweep: dict = {"fused": {}, "embedding": {}, "cost": {}}
    for depth in SWEEP:
        for kind in ("fused", "embedding"):
            sweep[kind][depth] = summarize(rows, cross_validate(lab, depth, rows, kind, F, R))
        print(f"layers {depth:2d}: fused top-1 {sweep['fused'][depth]['top1']:.3f} "
              f"F1 {sweep['fused'][depth]['macro_f1']:.3f}; embedding top-1 "
              f"{sweep['embedding'][depth]['top1']:.3f} F1 {sweep['embedding'][depth]['macro_f1']:.3f}",
              file=sys.stderr)
    timed = [r.prompt for r in random.Random(SEED).sample(rows, min(args.sweep_latency, len(rows)))]
    if timed:
        for depth in SWEEP:
            sweep["cost"][depth] = depth_cost(model, lab, depth, timed)
    results["sweep"] = sweep
    save(args.json, results)
    args.plots.mkdir(parents=True, exist_ok=True)
    plot_layers(sweep, args.plots / "router_layers.png")

    # The main table: the router at settings.n_layers and the baselines, k-fold.
    depth = settings.n_layers
    main_runs = cross_validate(lab, depth, rows, "fused", F, R)
    table = {f"router ({depth} blocks, k-fold)": summarize(rows, main_runs)}
    table[f"router ({depth} blocks, templates held out)"] = summarize(
        rows, cross_validate(lab, depth, rows, "fused", 3, R, by_template=True))
    router, (e, k, e0) = lab.scores(depth, [r.prompt for r in rows])
    ce, ck, ce0, cl = lab.card_data(depth)
    cards_cal = fit_calibration(lab.names, ce, ck, ce0, cl, "fused")
    table[f"router ({depth} blocks, cards only)"] = evaluate(labels, decide_all(router, cards_cal, e, k, e0))
    first = lab.names[0]
    table[f"always {first} (published EdgeLoRA)"] = evaluate(
        labels, [replace(r, adapter=first, candidates=((first, 1.0),), base_probability=0.0)
                 for r in main_runs[0]])
    table["keyword only (BM25)"] = summarize(rows, cross_validate(lab, depth, rows, "keyword", F, R))
    for d in SWEEP:
        table[f"embedding only, {d} blocks"] = sweep["embedding"][d]
    table["embedding only, last token, 30 blocks"] = summarize(
        rows, cross_validate(lab, "last", rows, "embedding", F, R))
    results["table"] = table

    # The shipped calibration: cards + all of router_eval. And the hand-written check.
    shipped_cal = fit_calibration(lab.names, np.concatenate([ce, e]), np.concatenate([ck, k]),
                                  np.concatenate([ce0, e0]), cl + labels, "fused")
    results["shipped_calibration"] = shipped_cal.__dict__
    he, hk, he0 = router.scores(lab.vectors(depth, [r.prompt for r in hand]), [r.prompt for r in hand])
    hand_routes = decide_all(router, shipped_cal, he, hk, he0)
    hand_labels = [r.label for r in hand]
    results["hand"] = {"shipped calibration": evaluate(hand_labels, hand_routes),
                       "cards-only calibration": evaluate(hand_labels,
                                                          decide_all(router, cards_cal, he, hk, he0))}
    results["hand_errors"] = [{"prompt": r.prompt, "label": r.label, "routed": rt.adapter,
                               "candidates": rt.candidates, "base": rt.base_probability}
                              for r, rt in zip(hand, hand_routes) if (rt.adapter or NONE) != r.label]
    plot_reliability([r for run in main_runs for r in run], labels * len(main_runs),
                     args.plots / "router_reliability.png")

    # The calibration prior: out-of-fold log-loss with whole templates held out.
    global L2
    chosen_l2, results["l2"] = L2, {}
    for l2 in (1e-6, 1e-5, 1e-4, 1e-3):
        L2 = l2
        results["l2"][l2] = summarize(rows, cross_validate(lab, depth, rows, "fused", 3, R, by_template=True))
    L2 = chosen_l2

    # tau sweep (k-fold routes re-decided: the probabilities do not depend on tau).
    results["tau"] = {}
    for tau in TAUS:
        redecided = [[replace(r, adapter=CHOICES["best"].choose(list(r.candidates), r.base_probability,
                                                                 set(), tau=tau, delta=0, top_k=1)[0])
                      for r in run] for run in main_runs]
        results["tau"][tau] = summarize(rows, redecided)

    save(args.json, results)

    # Latency of the real thing: a router from a store, routing prompts one by one.
    shipped = settings.calibrated(shipped_cal)
    with tempfile.TemporaryDirectory() as tmp:
        from edgelora_np.adapters.store import AdapterStore

        store = AdapterStore(Path(tmp) / "store", create=True)
        for name in lab.names:
            store.import_adapter(ADAPTERS / name, model.config, model.fingerprint)
        real = Router.from_store(store, model, shipped)
        timed = [r.prompt for r in random.Random(SEED + 1).sample(rows, min(args.latency, len(rows)))]
        results["latency"] = latency(model, real, timed)
        store.close()
    save(args.json, results)
    for name in table:
        if name.startswith(f"router ({depth} blocks"):
            lat = results["latency"]
            table[name]["cost"] = f"{lat['ratio_p50']:.3f} / {lat['ratio_p95']:.3f}"
    for d in SWEEP:
        if d in sweep["cost"]:
            table[f"embedding only, {d} blocks"]["cost"] = f"{sweep['cost'][d]:.3f} (p50)"
    if 30 in sweep["cost"]:
        table["embedding only, last token, 30 blocks"]["cost"] = f"{sweep['cost'][30]:.3f} (p50)"
    table["keyword only (BM25)"]["cost"] = "no forward"
    table[f"always {first} (published EdgeLoRA)"]["cost"] = "1 (a full prefill, by design)"
    results["scale"] = scale(model, lab, depth, [r.prompt for r in rows[:100]], args.scale)

    # The cache-aware rule (out-of-fold probabilities of the first repeat).
    results["cache"] = [row for pool in (2, 3) for row in
                        zipf_trace(rows, main_runs[0], settings, pool_size=pool,
                                   deltas=(settings.delta, 0.05, 0.2, 0.3, 0.5))]

    save(args.json, results)

    if not args.no_e2e:
        results["e2e_router_eval"] = end_to_end(model, rows, main_runs[0], 0)
        save(args.json, results)
        best = lab.router(depth).with_settings(replace(shipped, choice="best"))
        results["e2e_heldout"] = end_to_end_heldout(model, best, args.e2e_heldout)

    report(results)
    save(args.json, results)


def save(path: Path | None, results: dict) -> None:
    """Write what is measured so far (a long run that fails late keeps its numbers)."""
    if path is not None:
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def report(results: dict) -> None:
    print("## Routing accuracy (router_eval.jsonl, 340 prompts)\n")
    print(format_table(results["table"], extra=("cost",)))
    print("\n(cost: router time / the same prompt's full prefill, p50 / p95)")
    lat = results["latency"]
    print(f"\nlatency over {lat['n']} prompts: route {lat['ms_p50']:.1f} / {lat['ms_p95']:.1f} ms "
          f"(p50 / p95); ratio to the raw prompt's prefill {lat['ratio_p50']:.3f} / "
          f"{lat['ratio_p95']:.3f}; to the chat prompt's prefill {lat['ratio_chat_p50']:.3f} / "
          f"{lat['ratio_chat_p95']:.3f}")
    sc = results["scale"]
    print(f"\nrouting {sc['adapters']} adapters beyond the partial prefill: {sc['ms_p50']:.2f} / "
          f"{sc['ms_p95']:.2f} ms (p50 / p95); the matrix-vector product alone "
          f"{sc['matvec_ms_p50']:.2f} ms; same choice as with the 7 real adapters alone: "
          f"{sc['same_choice_as_7']:.0%}")
    print("\n## Hand-written prompts (95, other phrasings; never fitted on)\n")
    print(format_table(results["hand"]))
    for err in results["hand_errors"]:
        print(f"  - {err['label']} -> {err['routed']}: {err['prompt']!r}")
    print("\n## Layer sweep (k-fold)\n")
    print("| blocks | fused top-1 | fused macro-F1 | embedding top-1 | embedding macro-F1 | cost p50 |")
    print("|---:|---:|---:|---:|---:|---:|")
    sw = results["sweep"]
    for d in sorted(sw["fused"]):
        cost = sw["cost"].get(d)
        print(f"| {d} | {sw['fused'][d]['top1']:.3f} | {sw['fused'][d]['macro_f1']:.3f} | "
              f"{sw['embedding'][d]['top1']:.3f} | {sw['embedding'][d]['macro_f1']:.3f} | "
              f"{'n/a' if cost is None else f'{cost:.3f}'} |")
    print("\n## Calibration prior l2 (templates held out)\n")
    print(format_table({f"l2 = {l2:g}": m for l2, m in results["l2"].items()}, extra=("log_loss",)))
    print("\n## tau (k-fold)\n")
    print(format_table({f"tau = {t}": m for t, m in results["tau"].items()}))
    print("\n## Cache-aware choice on a Zipf trace (LRU pool)\n")
    print("| pool | k | delta | accuracy | hit rate | requests the rule sent to a runner-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in results["cache"]:
        print(f"| {row['pool']} | {row['k']} | {row['delta'] if row['delta'] is not None else '-'} | "
              f"{row['accuracy']:.4f} | {row['hit_rate']:.4f} | {row['changed']:.4f} |")
    for key, title in (("e2e_router_eval", "router_eval in-scope prompts, routed out of fold"),
                       ("e2e_heldout", "held-out training-template prompts, shipped router")):
        if key in results:
            e2e = results[key]
            print(f"\n## End to end: {title}\n")
            print("| task | named adapter | routed (auto) | misrouted | n |")
            print("|---|---:|---:|---:|---:|")
            for name, r in e2e.items():
                print(f"| {name} | {r['named']:.0%} | {r['auto']:.0%} | {r['misrouted']} | {r['n']} |")
            named = np.mean([r["named"] for r in e2e.values()])
            auto = np.mean([r["auto"] for r in e2e.values()])
            print(f"| all (mean) | {named:.1%} | {auto:.1%} | | auto / named = {auto / named:.3f} |")
    cal = results["shipped_calibration"]
    print(f"\nshipped calibration (cards + all of router_eval): w_embed={cal['w_embed']:.3f}, "
          f"w_keyword={cal['w_keyword']:.3f}, bias_base={cal['bias_base']:.3f}")


if __name__ == "__main__":
    main()
