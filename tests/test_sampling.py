"""Sampler and StopMatcher, checked against plain NumPy written out here.

`reference_distribution` is the llama.cpp chain done the slow, obvious way (full stable sorts,
probabilities via softmax): the oracle for the partition-based implementation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelora_np.errors import SamplingError
from edgelora_np.sampling import (
    Sampler,
    SamplingParams,
    StopMatcher,
    apply_repetition_penalty,
    min_p,
    top_k,
    top_p,
)

V_REAL = 49152  # SmolLM2's vocabulary size

# Switch every filter off, so a test turns on exactly the stage it is about.
NO_FILTERS = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - np.max(x))
    return e / e.sum()


def reference_distribution(
    logits: np.ndarray, history: list[int], p: SamplingParams
) -> dict[int, float]:
    """{token id: probability} that the llama.cpp chain draws from, computed naively."""
    x = logits.astype(np.float32).copy()
    window = history[-p.repeat_last_n :] if p.repeat_last_n > 0 else []
    penalty = np.float32(p.repeat_penalty)
    for t in set(window):
        x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
    if p.temperature <= 0:
        return {int(np.argmax(x)): 1.0}
    order = np.argsort(-x, kind="stable")  # best first, ties by lowest id
    if p.top_k > 0:
        order = order[: p.top_k]
    if p.top_p < 1.0:
        cumulative = np.cumsum(softmax(x[order]))
        order = order[: int(np.argmax(cumulative >= p.top_p)) + 1]
    if p.min_p > 0.0:
        probs = softmax(x[order])
        order = order[probs >= p.min_p * probs.max()]
    final = softmax(x[order] / np.float32(p.temperature))
    return {int(t): float(q) for t, q in zip(order, final)}


def random_logits(seed: int, v: int, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(v) * scale).astype(np.float32)


def draw_counts(sampler: Sampler, logits: np.ndarray, n_draws: int) -> np.ndarray:
    counts = np.zeros(logits.size, dtype=np.int64)
    for _ in range(n_draws):
        counts[sampler.sample(logits)] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("temperature", [0.0, -1.0])
@pytest.mark.parametrize("seed", range(10))
def test_greedy_is_argmax(seed, temperature):
    logits = random_logits(seed, 1000)
    sampler = Sampler(SamplingParams(temperature=temperature))
    assert sampler.sample(logits) == int(np.argmax(logits))


def test_greedy_ties_go_to_lowest_id():
    logits = np.array([0.0, 5.0, 1.0, 5.0, 5.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == 1


@pytest.mark.parametrize("temperature", [0.1, 0.8, 1.5, 10.0])
def test_top_k_1_equals_greedy_at_any_temperature(temperature):
    logits = random_logits(3, V_REAL)
    params = SamplingParams(temperature=temperature, top_k=1, top_p=1.0, min_p=0.0, seed=0)
    sampler = Sampler(params)
    assert {sampler.sample(logits) for _ in range(200)} == {int(np.argmax(logits))}


# ----------------------------------------------------------------------------------------------
# Determinism and purity


def test_seeded_samples_are_reproducible_and_differ_across_seeds():
    logits = np.zeros(1000, dtype=np.float32)  # uniform: every draw is informative

    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed, **NO_FILTERS))
        return [sampler.sample(logits) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sample_never_writes_into_the_callers_logits():
    logits = random_logits(0, V_REAL)
    before = logits.copy()
    logits.flags.writeable = False  # any in-place write would raise
    sampler = Sampler(SamplingParams(repeat_penalty=1.3, seed=0))
    sampler.accept_many(np.argsort(-before)[:64].tolist())  # penalize the best tokens
    sampler.sample(logits)
    Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.3)).sample(logits)
    np.testing.assert_array_equal(logits, before)


# ----------------------------------------------------------------------------------------------
# The distribution, exactly and empirically


CHAIN_CASES = [
    dict(temperature=1.0, **NO_FILTERS),
    {"temperature": 0.7, "top_k": 40, "top_p": 1.0, "min_p": 0.0},
    # top-p alone over the whole vocabulary: the nucleus is thousands of tokens
    {"temperature": 1.3, "top_k": 0, "top_p": 0.9, "min_p": 0.0},
    {"temperature": 1.0, "top_k": 0, "top_p": 0.3, "min_p": 0.0},
    {"temperature": 0.5, "top_k": 0, "top_p": 1.0, "min_p": 0.05},
    {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05},  # llama.cpp defaults
    {"temperature": 0.8, "top_k": 100, "top_p": 0.5, "min_p": 0.2, "repeat_penalty": 1.5},
]


@pytest.mark.parametrize("case", CHAIN_CASES)
def test_distribution_matches_the_reference_chain(case):
    logits = random_logits(11, V_REAL)
    history = np.argsort(-logits)[:30].tolist() + [5, 5, 6]  # hits some top tokens
    params = SamplingParams(seed=0, **case)
    sampler = Sampler(params)
    sampler.accept_many(history)

    ids, probs = sampler.distribution(logits)
    expected = reference_distribution(logits, history, params)

    assert sorted(ids.tolist()) == sorted(expected)
    np.testing.assert_allclose(probs, [expected[int(t)] for t in ids], rtol=1e-5, atol=1e-12)
    assert math.isclose(probs.sum(), 1.0, rel_tol=1e-9)


FREQUENCY_CASES = {
    "top_k": {"temperature": 0.7, "top_k": 6, "top_p": 1.0, "min_p": 0.0},
    "top_p": {"temperature": 1.4, "top_k": 0, "top_p": 0.8, "min_p": 0.0},
    "min_p": {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.1},
    "all": {"temperature": 1.2, "top_k": 20, "top_p": 0.9, "min_p": 0.02, "repeat_penalty": 1.3},
}


@pytest.mark.parametrize("name", list(FREQUENCY_CASES))
def test_empirical_frequencies_match_the_renormalized_distribution(name):
    # 64 tokens with logits spread evenly over [-3, 3] in a scrambled order.
    v = 64
    logits = np.linspace(3.0, -3.0, v, dtype=np.float32)[np.random.default_rng(1).permutation(v)]
    history = [int(np.argmax(logits)), 0, 1]
    params = SamplingParams(seed=1234, **FREQUENCY_CASES[name])
    sampler = Sampler(params)
    sampler.accept_many(history)

    n_draws = 20_000
    counts = draw_counts(sampler, logits, n_draws)

    expected = reference_distribution(logits, history, params)
    kept = np.array(sorted(expected))
    assert 1 < kept.size < v, "the case should filter something and leave a choice"
    outside = np.setdiff1d(np.arange(v), kept)
    assert counts[outside].sum() == 0, "a filtered-out token was drawn"

    # Pearson's chi-square over the kept tokens; the bound is about 5 standard deviations above
    # its mean (df), far in the tail, and the seed is fixed, so this is not flaky.
    expected_counts = n_draws * np.array([expected[int(t)] for t in kept])
    assert expected_counts.min() >= 5, "chi-square needs >= 5 expected draws per token"
    chi2 = float(np.sum((counts[kept] - expected_counts) ** 2 / expected_counts))
    df = kept.size - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), f"chi2 = {chi2:.1f} with {df} degrees of freedom"


def test_masked_tokens_are_never_drawn():
    logits = np.zeros(100, dtype=np.float32)
    logits[::2] = -np.inf
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3, **NO_FILTERS))
    counts = draw_counts(sampler, logits, 2000)
    assert counts[::2].sum() == 0
    assert np.count_nonzero(counts[1::2]) == 50  # and every allowed one shows up


# ----------------------------------------------------------------------------------------------
# The stages on their own


def test_repetition_penalty_is_the_llama_cpp_formula():
    logits = np.array([2.0, -1.0, 0.0, 3.0, 0.5, -4.0], dtype=np.float32)
    history = np.array([0, 1, 2, 0, 0, 5])  # token 0 three times: penalized once
    out = apply_repetition_penalty(logits, history, 2.0)
    # positive -> divided, negative or zero -> multiplied, unseen tokens untouched
    np.testing.assert_array_equal(out, np.array([1.0, -2.0, 0.0, 3.0, 0.5, -8.0], np.float32))
    # a penalty below 1 does the opposite: it favours repeats
    out = apply_repetition_penalty(logits, history, 0.5)
    np.testing.assert_array_equal(out, np.array([4.0, -0.5, 0.0, 3.0, 0.5, -2.0], np.float32))
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.0, 3.0, 0.5, -4.0])  # input untouched


def test_repetition_penalty_only_sees_the_last_n_tokens():
    logits = np.array([2.0, 1.5, 1.0], dtype=np.float32)
    params = {"temperature": 0.0, "repeat_penalty": 2.0}

    sampler = Sampler(SamplingParams(repeat_last_n=2, **params))
    sampler.accept_many([0, 2, 2])  # token 0 has left the window
    assert sampler.recent_tokens == (2, 2)
    assert sampler.sample(logits) == 0

    sampler = Sampler(SamplingParams(repeat_last_n=3, **params))
    sampler.accept_many([0, 2, 2])  # 2.0 / 2 = 1.0 < 1.5
    assert sampler.sample(logits) == 1

    sampler = Sampler(SamplingParams(repeat_last_n=0, **params))  # 0 switches it off
    sampler.accept_many([0, 2, 2])
    assert sampler.recent_tokens == ()
    assert sampler.sample(logits) == 0


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3), min_size=1, max_size=300),  # small range: many ties
    k=st.integers(1, 320),
)
def test_top_k_keeps_the_k_best_with_ties_to_the_lowest_id(values, k):
    logits = np.array(values, dtype=np.float32)
    ids = np.arange(logits.size, dtype=np.int64)
    kept_ids, kept_logits = top_k(ids, logits, k)
    expected = np.argsort(-logits, kind="stable")[:k]
    np.testing.assert_array_equal(kept_ids, expected)
    np.testing.assert_array_equal(kept_logits, logits[expected])


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(-8, 8), min_size=1, max_size=1200),
    p=st.floats(0.01, 0.99),
)
def test_top_p_keeps_the_shortest_prefix_reaching_p(values, p):
    # Up to 1200 candidates: more than the first guess of 256, so the widening path runs too.
    logits = np.array(values, dtype=np.float32) / 2
    ids = np.arange(logits.size, dtype=np.int64)[::-1].copy()  # ids need not be positions
    kept_ids, _ = top_p(ids, logits, p)

    order = np.lexsort((ids, -logits))  # best first, ties by lowest id
    cumulative = np.cumsum(softmax(logits[order]))
    expected_len = int(np.argmax(cumulative >= p)) + 1 if cumulative[-1] >= p else logits.size
    np.testing.assert_array_equal(kept_ids, ids[order[:expected_len]])


def test_min_p_keeps_tokens_within_a_factor_of_the_best():
    probs = np.array([0.5, 0.2, 0.1, 0.04, 0.16], dtype=np.float64)
    logits = np.log(probs).astype(np.float32)
    ids = np.arange(5, dtype=np.int64)
    kept_ids, _ = min_p(ids, logits, 0.3)  # p >= 0.15 survives
    np.testing.assert_array_equal(kept_ids, [0, 1, 4])


# ----------------------------------------------------------------------------------------------
# Parameters and input checks


def test_defaults_are_llama_cpp_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.repeat_last_n, p.seed, p.stop, p.ignore_eos) == (
        1.0, 64, None, (), False
    )


def test_stop_list_is_stored_as_a_tuple_and_params_are_frozen():
    p = SamplingParams(stop=["\n\n", "User:"])
    assert p.stop == ("\n\n", "User:")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("max_tokens", 1.5, "max_tokens must be an integer, got 1.5"),
        ("temperature", float("nan"), "temperature must be finite, got nan"),
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
        ("top_k", -1, "top_k must be >= 0, got -1"),
        ("top_k", True, "top_k must be an integer, got True"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
        ("min_p", 1.1, "min_p must be in [0, 1], got 1.1"),
        ("repeat_penalty", 0.0, "repeat_penalty must be > 0 (1.0 = off), got 0.0"),
        ("repeat_penalty", float("inf"), "repeat_penalty must be finite, got inf"),
        ("repeat_last_n", -1, "repeat_last_n must be >= 0, got -1"),
        ("seed", -5, "seed must be >= 0, got -5"),
        ("seed", 1.0, "seed must be an integer, got 1.0"),
        ("stop", "\n", "stop must be a list of strings, not one string"),
        ("stop", ["ok", ""], "stop strings must be non-empty str, got ''"),
        ("stop", [7], "stop strings must be non-empty str, got 7"),
        ("ignore_eos", 1, "ignore_eos must be a bool, got 1"),
    ],
)
def test_invalid_params_raise_naming_the_parameter_and_value(field, value, fragment):
    with pytest.raises(SamplingError) as excinfo:
        SamplingParams(**{field: value})
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize(
    ("logits", "fragment"),
    [
        (np.zeros((2, 3), dtype=np.float32), "1-D"),
        (np.zeros(0, dtype=np.float32), "non-empty"),
        (np.zeros(4, dtype=np.int32), "floating-point"),
        (np.array([0.0, np.nan], dtype=np.float32), "NaN"),
        (np.array([0.0, np.inf], dtype=np.float32), "+inf"),
        (np.full(3, -np.inf, dtype=np.float32), "every logit is -inf"),
    ],
)
def test_bad_logits_raise(logits, fragment):
    with pytest.raises(SamplingError, match=fragment.replace("+", r"\+")):
        Sampler(SamplingParams(seed=0)).sample(logits)


def test_bad_token_ids_raise():
    sampler = Sampler(SamplingParams(seed=0))
    with pytest.raises(SamplingError, match="got -1"):
        sampler.accept(-1)
    with pytest.raises(SamplingError, match="got 2.0"):
        sampler.accept_many([1, 2.0])
    sampler.accept(10)
    with pytest.raises(SamplingError, match=r"token id 10 .* outside the vocabulary \(V = 5\)"):
        sampler.sample(np.zeros(5, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# StopMatcher


def feed(matcher: StopMatcher, pieces: list[str]) -> list[tuple[str, bool]]:
    return [matcher.push(piece) for piece in pieces]


def test_without_stop_strings_text_passes_straight_through():
    matcher = StopMatcher(())
    pieces = ["Hello", " <", "/s>"]
    assert feed(matcher, pieces) == [(piece, False) for piece in pieces]
    assert matcher.flush() == ""


def test_stop_string_split_across_pieces_is_never_emitted():
    matcher = StopMatcher(["</s>"])
    assert feed(matcher, ["Hello <", "/", "s> world"]) == [
        ("Hello ", False),  # "<" might start "</s>": held back
        ("", False),
        ("", True),
    ]
    assert matcher.stopped
    assert matcher.flush() == ""  # what followed the stop string is dropped
    with pytest.raises(SamplingError, match="after a stop string"):
        matcher.push("more")


def test_held_text_is_released_when_it_stops_looking_like_a_stop_string():
    matcher = StopMatcher(["</s>"])
    assert feed(matcher, ["a <", "b"]) == [("a ", False), ("<b", False)]
    assert matcher.push("</") == ("", False)
    assert matcher.flush() == "</"  # end of generation: the held text is real output


def test_overlapping_prefix_is_found():
    # "ababc": after "abab" the tail "ab" is still a possible start of "abc".
    matcher = StopMatcher(["abc"])
    assert feed(matcher, ["ab", "ab", "c"]) == [("", False), ("ab", False), ("", True)]


def test_the_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(["\n\n", "User:"])
    assert matcher.push("Sure. User: hi\n\nmore") == ("Sure. ", True)

    # "b" completes while "abx", which would start earlier, is still possible: wait and see.
    matcher = StopMatcher(["abx", "b"])
    assert feed(matcher, ["a", "b", "c"]) == [("", False), ("", False), ("a", True)]
    matcher = StopMatcher(["abx", "b"])
    assert feed(matcher, ["a", "b", "x"]) == [("", False), ("", False), ("", True)]
    matcher = StopMatcher(["abx", "b"])
    assert feed(matcher, ["a", "b"]) == [("", False), ("", False)]
    assert matcher.flush() == "a" and matcher.stopped
    # Two stop strings found in the same piece: the one that starts first wins.
    matcher = StopMatcher(["bc", "abcd"])
    assert feed(matcher, ["x", "abcd"]) == [("x", False), ("", True)]


def test_stop_matcher_rejects_bad_input():
    with pytest.raises(SamplingError, match="non-empty"):
        StopMatcher([""])
    with pytest.raises(SamplingError, match="takes a str"):
        StopMatcher(["x"]).push(b"bytes")  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet="ab<>", max_size=40),
    stops=st.lists(st.text(alphabet="ab<>", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_emitted_text_is_the_full_text_cut_at_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(starts)] if starts else text

    matcher = StopMatcher(stops)
    emitted = ""
    stopped = False
    for piece in pieces:
        out, stopped = matcher.push(piece)
        emitted += out
        assert expected.startswith(emitted), "emitted text the final answer does not contain"
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()

    assert emitted == expected
    assert matcher.stopped == bool(starts)
