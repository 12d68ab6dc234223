"""The workload: when each request arrives, which adapter it asks for, how long it is.

Everything is drawn up front from one seed (NumPy's Generator), so a run is reproducible and two
servers can be given exactly the same requests. With N = round(R·T) requests:

    arrival     gaps g_i ~ Gamma(shape 1/cv², scale cv²/R): mean 1/R, coefficient of variation cv
                (cv = 1 is a Poisson process, cv = 0 a constant rate); arrival_0 = 0,
                arrival_i = g_0 + ... + g_{i-1}
    kind        base model with probability base_fraction, "auto" (the router picks) with
                probability auto_fraction, else an adapter
    adapter     rank k in 1..n with p(k) = k^-α / H(n, α), H(n, α) = Σ_j j^-α (Zipf's law over n
                adapters; rank 1 is the first adapter of the target list). α = 0 is uniform.
    lengths     prompt ~ U{Il..Iu} tokens, output ~ U{Ol..Ou} tokens (EOS ignored)
    prompt      that many token ids drawn uniformly from a pool of ordinary tokens

Each of these has its own random stream (SeedSequence.spawn), so changing n, α or the fractions
leaves the arrival times and lengths of a seed unchanged: a sweep varies one thing at a time.

The paper's popularity (popularity="paper") is index = floor(U^(1/α)·n) with U ~ U[0, 1). Its
CDF is P(index < k) = (k/n)^α: a discretised Beta(α, 1) on the index fraction, not a power law
of the rank. At α = 1 it is exactly uniform (p = 1/n); below 1 it favours the first indices,
above 1 the last ones, and the share of the top fraction f of adapters is f^α whatever n is.
Under Zipf's law the top adapter alone takes 1/H(n, α) of the traffic (for α = 1 and n = 32,
25%; under the paper's law at α = 1, 3%), and the skew grows with α on a heavy tail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgelora_np.errors import BenchError

BASE = -1   # `target` of a base-model request (no adapter)
AUTO = -2   # `target` of a request whose adapter the server's router picks (model "auto")

POPULARITY = ("zipf", "paper")
N_STREAMS = 5   # arrival, kind, adapter, lengths, prompt ids: one random stream each


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send. Lengths are inclusive ranges of tokens."""

    rate: float                                # R: mean requests per second
    duration: float                            # T: seconds of arrivals; requests = round(R·T)
    alpha: float = 1.0                         # popularity exponent (0: uniform)
    cv: float = 1.0                            # coefficient of variation of the gaps (1: Poisson)
    prompt_tokens: tuple[int, int] = (16, 64)  # Il, Iu
    output_tokens: tuple[int, int] = (16, 64)  # Ol, Ou
    base_fraction: float = 0.0                 # share of requests for the base model alone
    auto_fraction: float = 0.0                 # share of requests with model/adapter "auto"
    popularity: str = "zipf"                   # "zipf" (p ∝ rank^-α) or "paper" (floor(U^(1/α)·n))
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "prompt_tokens", tuple(self.prompt_tokens))
        object.__setattr__(self, "output_tokens", tuple(self.output_tokens))
        if not self.rate > 0 or not self.duration > 0:
            raise BenchError(f"rate and duration must be > 0 (got {self.rate} and {self.duration})")
        if self.n_requests == 0:
            raise BenchError(f"rate {self.rate}/s for {self.duration} s rounds to no request")
        if not self.cv >= 0:
            raise BenchError(f"cv must be >= 0 (got {self.cv})")
        if not self.alpha >= 0:
            raise BenchError(f"alpha must be >= 0 (got {self.alpha})")
        if self.popularity not in POPULARITY:
            raise BenchError(f"popularity {self.popularity!r} is not one of {', '.join(POPULARITY)}")
        if self.popularity == "paper" and self.alpha == 0:
            raise BenchError("the paper's popularity floor(U^(1/alpha)·n) needs alpha > 0")
        for name in ("prompt_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise BenchError(f"{name} range {lo}:{hi} must have 1 <= low <= high")
        for name in ("base_fraction", "auto_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise BenchError(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if self.base_fraction + self.auto_fraction > 1:
            raise BenchError(f"base_fraction + auto_fraction = "
                             f"{self.base_fraction + self.auto_fraction:g} is more than 1")

    @property
    def n_requests(self) -> int:
        return round(self.rate * self.duration)

    @property
    def adapter_fraction(self) -> float:
        return 1.0 - self.base_fraction - self.auto_fraction

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """N requests as arrays (request i is row i). Prompt i is prompt_ids[starts[i]:starts[i+1]]."""

    arrival: np.ndarray      # [N] float64, seconds from the start, non-decreasing
    target: np.ndarray       # [N] int64, adapter index 0..n-1 in the target list, BASE or AUTO
    prompt_len: np.ndarray   # [N] int64
    output_len: np.ndarray   # [N] int64
    prompt_ids: np.ndarray   # [sum(prompt_len)] int64, token ids
    starts: np.ndarray       # [N+1] int64, offsets of each prompt in prompt_ids

    def __len__(self) -> int:
        return len(self.arrival)

    def prompt(self, i: int) -> list[int]:
        return self.prompt_ids[self.starts[i]:self.starts[i + 1]].tolist()


def gamma_gaps(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """n inter-arrival gaps with mean 1/rate and coefficient of variation cv.

    Gamma(k, θ) has mean kθ and variance kθ², so k = 1/cv², θ = cv²/rate gives mean 1/rate and
    CV 1/sqrt(k) = cv. cv = 1 is the exponential (Poisson arrivals); cv = 0 a constant gap.
    """
    if cv == 0:
        return np.full(n, 1.0 / rate)
    return rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=n)


def zipf_probabilities(n: int, alpha: float) -> np.ndarray:
    """[n] p(rank k) = k^-α / Σ_j j^-α for k = 1..n (index k-1)."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def paper_probabilities(n: int, alpha: float) -> np.ndarray:
    """[n] the law of floor(U^(1/α)·n), U ~ U[0, 1): p(index i) = ((i+1)/n)^α - (i/n)^α."""
    edges = (np.arange(n + 1, dtype=np.float64) / n) ** alpha
    return np.diff(edges)


def paper_indices(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    """The paper's sampler itself: floor(U^(1/α)·n) (U < 1, so the index is < n)."""
    u = rng.random(size)
    return np.minimum(np.floor(u ** (1.0 / alpha) * n), n - 1).astype(np.int64)


def make_workload(spec: WorkloadSpec, n_adapters: int, token_pool) -> Workload:
    """Draw spec.n_requests requests over n_adapters adapters, prompts from token_pool (ids)."""
    pool = np.unique(np.asarray(token_pool, dtype=np.int64))
    if pool.size == 0:
        raise BenchError("the prompt token pool is empty")
    n = spec.n_requests
    if n_adapters == 0 and spec.adapter_fraction > 0:
        raise BenchError("no adapters to draw from: give base_fraction + auto_fraction = 1 "
                         "(--base-fraction 1 to load the base model alone)")
    g_arrival, g_kind, g_adapter, g_len, g_prompt = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(N_STREAMS))

    gaps = gamma_gaps(g_arrival, n, spec.rate, spec.cv)
    arrival = np.concatenate([[0.0], np.cumsum(gaps[:-1])])                 # [N]

    u = g_kind.random(n)
    if n_adapters > 0:
        if spec.popularity == "zipf":
            adapter = g_adapter.choice(n_adapters, size=n, p=zipf_probabilities(n_adapters,
                                                                                  spec.alpha))
        else:
            adapter = paper_indices(g_adapter, n_adapters, spec.alpha, n)
    else:
        adapter = np.zeros(n, dtype=np.int64)
    target = np.where(u < spec.base_fraction, BASE,
                      np.where(u < spec.base_fraction + spec.auto_fraction, AUTO, adapter))

    (il, iu), (ol, ou) = spec.prompt_tokens, spec.output_tokens
    prompt_len = g_len.integers(il, iu, endpoint=True, size=n)
    output_len = g_len.integers(ol, ou, endpoint=True, size=n)
    starts = np.concatenate([[0], np.cumsum(prompt_len)])                  # [N+1]
    prompt_ids = g_prompt.choice(pool, size=int(starts[-1]))
    return Workload(arrival=arrival, target=target.astype(np.int64), prompt_len=prompt_len,
                    output_len=output_len, prompt_ids=prompt_ids, starts=starts)
