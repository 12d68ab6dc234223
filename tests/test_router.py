"""The router (edgelora_np/router/): its scoring against plain NumPy, its rules, its index in the
store, and routes on the shipped adapters.

Fast (no model): BM25 (bm25s) against the formula written out; the keyword share; moments,
standardization and centroids against NumPy; Router.scores and Router.decide against a plain
reference of the fused softmax with the base model and the shortlist; the choice rules (abstain,
tau, cache-aware within top-k and delta); the calibration fit (recovers known weights, zero
gradient at its optimum); the metrics; the store's router_vectors table (old stores readable,
removal); bad settings.

Slow (the real model, one store of the shipped adapters built in tmp): clear prompts go to
their adapter and general questions to the base model; the index persists and a changed card
is re-embedded; bad input (empty prompt, a prompt longer than the context, a store with no
cards, an adapter removed after indexing) falls back and says so; a route from a worker thread
beside a generation changes neither; the CLI.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgelora_np as el
from edgelora_np.errors import AdapterError, EdgeLoraError
from edgelora_np.router import Route, Router, RouterSettings, settings_from
from edgelora_np.router import calibrate as cal
from edgelora_np.router.choice import CHOICES
from edgelora_np.router.embed import Moments, Standardizer
from edgelora_np.router.keywords import KeywordIndex, bm25_reference, stem, words
from edgelora_np.router.metrics import ece, evaluate, macro_f1

ADAPTERS = Path(__file__).parent.parent / "models" / "adapters"
SHIPPED = sorted(p.parent.name for p in ADAPTERS.glob("*/card.json"))


# --- keywords ------------------------------------------------------------------------------------

CORPUS = ["convert a date to iso format date", "write a number in words", "sql query over the "
          "employees table", "reverse the order of words words", "the the the"]


def test_words_and_stems():
    assert words("Converts THE Dates, reversed!") == ["convert", "date", "revers"]
    assert stem("reverse") == stem("reversed") == stem("reverses") == "revers"
    assert stem("queries") == "query" and stem("status") == "status" and stem("process") == "process"
    assert words("12 34 a I") == []                       # digits and one-letter words drop


@pytest.mark.parametrize("query", ["iso date words", "words words sql", "the order", "zebra",
                                   "date date date number employees reverse"])
def test_bm25s_equals_the_formula(query):
    index = KeywordIndex(CORPUS)
    docs = [words(d) for d in CORPUS]
    got = index.raw_scores(words(query))
    want = bm25_reference(words(query), docs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (want >= 0).all()


def test_idf_stays_positive_for_a_word_in_most_cards():
    # "word" is in 4 of 5 documents: Robertson's idf would be negative, Lucene's is not.
    docs = [["word", "a"], ["word", "b"], ["word", "c"], ["word", "d"], ["e"]]
    score = bm25_reference(["word"], docs)
    assert (score[:4] > 0).all() and score[4] == 0
    index = KeywordIndex([" ".join(d) for d in docs])
    assert index.idf("word") == pytest.approx(np.log(1 + (5 - 4 + 0.5) / (4 + 0.5)))


def test_keyword_share_divides_by_what_the_prompt_could_score():
    index = KeywordIndex(CORPUS)
    q = words("convert this date, zebra")                 # "zebra" is in no card: df = 0
    most = sum(index.idf(w) for w in q)
    np.testing.assert_allclose(index.scores("convert this date, zebra"),
                               bm25_reference(q, [words(d) for d in CORPUS]) / most, rtol=1e-5)
    assert index.idf("zebra") == pytest.approx(np.log(1 + 5.5 / 0.5))
    assert (index.scores("12 34") == 0).all() and (index.scores("") == 0).all()
    assert KeywordIndex([]).scores("anything").shape == (0,)


# --- embeddings: moments, standardization -----------------------------------------------------------

def test_moments_standardizer_and_centroids_match_numpy():
    rng = np.random.default_rng(0)
    groups = [rng.normal(3.0, [1.0, 5.0, 0.1, 2.0], size=(n, 4)) for n in (3, 7, 5)]
    moments = [Moments.of(g) for g in groups]
    std = Standardizer.pooled(moments)
    everything = np.concatenate(groups)
    np.testing.assert_allclose(std.mu, everything.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.sigma, everything.std(0), rtol=1e-5)
    # The centroid of standardized embeddings is the standardized mean (standardizing is affine).
    z = (groups[1] - everything.mean(0)) / everything.std(0)
    want = z.mean(0) / np.linalg.norm(z.mean(0))
    np.testing.assert_allclose(std(moments[1].mean), want, rtol=1e-5)
    assert np.linalg.norm(std(everything), axis=1) == pytest.approx(1.0)
    back = Moments.from_bytes(moments[0].n, moments[0].to_bytes(), 4)
    np.testing.assert_allclose(back.sum, moments[0].sum, rtol=1e-6)
    np.testing.assert_allclose(back.sumsq, moments[0].sumsq, rtol=1e-6)


def test_constant_dimension_is_ignored_not_divided_by_zero():
    std = Standardizer.pooled([Moments.of(np.array([[1.0, 2.0], [3.0, 2.0]]))])
    assert std.sigma[1] == 1.0
    assert np.isfinite(std(np.array([5.0, 2.0]))).all()


# --- Router.scores / decide against a plain reference -----------------------------------------------

D, N = 16, 12


def toy_router(settings=None, store=None, n=N, seed=1):
    """A router over n adapters with random example embeddings and small cards; no model
    (scores and decide never run it)."""
    settings = settings or RouterSettings()
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n, D)) * 3
    moments = {f"a{i:02d}": Moments.of(centers[i] + rng.normal(size=(4, D))) for i in range(n)}
    cards = {f"a{i:02d}": {"description": f"skill {i} " + CORPUS[i % len(CORPUS)],
                           "example_prompts": [CORPUS[(i + 1) % len(CORPUS)]]} for i in range(n)}
    base = Moments.of(rng.normal(size=(10, D)))
    return Router(None, moments, cards, base, settings, store=store), moments, cards, base


def reference_route(x, prompt, moments, cards, base, s: RouterSettings):
    """The fused score and softmax of router.py, written out in plain NumPy."""
    names = sorted(moments)
    allm = [base, *(moments[n] for n in names)]
    n_all = sum(m.n for m in allm)
    mu = sum(m.sum for m in allm) / n_all
    sigma = np.sqrt(sum(m.sumsq for m in allm) / n_all - mu ** 2)

    def unit(v):
        z = (v - mu) / sigma
        return z / np.linalg.norm(z)

    xs = unit(x)
    e = np.array([xs @ unit(moments[n].mean) for n in names])
    e0 = xs @ unit(base.mean)
    docs = [words(" ".join([c["description"], "", *c["example_prompts"]])) for c in
            (cards[n] for n in names)]
    q = words(prompt)
    idf = [np.log(1 + (len(docs) - df + 0.5) / (df + 0.5)) for df in
           (sum(w in d for d in docs) for w in q)]
    k = bm25_reference(q, docs) / sum(idf)
    z = s.w_embed * e + s.w_keyword * k
    top = np.argsort(-z)[:s.shortlist]
    zz = np.concatenate([[s.w_embed * e0 + s.bias_base], z[top]])
    p = np.exp(zz - zz.max())
    p /= p.sum()
    return e, k, e0, [(names[i], p[j + 1]) for j, i in enumerate(top)], p[0]


@pytest.mark.parametrize("shortlist", [3, 8, 50])
def test_scores_and_probabilities_match_the_reference(shortlist):
    s = RouterSettings(shortlist=shortlist, top_k=3, w_embed=15.0, w_keyword=8.0, bias_base=4.0)
    router, moments, cards, base = toy_router(s)
    rng = np.random.default_rng(2)
    for prompt in ("convert the date in words", "sql employees", "nothing in common"):
        x = moments["a03"].mean + rng.normal(size=D)
        e, k, e0 = router.scores(x[None].astype(np.float32), [prompt])
        re, rk, re0, cands, p0 = reference_route(x, prompt, moments, cards, base, s)
        np.testing.assert_allclose(e[0], re, atol=2e-5)
        np.testing.assert_allclose(k[0], rk, atol=2e-5)
        assert e0[0] == pytest.approx(re0, abs=2e-5)
        route = router.decide(e[0], k[0], float(e0[0]))
        assert route.base_probability == pytest.approx(p0, abs=1e-4)
        assert len(route.candidates) == min(s.top_k, shortlist)
        for (name, p), (rname, rp) in zip(route.candidates, cands):
            assert name == rname and p == pytest.approx(rp, abs=1e-4)


def test_shortlist_renormalizes_over_its_members_only():
    base_settings = RouterSettings(top_k=2, w_embed=5.0, w_keyword=0.0, bias_base=0.0)
    router, moments, *_ = toy_router(base_settings)
    x = moments["a05"].mean[None].astype(np.float32)
    e, k, e0 = router.scores(x, ["x"])
    wide = router.with_settings(settings_from(shortlist=N, top_k=2, w_embed=5.0, w_keyword=0.0,
                                              bias_base=0.0)).decide(e[0], k[0], float(e0[0]))
    narrow = router.with_settings(settings_from(shortlist=2, top_k=2, w_embed=5.0, w_keyword=0.0,
                                                bias_base=0.0)).decide(e[0], k[0], float(e0[0]))
    assert [a for a, _ in wide.candidates] == [a for a, _ in narrow.candidates]
    assert narrow.candidates[0][1] > wide.candidates[0][1]       # fewer rivals share the mass
    total = narrow.base_probability + sum(p for _, p in narrow.candidates)
    assert total == pytest.approx(1.0)


def route_of(e, k, e0, settings, resident=frozenset()):
    router, *_ = toy_router(settings, n=len(e))
    return router.decide(np.array(e), np.array(k), e0, resident)


def test_abstains_when_the_base_model_is_most_probable_or_the_best_is_below_tau():
    s = RouterSettings(w_embed=10.0, w_keyword=0.0, bias_base=0.0, tau=0.0, top_k=2)
    sure = route_of([0.9, 0.1, 0.0], [0, 0, 0], 0.0, s)
    assert sure.adapter == "a00" and sure.reason == "best"
    general = route_of([0.1, 0.0, 0.0], [0, 0, 0], 0.9, s)
    assert general.adapter is None and general.reason == "abstain"
    assert general.probability == general.base_probability > 0.9
    # Two adapters tie: each below 0.5, both above the base model; tau decides.
    tie = [0.8, 0.8, 0.0]
    assert route_of(tie, [0, 0, 0], 0.0, s).adapter == "a00"
    strict = route_of(tie, [0, 0, 0], 0.0, settings_from(**{**s.__dict__, "tau": 0.6}))
    assert strict.adapter is None and strict.reason == "abstain"


CACHE_CASES = [
    # candidates, base, resident, tau, delta, top_k -> (adapter, reason)
    ([("a", 0.50), ("b", 0.45)], 0.05, {"b"}, 0.3, 0.1, 2, ("b", "cache")),
    ([("a", 0.50), ("b", 0.45)], 0.05, {"a", "b"}, 0.3, 0.1, 2, ("a", "best")),
    ([("a", 0.50), ("b", 0.35)], 0.15, {"b"}, 0.3, 0.1, 2, ("a", "best")),      # outside delta
    ([("a", 0.50), ("b", 0.45)], 0.05, {"b"}, 0.3, 0.1, 1, ("a", "best")),      # k = 1
    ([("a", 0.45), ("b", 0.28), ("c", 0.27)], 0.0, {"c"}, 0.2, 0.2, 2, ("a", "best")),  # c is 3rd
    ([("a", 0.45), ("b", 0.28), ("c", 0.27)], 0.0, {"c"}, 0.2, 0.2, 3, ("c", "cache")),
    ([("a", 0.55), ("b", 0.45)], 0.0, {"b"}, 0.5, 0.2, 2, ("a", "best")),       # b below tau
    ([("a", 0.40), ("b", 0.31)], 0.29, {"b"}, 0.0, 0.1, 2, ("b", "cache")),
    ([("a", 0.40), ("b", 0.28)], 0.32, {"b"}, 0.0, 0.2, 2, ("a", "best")),      # b below base
    ([("a", 0.30), ("b", 0.28)], 0.42, {"b"}, 0.0, 0.2, 2, (None, "abstain")),
    ([], 1.0, {"b"}, 0.0, 0.2, 2, (None, "abstain")),
]


@pytest.mark.parametrize("cands, base, resident, tau, delta, top_k, want", CACHE_CASES)
def test_cache_aware_choice(cands, base, resident, tau, delta, top_k, want):
    got = CHOICES["cache"].choose(cands, base, resident, tau=tau, delta=delta, top_k=top_k)
    assert got == want
    best = CHOICES["best"].choose(cands, base, resident, tau=tau, delta=delta, top_k=top_k)
    assert best == ((None, "abstain") if want[0] is None else (cands[0][0], "best"))


def test_decide_prefers_a_resident_runner_up_through_the_settings():
    s = RouterSettings(w_embed=10.0, w_keyword=0.0, bias_base=-5.0, tau=0.2, delta=0.2, top_k=2,
                       choice="cache")
    e = [0.82, 0.80, 0.0]
    assert route_of(e, [0, 0, 0], 0.0, s).adapter == "a00"
    cached = route_of(e, [0, 0, 0], 0.0, s, resident={"a01"})
    assert (cached.adapter, cached.reason) == ("a01", "cache")
    assert cached.probability == dict(cached.candidates)["a01"]
    best = route_of(e, [0, 0, 0], 0.0, settings_from(**{**s.__dict__, "choice": "best"}), {"a01"})
    assert best.adapter == "a00"


class StoreStub:
    """The one thing decide asks a store: which of these names are still there."""

    def __init__(self, gone):
        self.gone = set(gone)

    def present(self, names):
        return set(names) - self.gone


def test_an_adapter_gone_from_the_store_is_skipped():
    s = RouterSettings(w_embed=10.0, w_keyword=0.0, bias_base=0.0, shortlist=2, top_k=2)
    e = np.array([0.9, 0.1, 0.5, 0.0])
    router, *_ = toy_router(s, store=StoreStub({"a00"}), n=4)
    route = router.decide(e, np.zeros(4), 0.0)
    assert route.adapter == "a02" and route.skipped == ("a00",)
    assert "a00" not in dict(route.candidates)
    everything_gone, *_ = toy_router(s, store=StoreStub({"a00", "a01", "a02", "a03"}), n=4)
    route = everything_gone.decide(e, np.zeros(4), 0.0)
    assert route.adapter is None and route.reason == "no cards" and len(route.skipped) == 4


def test_a_router_without_cards_answers_the_base_model_without_running_the_model():
    router = Router(None, {}, {}, None)
    route = router.route("Convert 5 km to m.")
    assert (route.adapter, route.reason, route.probability) == (None, "no cards", 1.0)
    assert router.adapters == ()


def test_route_json_shape():
    route = Route("sql", 0.9, (("sql", 0.9), ("dates", 0.05)), "best", 0.05, truncated=True)
    out = route.to_json("q")
    assert out["prompt"] == "q" and out["adapter"] == "sql" and out["truncated"] is True
    assert out["candidates"] == [{"adapter": "sql", "probability": 0.9},
                                 {"adapter": "dates", "probability": 0.05}]
    assert Route(None, 1.0, (), "empty", 1.0).to_json()["adapter"] is None


def test_bad_settings_are_errors_naming_the_choices():
    with pytest.raises(EdgeLoraError, match="valid: best, cache"):
        RouterSettings(choice="fastest")
    with pytest.raises(EdgeLoraError, match="top_k"):
        RouterSettings(top_k=0)
    with pytest.raises(EdgeLoraError, match="tau"):
        RouterSettings(tau=1.5)
    with pytest.raises(EdgeLoraError, match="unknown router setting.*tempo"):
        settings_from(tempo=3)
    router, *_ = toy_router()
    with pytest.raises(EdgeLoraError, match="n_layers"):
        router.with_settings(settings_from(n_layers=3))
    with pytest.raises(EdgeLoraError, match="prompt string"):
        router.route(["not", "a", "string"])


# --- calibration -----------------------------------------------------------------------------------

def synthetic(theta, n=3000, m=5, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.uniform(-0.2, 1.0, size=(n, m))
    k = rng.uniform(0, 0.6, size=(n, m))
    e0 = rng.uniform(-0.2, 1.0, size=n)
    F = cal.features(e, k, e0)
    p = cal.probabilities(F, theta)
    y = np.array([rng.choice(m + 1, p=row) for row in p])
    return F, y


def test_features_layout():
    F = cal.features(np.array([[0.5, 0.2]]), np.array([[0.1, 0.3]]), np.array([0.7]))
    np.testing.assert_array_equal(F[0], [[0.7, 0, 1], [0.5, 0.1, 0], [0.2, 0.3, 0]])


def test_probabilities_are_a_softmax():
    F = np.random.default_rng(1).normal(size=(4, 6, 3))
    theta = np.array([2.0, -1.0, 0.5])
    z = F @ theta
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(cal.probabilities(F, theta), want, rtol=1e-12)
    mask = np.ones((4, 6), bool)
    mask[:, -1] = False
    masked = cal.probabilities(F, theta, mask)
    assert (masked[:, -1] == 0).all() and masked.sum(1) == pytest.approx(1.0)


def test_fit_recovers_known_weights_and_sits_at_zero_gradient():
    theta = np.array([8.0, 5.0, 3.0])
    F, y = synthetic(theta)
    got = cal.fit(F, y, l2=0.0).theta
    np.testing.assert_allclose(got, theta, rtol=0.15)
    # The penalized objective's gradient is zero at the fit (central differences).
    fitted = cal.fit(F, y, l2=1e-3).theta
    eps = 1e-5
    for j in range(3):
        step = np.eye(3)[j] * eps
        slope = (cal.neg_log_likelihood(F, y, fitted + step, 1e-3)
                 - cal.neg_log_likelihood(F, y, fitted - step, 1e-3)) / (2 * eps)
        assert abs(slope) < 1e-5
    assert np.abs(cal.fit(F, y, l2=1.0).theta).sum() < np.abs(fitted).sum()   # the prior shrinks


def test_fit_stays_finite_on_separable_data():
    e = np.array([[0.9, 0.1], [0.1, 0.9], [0.0, 0.1]])
    F = cal.features(e, np.zeros_like(e), np.array([0.0, 0.0, 0.9]))
    got = cal.fit(F, np.array([1, 2, 0]), l2=1e-3)
    assert np.isfinite(got.theta).all() and got.w_embed > 0


# --- metrics -------------------------------------------------------------------------------------

def test_metrics_on_a_handmade_case():
    R = lambda a, p, base, cands: Route(a, p, cands, "best", base)          # noqa: E731
    labels = ["sql", "sql", "dates", "none", "none"]
    routes = [R("sql", 0.9, 0.05, (("sql", 0.9), ("dates", 0.05))),
              R("dates", 0.6, 0.1, (("dates", 0.6), ("sql", 0.3))),        # wrong, sql 2nd
              R(None, 0.7, 0.7, (("sql", 0.2), ("units", 0.1))),           # abstained: wrong
              R(None, 0.8, 0.8, (("sql", 0.1), ("dates", 0.1))),
              R("sql", 0.5, 0.4, (("sql", 0.5), ("dates", 0.1)))]          # wrong
    m = evaluate(labels, routes)
    assert m["top1"] == pytest.approx(1 / 3) and m["top2"] == pytest.approx(2 / 3)
    assert m["none_precision"] == pytest.approx(1 / 2) and m["none_recall"] == pytest.approx(1 / 2)
    # F1: sql 2*1/(2+1+1) = 0.5, dates 0, none 2*1/(2+1+1) = 0.5
    assert m["macro_f1"] == pytest.approx(1 / 3)
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    # ECE: confidences .9 .6 .7 .8 .5 in bins 9, 6, 7, 8, 5 (one each): mean |acc - conf|.
    correct = [1, 0, 0, 1, 0]
    assert m["ece"] == pytest.approx(np.mean(np.abs(np.array(correct) - [.9, .6, .7, .8, .5])))
    assert ece([0.95, 0.95], [1, 0]) == pytest.approx(0.45)


# --- the store's router_vectors table ----------------------------------------------------------------

def test_old_store_gets_the_table_and_removal_drops_vectors(tmp_path):
    from edgelora_np.adapters.store import AdapterStore

    root = tmp_path / "old"
    (root / "data").mkdir(parents=True)
    with sqlite3.connect(root / "index.sqlite") as db:      # the schema before the router
        db.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
                   "groups TEXT NOT NULL, nbytes INTEGER NOT NULL, crc32 INTEGER NOT NULL, "
                   "card TEXT NOT NULL, source TEXT NOT NULL, source_sha256 TEXT NOT NULL, "
                   "scale REAL NOT NULL, imported REAL NOT NULL)")
        db.execute("INSERT INTO adapters VALUES ('x', 'fp', '{}', 0, 0, ?, '', '', 1.0, 0)",
                   (json.dumps({"example_prompts": ["hi"]}),))
    store = AdapterStore(root)
    assert store.names() == ["x"] and store.router_vectors("spec") == {}
    assert store.cards() == {"x": {"example_prompts": ["hi"]}}
    m = Moments.of(np.ones((2, 3)))
    store.put_router_vectors("x", "spec", "sha", m.n, 3, m.to_bytes())
    assert store.router_vectors("spec")["x"][:3] == ("sha", 2, 3)
    assert store.present(["x", "y"]) == {"x"} and store.present([]) == set()
    store.remove("x")
    assert store.router_vectors("spec") == {} and store.present(["x"]) == set()


# --- the real model -------------------------------------------------------------------------------

CLEAR = {
    "arith": "What is 418 + 275?",
    "num2words": "Spell out the number 3047 in English words.",
    "dates": "Convert 14 July 1989 to the ISO 8601 format YYYY-MM-DD.",
    "units": "How many grams are there in 3.2 kilograms?",
    "reverse": "Reverse the order of these words: lamp river stone",
    "json_extract": "Extract a JSON record for this person: Ana Lopez is 31 and lives in Lima.",
    "sql": "Write an SQL query on the employees table listing everyone in Finance.",
}
GENERAL = ["What is the capital of Italy?", "Write a short poem about winter.",
           "How do I make a good cup of tea?"]


@pytest.fixture(scope="module")
def shipped_store(tmp_path_factory, real_model):
    """The seven shipped adapters imported into a fresh store, indexed by a first router."""
    from edgelora_np.adapters.store import AdapterStore

    store = AdapterStore(tmp_path_factory.mktemp("router") / "store", create=True)
    for name in SHIPPED:
        store.import_adapter(ADAPTERS / name, real_model.config, real_model.fingerprint)
    embedded = []
    router = Router.from_store(store, real_model, progress=embedded.append)
    assert sorted(embedded) == sorted([*SHIPPED, "(base model)"])
    store.router = router
    yield store
    store.close()


@pytest.mark.slow
def test_clear_prompts_go_to_their_adapter_and_general_ones_to_the_base_model(shipped_store):
    router = shipped_store.router
    assert router.adapters == tuple(SHIPPED)
    for name, prompt in CLEAR.items():
        route = router.route(prompt)
        assert route.adapter == name, (prompt, route)
        assert route.probability > 0.5 and route.candidates[0][0] == name
        assert route.reason == "best" and 0 < route.tokens < 40 and not route.truncated
    for prompt in GENERAL:
        route = router.route(prompt)
        assert route.adapter is None and route.reason == "abstain", (prompt, route)
        assert route.probability == route.base_probability > 0.5


@pytest.mark.slow
def test_the_index_persists_and_follows_card_changes(shipped_store, real_model, tmp_path):
    embedded = []
    Router.from_store(shipped_store, real_model, progress=embedded.append)
    assert embedded == []                                          # all stored already
    src = tmp_path / "units2"
    shutil.copytree(ADAPTERS / "units", src)
    card = json.loads((src / "card.json").read_text())
    card["router_examples"] = ["Convert 3 km to m."]
    (src / "card.json").write_text(json.dumps(card))
    shipped_store.import_adapter(src, real_model.config, real_model.fingerprint)
    router = Router.from_store(shipped_store, real_model, progress=embedded.append)
    assert embedded == ["units2"] and "units2" in router.adapters
    card["router_examples"] = ["Convert 5 kg to g.", "Convert 2 L to mL."]
    (src / "card.json").write_text(json.dumps(card))
    shipped_store.import_adapter(src, real_model.config, real_model.fingerprint)
    Router.from_store(shipped_store, real_model, progress=embedded.append)
    assert embedded == ["units2", "units2"]                        # the changed card, again
    shipped_store.remove("units2")


@pytest.mark.slow
def test_bad_input_falls_back_and_says_so(shipped_store, real_model):
    router = shipped_store.router
    for empty in ("", "   \n"):
        route = router.route(empty)
        assert (route.adapter, route.reason, route.tokens) == (None, "empty", 0)
    # Longer than the model's context: routed on its first max_tokens tokens, and flagged.
    long = CLEAR["sql"] + " " + "Please be precise and careful. " * 700
    assert len(real_model.tokenize(long)) > real_model.n_ctx
    route = router.route(long)
    assert route.truncated and route.tokens == router.settings.max_tokens
    assert route.to_json()["truncated"] is True


@pytest.mark.slow
def test_adapter_removed_after_indexing_is_skipped_then_forgotten(shipped_store, real_model,
                                                                 tmp_path):
    src = tmp_path / "sql2"
    shutil.copytree(ADAPTERS / "sql", src)
    shipped_store.import_adapter(src, real_model.config, real_model.fingerprint)
    router = Router.from_store(shipped_store, real_model)
    assert "sql2" in router.adapters
    shipped_store.remove("sql2")
    route = router.route(CLEAR["sql"])
    assert route.adapter == "sql" and "sql2" not in dict(route.candidates)
    assert route.skipped == ("sql2",)                              # same card: it ranked high
    router.refresh()
    assert "sql2" not in router.adapters and router.route(CLEAR["sql"]).skipped == ()


@pytest.mark.slow
def test_store_without_cards(tmp_path, real_model):
    from edgelora_np.adapters.store import AdapterStore

    src = tmp_path / "nocard"
    shutil.copytree(ADAPTERS / "sql", src)
    (src / "card.json").unlink()
    store = AdapterStore(tmp_path / "store", create=True)
    store.import_adapter(src, real_model.config, real_model.fingerprint)
    router = Router.from_store(store, real_model)
    route = router.route(CLEAR["sql"])
    assert router.adapters == () and (route.adapter, route.reason) == (None, "no cards")
    store.close()


@pytest.mark.slow
def test_route_on_a_worker_thread_beside_a_generation(shipped_store, real_model):
    """The router runs its own partial forward on its own cache: a generation on this thread
    and routes on another give what each gives alone."""
    router = shipped_store.router
    alone_route = [router.route(p) for p in CLEAR.values()]
    gen_args = dict(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone_text = real_model.generate("Once upon a time", **gen_args).run().text
    routes = []
    worker = threading.Thread(target=lambda: routes.extend(router.route(p) for p in
                                                           list(CLEAR.values()) * 3))
    worker.start()
    text = real_model.generate("Once upon a time", **gen_args).run().text
    worker.join()
    assert text == alone_text
    for got, want in zip(routes, alone_route * 3):
        assert (got.adapter, got.candidates) == (want.adapter, want.candidates)


# --- the CLI ---------------------------------------------------------------------------------------

@pytest.fixture
def cli_model(real_model, monkeypatch):
    """The CLI's load_model returns the session's model."""
    from edgelora_np import api

    monkeypatch.setattr(api, "load_model", lambda *a, **kw: real_model)
    return real_model


def cli(*args, input=None):
    from edgelora_np.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


@pytest.mark.slow
def test_cli_route_prompt_stdin_and_eval(shipped_store, cli_model, tmp_path):
    store = shipped_store.root
    one = cli("route", CLEAR["dates"], "--store", store, "--json", "--top-k", "3")
    assert one.exit_code == 0, one.output
    out = json.loads(one.stdout)
    assert out["adapter"] == "dates" and len(out["candidates"]) == 3
    assert set(out) >= {"prompt", "adapter", "probability", "candidates"}
    text = cli("route", "--store", store, CLEAR["units"])
    assert text.exit_code == 0 and text.stdout.startswith("units ")

    lines = [CLEAR["sql"], GENERAL[0], ""]
    many = cli("route", "-", "--store", store, "--json", input="\n".join(lines) + "\n")
    assert many.exit_code == 0, many.output
    got = [json.loads(line) for line in many.stdout.splitlines()]
    assert [g["prompt"] for g in got] == lines
    assert [g["adapter"] for g in got] == ["sql", None, None] and got[2]["reason"] == "empty"

    labelled = tmp_path / "labels.jsonl"
    labelled.write_text("\n".join(json.dumps({"prompt": p, "adapter": n}) for n, p in CLEAR.items())
                        + "\n" + json.dumps({"prompt": GENERAL[1], "adapter": None}) + "\n")
    ev = cli("route", "eval", labelled, "--store", store, "--json")
    assert ev.exit_code == 0, ev.output
    m = json.loads(ev.stdout)
    assert m["n"] == 8 and m["top1"] == 1.0 and m["none_recall"] == 1.0
    table = cli("route", "eval", labelled, "--store", store)
    assert table.exit_code == 0 and "| top-1 |" in table.stdout and "8 prompts" in table.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    result = cli("route", "eval", bad, "--store", store)
    assert result.exit_code == 2 and "bad.jsonl:2" in result.stderr
    assert "Traceback" not in result.output
    assert cli("route", "x").exit_code == 2                        # no --store


@pytest.mark.slow
def test_cli_import_says_which_adapters_the_router_cannot_choose(cli_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(ADAPTERS / "reverse", bare)
    (bare / "card.json").unlink()
    store = tmp_path / "store"
    result = cli("adapters", "import", bare, "--store", store)
    assert result.exit_code == 0, result.output
    assert "bare: its card has no example prompts" in result.stderr
    result = cli("adapters", "import", bare, "--name", "bare2", "--store", store,
                 "--example", "Reverse these words: a b c", "--example", "Backwards: x y z")
    assert result.exit_code == 0, result.output
    assert "bare2" not in result.stderr
    routed = cli("route", "Reverse the order of these words: lamp river stone", "--store", store,
                 "--json")
    assert json.loads(routed.stdout)["adapter"] == "bare2"


@pytest.mark.slow
def test_engine_auto_serves_the_routed_adapter(shipped_store, real_model):
    """adapter="auto": the engine routes, the Generation says so, and its tokens are those of
    the chosen adapter named outright (or of the base model)."""
    engine = el.Engine(real_model, store=shipped_store, max_seqs=4)
    try:
        prompts = [CLEAR["dates"], CLEAR["sql"], GENERAL[0]]
        gens = [engine.submit(p, adapter="auto", chat=True, temperature=0.0, max_tokens=12)
                for p in prompts]
        assert [g.adapter for g in gens] == ["dates", "sql", None]
        assert [g.route.reason for g in gens] == ["best", "best", "abstain"]
        for prompt, gen in zip(prompts, gens):
            named = engine.submit(prompt, adapter=gen.adapter, chat=True, temperature=0.0,
                                  max_tokens=12).run()
            assert gen.run().token_ids == named.token_ids
        # Only allowed adapters are candidates (a tenant's): the dates prompt cannot get dates.
        held = engine.submit(CLEAR["dates"], adapter="auto", allowed=lambda n: n != "dates",
                             temperature=0.0, max_tokens=2)
        assert held.adapter != "dates" and all(n != "dates" for n, _ in held.route.candidates)
        held.run()
    finally:
        engine.close()


def test_auto_is_not_an_adapter_name(tmp_path):
    from edgelora_np.adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store", create=True)
    with pytest.raises(AdapterError, match="'auto' is reserved"):
        store.put("auto", None, fingerprint="x")
