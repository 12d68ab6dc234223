"""Request limits and sampler edge cases found while fuzzing the server (issue #17), checked on
the pieces without a model: stop-string bounds, extreme temperatures, token ids."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgelora_np.errors import SamplingError
from edgelora_np.sampling import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    Sampler,
    SamplingParams,
    StopMatcher,
)

LOGITS = np.random.default_rng(0).standard_normal(300).astype(np.float32)


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-30, 1e-7])
def test_tiny_temperatures_sample_greedily(temperature):
    # Was: logits / float32(1e-300) = inf, softmax NaN, IndexError on the engine thread (which
    # fails every request of the server).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = Sampler(SamplingParams(temperature=temperature, seed=1)).sample(LOGITS)
    assert token == int(np.argmax(LOGITS))


@pytest.mark.parametrize("temperature", [1e30, 1e38, 1e308])
def test_huge_temperatures_are_near_uniform_and_finite(temperature):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = {Sampler(SamplingParams(temperature=temperature, seed=s, top_k=0, top_p=1.0,
                                         min_p=0.0)).sample(LOGITS) for s in range(20)}
    assert len(tokens) > 10


def test_stop_string_limits():
    SamplingParams(stop=tuple(f"s{i}" for i in range(MAX_STOP_STRINGS)))
    SamplingParams(stop=("x" * MAX_STOP_CHARS,))
    with pytest.raises(SamplingError, match=r"^stop holds 10000 strings"):
        SamplingParams(stop=tuple(f"s{i}" for i in range(10_000)))
    with pytest.raises(SamplingError, match=r"^stop strings may be at most"):
        SamplingParams(stop=("x" * (MAX_STOP_CHARS + 1),))
    with pytest.raises(SamplingError):
        StopMatcher(["y"] * (MAX_STOP_STRINGS + 1))


def test_lone_surrogates_are_a_tokenizer_error():
    from test_tokenizer import byte_level_fields

    from edgelora_np.errors import TokenizerError
    from edgelora_np.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_fields(byte_level_fields())
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode("ab\ud800")
    assert tok.encode("\u202e\ufeff🦙")
