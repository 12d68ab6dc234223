"""Turning one row of logits into one token id, and stopping on stop strings.

Shape letters: V vocabulary size, C number of candidate tokens still in play (C <= V).

The sampler follows llama.cpp's default chain (common/sampling.cpp, src/llama-sampling.cpp):

    logits [V]
      -> repetition penalty      tokens seen in the last `repeat_last_n` ids are made less likely
      -> top-k                   keep the k highest logits
      -> top-p (nucleus)         keep the smallest prefix whose probability mass reaches p
      -> min-p                   keep tokens with p_i >= min_p * p_max
      -> temperature             logits / T
      -> draw                    one token from softmax(logits) with the sequence's own RNG

Top-p and min-p look at the probabilities *before* temperature, as in llama.cpp; temperature only
reshapes the distribution over the survivors. Greedy decoding (temperature <= 0) is the argmax of
the penalized logits: the filters always keep the best token, so they cannot change it.
Ties are broken towards the lowest token id everywhere, so results never depend on how NumPy
happens to order equal values.

Each stage is a free function over a candidate set `(ids [C] int64, logits [C] float32)`, the
NumPy version of llama.cpp's `llama_token_data_array`; `Sampler` strings them together.
No stage writes into the caller's logits.

`StopMatcher` is the text side: it holds back generated text that could be the beginning of a
stop string, so a streaming server never sends part of one.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edgelora_np.errors import SamplingError

# Top-p first looks for the nucleus among this many best tokens and only widens the search
# (by _TOP_P_GROWTH each time) when they do not hold enough mass. With a peaked distribution over
# V = 49152 this avoids sorting the whole vocabulary.
_TOP_P_FIRST_GUESS = 256
_TOP_P_GROWTH = 4


# ----------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class SamplingParams:
    """How one request wants its tokens chosen. Defaults are llama.cpp's (common_params_sampling).

    A value that switches a stage off is noted beside each field; llama.cpp uses the same ones.
    """

    max_tokens: int = 128  # tokens to generate at most (llama.cpp's -n; it defaults to unlimited)
    temperature: float = 0.8  # logits / temperature before the draw; <= 0 means greedy (argmax)
    top_k: int = 40  # keep the k most likely tokens; 0 = off
    top_p: float = 0.95  # keep the smallest set with probability mass >= top_p; 1.0 = off
    min_p: float = 0.05  # keep tokens with p >= min_p * p_max; 0.0 = off
    repeat_penalty: float = 1.0  # repeated tokens: positive logit / it, negative * it; 1.0 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at; 0 = off
    seed: int | None = None  # RNG seed; None = fresh OS entropy (llama.cpp's LLAMA_DEFAULT_SEED)
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    ignore_eos: bool = False  # keep generating past the end-of-sequence token

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_real("temperature", self.temperature)
        _check_int("top_k", self.top_k, minimum=0)
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p!r}")
        _check_real("repeat_penalty", self.repeat_penalty)
        if not self.repeat_penalty > 0.0:
            raise SamplingError(
                f"repeat_penalty must be > 0 (1.0 = off), got {self.repeat_penalty!r}"
            )
        _check_int("repeat_last_n", self.repeat_last_n, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        # A frozen dataclass may still normalize its own fields here, once, at construction.
        object.__setattr__(self, "stop", _check_stop_strings(self.stop))


def _check_int(name: str, value: object, *, minimum: int) -> None:
    # bool is a subclass of int; `top_k=True` is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SamplingError(f"{name} must be >= {minimum}, got {value!r}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be finite, got {value!r}")


# Temperatures so small that logits / T overflows float32 (1e-300 is 0 in float32) sample as
# greedy, which they are in effect; huge ones are capped where float32 still holds them.
GREEDY_BELOW = 1e-6
MAX_TEMPERATURE = 1e30

# Bounds on stop strings: every generated token is matched against each of them on the engine
# thread, so an unbounded list (10,000 strings) would slow every other request down.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512


def _check_stop_strings(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        raise SamplingError(
            f"stop must be a list of strings, not one string; wrap it: stop=[{stop!r}]"
        )
    if not isinstance(stop, Iterable):
        raise SamplingError(f"stop must be a list of strings, got {stop!r}")
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingError(f"stop holds {len(stop)} strings, at most {MAX_STOP_STRINGS} are "
                            f"allowed (each is checked against every generated token)")
    for s in stop:
        if isinstance(s, str) and len(s) > MAX_STOP_CHARS:
            raise SamplingError(f"stop strings may be at most {MAX_STOP_CHARS} characters, got "
                                f"one of {len(s)}")
        if not isinstance(s, str) or s == "":
            raise SamplingError(f"stop strings must be non-empty str, got {s!r} in stop={stop!r}")
    return stop


# ----------------------------------------------------------------------------------------------
# The stages of the chain. Each returns new arrays.


def apply_repetition_penalty(
    logits: np.ndarray, recent_ids: np.ndarray, penalty: float
) -> np.ndarray:
    """llama.cpp's repeat penalty (llama_sampler_penalties_apply), on a copy of `logits`.

    Each *distinct* token among `recent_ids` is penalized once, however often it occurred:
    a positive logit is divided by `penalty`, a negative (or zero) one multiplied by it, so with
    penalty > 1 the token always becomes less likely.
    """
    out = np.array(logits, dtype=np.float32, copy=True)  # [V]
    if penalty == 1.0 or recent_ids.size == 0:
        return out
    seen = np.unique(recent_ids)  # [n_distinct]
    x = out[seen]
    out[seen] = np.where(x > 0, x / np.float32(penalty), x * np.float32(penalty))
    return out


def top_k(ids: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k candidates with the highest logits, best first (llama_sampler_top_k)."""
    if k <= 0:
        return ids, logits
    keep = _best(ids, logits, k)  # [min(k, C)]
    return ids[keep], logits[keep]


def top_p(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the best candidates until their probability mass reaches p (llama_sampler_top_p).

    The kept set is the shortest best-first prefix whose cumulative probability is >= p, and
    always holds at least one token. Only the best m candidates are sorted; m grows until the
    prefix is found inside them, which is exact and usually needs one small sort.
    """
    if p >= 1.0:
        return ids, logits
    probs = _softmax(logits)  # [C] float64
    n = ids.size
    m = min(n, _TOP_P_FIRST_GUESS)
    while True:
        best = _best(ids, logits, m)  # [m] positions into the candidate arrays, best first
        cumulative = np.cumsum(probs[best])  # [m]
        n_keep = int(np.searchsorted(cumulative, p, side="left")) + 1  # first i with cum[i] >= p
        if n_keep <= m:
            break
        if m == n:  # rounding left the total a hair under p: everything stays
            n_keep = m
            break
        m = min(n, m * _TOP_P_GROWTH)
    keep = best[:n_keep]
    return ids[keep], logits[keep]


def min_p(ids: np.ndarray, logits: np.ndarray, p_min: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep candidates with probability >= p_min * (the best probability) (llama_sampler_min_p).

    p_i / p_max = exp(logit_i - logit_max), so the test is done on logits and needs no softmax:
    logit_i >= logit_max + log(p_min). The best token always survives.
    """
    if p_min <= 0.0:
        return ids, logits
    threshold = float(np.max(logits)) + math.log(p_min)
    keep = logits >= threshold  # [C] bool
    return ids[keep], logits[keep]


def _best(ids: np.ndarray, logits: np.ndarray, m: int) -> np.ndarray:
    """Positions of the m highest logits, ordered by logit descending, then token id ascending.

    np.argpartition alone would pick an arbitrary subset among tokens tied at the cut-off; here the
    cut-off value is found with a partition (O(C)) and its ties are resolved by lowest id, so the
    result is fully specified. Only the m survivors are sorted.
    """
    n = logits.size
    if m >= n:
        chosen = np.arange(n)
    else:
        cutoff = np.partition(logits, n - m)[n - m]  # the m-th highest logit
        above = np.flatnonzero(logits > cutoff)
        tied = np.flatnonzero(logits == cutoff)
        tied = tied[np.argsort(ids[tied], kind="stable")][: m - above.size]
        chosen = np.concatenate([above, tied])  # [m]
    order = np.lexsort((ids[chosen], -logits[chosen]))  # primary key is the last one
    return chosen[order]


def _softmax(logits: np.ndarray) -> np.ndarray:
    """float64 probabilities; -inf logits get probability 0."""
    z = logits.astype(np.float64) - np.max(logits)  # [C], max is 0
    e = np.exp(z)
    return e / e.sum()


# ----------------------------------------------------------------------------------------------
# One sampler per sequence


class Sampler:
    """Chooses the next token of one sequence: owns its RNG and its recent-token history.

    The engine feeds every token of the sequence through `accept` / `accept_many` (the prompt as
    well as the generated tokens, as llama.cpp does), and calls `sample` once per step.
    """

    def __init__(self, params: SamplingParams):
        if not isinstance(params, SamplingParams):
            raise SamplingError(f"Sampler needs SamplingParams, got {type(params).__name__}")
        self.params = params
        self._rng = np.random.default_rng(params.seed)  # seed None -> fresh OS entropy
        self._history: deque[int] = deque(maxlen=params.repeat_last_n)  # last n accepted ids

    @property
    def recent_tokens(self) -> tuple[int, ...]:
        """The ids the repetition penalty looks at, oldest first."""
        return tuple(self._history)

    def accept(self, token_id: int) -> None:
        is_int = isinstance(token_id, numbers.Integral) and not isinstance(token_id, bool)
        if not is_int or token_id < 0:
            raise SamplingError(f"token id must be a non-negative integer, got {token_id!r}")
        self._history.append(int(token_id))

    def accept_many(self, token_ids: Iterable[int]) -> None:
        for token_id in token_ids:
            self.accept(token_id)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates `sample` draws from and their probabilities: (ids [C] int64, probs [C]).

        Greedy parameters give the single argmax with probability 1. Candidates come best first
        when top-k or top-p ran, in id order otherwise. A server can read logprobs from here.
        """
        penalized = self._penalized(logits)  # [V] float32, a copy
        if self.params.temperature <= GREEDY_BELOW:
            best = int(np.argmax(penalized))  # first maximum = lowest id among ties
            return np.array([best], dtype=np.int64), np.ones(1)
        ids = np.arange(penalized.size, dtype=np.int64)  # [V]
        ids, x = top_k(ids, penalized, self.params.top_k)
        ids, x = top_p(ids, x, self.params.top_p)
        ids, x = min_p(ids, x, self.params.min_p)
        temperature = np.float32(min(self.params.temperature, MAX_TEMPERATURE))
        x = x / temperature  # [C], temperature last (llama_sampler_temp)
        return ids, _softmax(x)

    def sample(self, logits: np.ndarray) -> int:
        """Draw the next token id from `logits` [V]. Does not `accept` it: the engine does."""
        ids, probs = self.distribution(logits)
        if ids.size == 1:
            return int(ids[0])
        # Inverse-CDF draw: one uniform number per step keeps the RNG stream easy to reason about.
        cdf = np.cumsum(probs)  # [C]
        u = self._rng.random() * cdf[-1]
        i = int(np.searchsorted(cdf, u, side="right"))  # first i with cdf[i] > u: skips p == 0
        return int(ids[min(i, _last_positive(probs))])

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise SamplingError(
                f"logits must be a non-empty 1-D array [V], got shape {logits.shape}"
            )
        if not np.issubdtype(logits.dtype, np.floating):
            raise SamplingError(f"logits must be a floating-point array, got dtype {logits.dtype}")
        # NaN < inf is False, so this one pass rejects NaN and +inf; -inf is a legitimate mask.
        if not np.all(logits < np.inf):
            raise SamplingError("logits contain NaN or +inf; the forward pass produced garbage")
        if np.max(logits) == -np.inf:
            raise SamplingError("every logit is -inf; no token can be sampled")
        recent = np.fromiter(self._history, dtype=np.int64, count=len(self._history))
        if recent.size and recent.max() >= logits.size:
            raise SamplingError(
                f"token id {int(recent.max())} in the history is outside the vocabulary "
                f"(V = {logits.size})"
            )
        return apply_repetition_penalty(logits, recent, self.params.repeat_penalty)


def _last_positive(probs: np.ndarray) -> int:
    """Index of the last nonzero probability, guarding the draw against u rounding up to 1."""
    return int(np.flatnonzero(probs > 0)[-1])


# ----------------------------------------------------------------------------------------------
# Stop strings over streamed text


class StopMatcher:
    """Cuts streamed text at the first stop string, never emitting any part of one.

    Feed it the decoded text of each new token with `push`; it returns the text that is safe to
    send now. Text whose tail could still grow into a stop string is held back until the next
    piece decides it. When a stop string completes, `push` returns the text before it and True;
    the stop string and everything after it are dropped. At the end call `flush` for the rest.

    Invariant: the emitted text never contains a position where a stop string could start,
    so the first occurrence in the full text is always found, even when split across pieces.
    """

    def __init__(self, stop: Sequence[str]):
        self._stop = _check_stop_strings(stop)
        self._held = ""  # text received but not yet emitted
        self.stopped = False  # a stop string was found; no more text is accepted
        self.matched = ""  # which stop string it was

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            raise SamplingError("StopMatcher.push() called after a stop string was matched")
        if not isinstance(piece, str):
            raise SamplingError(f"StopMatcher.push() takes a str, got {type(piece).__name__}")
        text = self._held + piece
        first = self._first_stop(text)
        # Where a stop string might still begin: the longest tail that is a proper prefix of one.
        pending = len(text) - self._longest_partial_stop(text)
        if first is not None and first <= pending:
            self._stop_at(text, first)
            self._held = ""
            return text[:first], True
        # No stop yet, or a complete one whose start an earlier, still-growing one may precede.
        self._held = text[pending:]
        return text[:pending], False

    def flush(self) -> str:
        """The text still held back, cut at a stop string it contains (empty after a stop)."""
        rest, self._held = self._held, ""
        first = self._first_stop(rest)
        if first is not None:
            self._stop_at(rest, first)
            return rest[:first]
        return rest

    def _stop_at(self, text: str, at: int) -> None:
        self.stopped = True
        self.matched = next(s for s in self._stop if text.find(s) == at)

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for length in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:length]):
                    longest = length
                    break
        return longest
