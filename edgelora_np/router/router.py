"""The router: which adapter should serve a prompt that names none.

    router = Router.from_store(store, model)               # indexes what is not yet indexed
    route = router.route("Convert 5 km to m.", resident={"sql"})
    route.adapter, route.probability, route.candidates     # "units", 0.97, (("units", 0.97), ...)

One route, for N routable adapters (shape letters: D model dim, N adapters, M shortlist):

    x  = embed(prompt)                   [D]      first n_layers blocks, mean-pooled (embed.py)
    x  = standardize(x)                  [D]      unit vector
    e  = C @ x ; e0 = c0 . x             [N], []  cosine to each centroid and to the base card's
    k  = bm25(prompt) / most possible    [N]      keywords.py
    z  = w_e e + w_k k ; z0 = w_e e0 + b [N], []  calibrate.py
    P  = softmax(z0, top M of z)         [1 + M]  the base model and the shortlist
    adapter = choice(top k of P, resident, tau, delta)                   choice.py

Routing 10,000 adapters is the product C @ x ([10000, 576] float32) plus BM25's sparse sum,
a few milliseconds beside the partial prefill (docs/router.md measures it).

Bad input never raises from `route`; it falls back to the base model and says why in
`Route.reason`: "empty" (nothing to route), "no cards" (no adapter in the store has example
prompts). A prompt longer than `max_tokens` is routed on its first max_tokens tokens (and the
keyword score reads the same head) with `Route.truncated` set, however long it is: whether it
fits the context is the engine's check.
An adapter removed from the store after the router indexed it is skipped (`Route.skipped`);
`refresh()` re-reads the store.

Thread safety: `route` only reads the router's state (replaced whole by `refresh`), runs the
model on a fresh KV cache of its own and never touches an engine's, so it may run on a worker
thread while another thread runs forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Set
from dataclasses import dataclass, fields, replace

import numpy as np

from edgelora_np.errors import EdgeLoraError
from edgelora_np.router import index as index_mod
from edgelora_np.router.calibrate import Calibration
from edgelora_np.router.choice import CHOICES
from edgelora_np.router.embed import Moments, Standardizer, embed_tokens
from edgelora_np.router.keywords import KeywordIndex, card_text

MAX_TOKEN_CHARS = 16        # characters per token at most, for all but freak tokens


@dataclass(frozen=True)
class RouterSettings:
    """How the router decides. The defaults are measured by tools/eval_router.py on the default
    model and the shipped adapters (docs/router.md); the weights are its calibration fit."""

    n_layers: int = 8          # blocks run to embed a prompt (of 30): the layer sweep's choice
    top_k: int = 2             # candidates listed, and the cache-aware rule's choice set
    delta: float = 0.1         # cache-aware: a resident candidate this close to the best wins
    tau: float = 0.3           # the best adapter below this probability (or the base model's):
                               # base model
    choice: str = "cache"      # "cache" (prefer resident, choice.py) or "best"
    shortlist: int = 8         # adapters in the softmax besides the base model (calibrate.py)
    max_tokens: int = 256      # prompt tokens read (the first ones)
    w_embed: float = 22.888    # calibration: weight of the cosine to a centroid
    w_keyword: float = 12.529  # calibration: weight of the BM25 share
    bias_base: float = 6.456   # calibration: the base model's offset (higher abstains more)

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise EdgeLoraError(f"unknown routing choice {self.choice!r}; valid: "
                                f"{', '.join(sorted(CHOICES))}")
        for name, low in (("n_layers", 1), ("top_k", 1), ("shortlist", 1), ("max_tokens", 2)):
            if int(getattr(self, name)) < low:
                raise EdgeLoraError(f"router setting {name} must be at least {low}, got "
                                    f"{getattr(self, name)}")
        if not 0.0 <= self.tau <= 1.0 or not 0.0 <= self.delta <= 1.0:
            raise EdgeLoraError(f"router settings tau and delta must be in [0, 1], got "
                                f"tau={self.tau}, delta={self.delta}")

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.w_embed, self.w_keyword, self.bias_base)

    def calibrated(self, cal: Calibration) -> RouterSettings:
        return replace(self, w_embed=cal.w_embed, w_keyword=cal.w_keyword, bias_base=cal.bias_base)


@dataclass(frozen=True)
class Route:
    """A routing decision. `adapter` None means the base model."""

    adapter: str | None
    probability: float                          # of the choice (the base model's, for None)
    candidates: tuple[tuple[str, float], ...]   # the top-k adapters and their probabilities
    reason: str               # "best", "cache" (a resident runner-up), "abstain" (base model),
                              # "empty" (no prompt), "no cards" (nothing routable)
    base_probability: float   # P(no adapter fits)
    tokens: int = 0           # prompt tokens read
    truncated: bool = False   # the prompt had more than max_tokens tokens
    skipped: tuple[str, ...] = ()   # scored, but no longer in the store
    seconds: float = 0.0      # time spent routing

    def to_json(self, prompt: str | None = None) -> dict:
        out = {} if prompt is None else {"prompt": prompt}
        out.update({"adapter": self.adapter, "probability": round(self.probability, 6),
                    "candidates": [{"adapter": a, "probability": round(p, 6)}
                                   for a, p in self.candidates],
                    "reason": self.reason, "base_probability": round(self.base_probability, 6)})
        if self.truncated:
            out["truncated"] = True
        if self.skipped:
            out["skipped"] = list(self.skipped)
        return out


@dataclass(frozen=True)
class _State:
    """What one route reads; replaced whole, never modified."""

    names: tuple[str, ...]          # [N] routable adapters
    centroids: np.ndarray           # [N, D] float32 unit vectors
    base: np.ndarray                # [D] float32 unit vector: the base card's centroid
    standardize: Standardizer
    keywords: KeywordIndex


class Router:
    def __init__(self, model, moments: dict[str, Moments], cards: dict[str, dict],
                 base: Moments | None, settings: RouterSettings = RouterSettings(), *, store=None):
        """Route over the adapters of `moments` (embedding moments of their cards' examples,
        at settings.n_layers) with `cards` for the keyword score; `base`: the base card's
        moments (None only when there is no adapter). `store`, if given, is checked for
        adapters removed since (Route.skipped) and re-read by refresh()."""
        self.model, self.settings, self.store = model, settings, store
        self._state = self._build(moments, cards, base)

    @classmethod
    def from_store(cls, store, model, settings: RouterSettings = RouterSettings(), *,
                   progress=None) -> Router:
        """A router over every adapter of `store` whose card has example prompts, embedding
        those not yet indexed for this model and n_layers (and storing them)."""
        moments, cards, base = index_mod.index_store(store, model, settings.n_layers,
                                                     settings.max_tokens, progress=progress)
        return cls(model, moments, cards, base, settings, store=store)

    def refresh(self, progress=None) -> None:
        """Re-read the store: newly imported adapters join, removed ones leave."""
        if self.store is None:
            raise EdgeLoraError("this router was not made from a store (Router.from_store)")
        moments, cards, base = index_mod.index_store(self.store, self.model, self.settings.n_layers,
                                                     self.settings.max_tokens, progress=progress)
        self._state = self._build(moments, cards, base)

    def with_settings(self, settings: RouterSettings) -> Router:
        """The same index under other settings (same n_layers): for evaluations and sweeps."""
        if settings.n_layers != self.settings.n_layers:
            raise EdgeLoraError("with_settings cannot change n_layers: the index depends on it")
        other = object.__new__(Router)
        other.model, other.settings, other.store, other._state = \
            self.model, settings, self.store, self._state
        return other

    @staticmethod
    def _build(moments: dict[str, Moments], cards: dict[str, dict], base: Moments | None) -> _State:
        names = tuple(sorted(moments))
        if not names:
            return _State((), np.zeros((0, 0), np.float32), np.zeros(0, np.float32),
                          Standardizer(np.zeros(0, np.float32), np.ones(0, np.float32)),
                          KeywordIndex([]))
        if base is None:
            raise EdgeLoraError("the router needs the base card's moments to route adapters")
        standardize = Standardizer.pooled([base, *(moments[n] for n in names)])
        centroids = standardize(np.stack([moments[n].mean for n in names]))          # [N, D]
        keywords = KeywordIndex([card_text(cards[n], index_mod.examples(cards[n], n))
                                 for n in names])
        return _State(names, np.ascontiguousarray(centroids, np.float32),
                      standardize(base.mean), standardize, keywords)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The routable adapters (those whose card has example prompts)."""
        return self._state.names

    # --- one prompt ----------------------------------------------------------------------------

    def route(self, prompt: str, resident: Set[str] = frozenset(),
              allowed: Callable[[str], bool] | None = None) -> Route:
        """Choose an adapter for `prompt` (None: the base model); prefer `resident` ones within
        the settings' top_k and delta; consider only adapters `allowed` accepts (a tenant's).
        Never raises on the prompt's content (see module doc)."""
        start = time.perf_counter()
        if not isinstance(prompt, str):
            raise EdgeLoraError(f"the router takes a prompt string, got {type(prompt).__name__}")
        state = self._state
        if not state.names:
            return Route(None, 1.0, (), "no cards", 1.0, seconds=time.perf_counter() - start)
        # Only the head of a long prompt is read: tokenizing a megabyte to keep 256 tokens of it
        # would cost more than the route.
        head = prompt[:self.settings.max_tokens * MAX_TOKEN_CHARS]
        tokens = self.model.tokenize(head) if head.strip() else []
        if not tokens:
            return Route(None, 1.0, (), "empty", 1.0, seconds=time.perf_counter() - start)
        n_read = min(len(tokens), self.settings.max_tokens)
        x = embed_tokens(self.model.llama, [np.asarray(tokens[:n_read])], self.settings.n_layers)
        e, k, e0 = self.scores(x, [head], state)
        route = self.decide(e[0], k[0], float(e0[0]), resident, state, allowed)
        truncated = len(tokens) > n_read or len(head) < len(prompt)
        return replace(route, tokens=n_read, truncated=truncated,
                       seconds=time.perf_counter() - start)

    def scores(self, embeddings: np.ndarray, prompts: list[str], state: _State | None = None):
        """Raw embeddings [n, D] and their prompts -> e [n, N] cosines to the centroids,
        k [n, N] keyword shares, e0 [n] cosines to the base card's centroid."""
        state = state or self._state
        x = state.standardize(embeddings)                                # [n, D]
        e = x @ state.centroids.T                                        # [n, N]
        e0 = x @ state.base                                              # [n]
        k = np.stack([state.keywords.scores(p) for p in prompts])        # [n, N]
        return e, k, e0

    def decide(self, e: np.ndarray, k: np.ndarray, e0: float, resident: Set[str] = frozenset(),
               state: _State | None = None,
               allowed: Callable[[str], bool] | None = None) -> Route:
        """One prompt's scores (e, k [N], e0) -> the Route (calibrate.py, choice.py)."""
        state = state or self._state
        s = self.settings
        z = s.w_embed * e + s.w_keyword * k                              # [N]
        z0 = s.w_embed * e0 + s.bias_base
        skipped: list[str] = []
        alive = np.ones(len(z), bool) if allowed is None else \
            np.fromiter((allowed(n) for n in state.names), bool, len(state.names))
        while True:                          # normally once; again if the store lost some
            pool = np.flatnonzero(alive)                                 # [<= N]
            if len(pool) == 0:
                return Route(None, 1.0, (), "no cards", 1.0, skipped=tuple(skipped))
            m = min(s.shortlist, len(pool))
            top = pool[np.argpartition(-z[pool], m - 1)[:m]]
            top = top[np.argsort(-z[top], kind="stable")]                # [M] best first
            names = [state.names[i] for i in top]
            present = set(names) if self.store is None else self.store.present(names)
            if len(present) == len(names):
                break
            for i, name in zip(top, names):
                if name not in present:
                    alive[i] = False
                    skipped.append(name)
        zs = np.concatenate([[z0], z[top]])                              # [1 + M]
        p = np.exp(zs - zs.max())
        p /= p.sum()                                                     # [1 + M]
        candidates = [(n, float(q)) for n, q in zip(names, p[1:])]
        adapter, reason = CHOICES[s.choice].choose(candidates, float(p[0]), resident, tau=s.tau,
                                                   delta=s.delta, top_k=s.top_k)
        prob = float(p[0]) if adapter is None else dict(candidates)[adapter]
        return Route(adapter, prob, tuple(candidates[:s.top_k]), reason, float(p[0]),
                     skipped=tuple(skipped))


def settings_from(**overrides) -> RouterSettings:
    """RouterSettings with some fields replaced; an unknown field name raises, listing them."""
    valid = {f.name for f in fields(RouterSettings)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise EdgeLoraError(f"unknown router setting(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(valid))}")
    return replace(RouterSettings(), **overrides)
