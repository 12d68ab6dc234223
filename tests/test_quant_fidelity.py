"""Every file type against llama.cpp, on files llama.cpp quantized itself (tests/llama_quantized.py)
and llama.cpp's logits on them (tools/make_quant_golden.py, tests/data/golden_quants.npz).

The bounds are those of the base-model fidelity tests (tests/test_fidelity.py explains them):
top-1 agrees wherever llama.cpp's choice is clear (lead >= 0.5 logit) and at >= 95% of all
positions; mean |logit difference| <= 0.3, max <= 2.0.
"""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from llama_quantized import (
    DEFAULT_MODEL_FTYPES,
    RANDOM_MODEL_FTYPES,
    default_model_file,
    random_model_file,
    sha256,
)

import edgelora_np as el
from edgelora_np.gguf.reader import open_gguf

pytestmark = pytest.mark.slow

GOLDEN = np.load(Path(__file__).parent / "data" / "golden_quants.npz")
META = json.loads(str(GOLDEN["meta_json"]))
CLEAR_MARGIN = 0.5
CASES = [f"default/{f}" for f in DEFAULT_MODEL_FTYPES] + \
        [f"random/{t.name}" for t in RANDOM_MODEL_FTYPES]


def test_every_case_has_a_golden():
    assert sorted(META["files"]) == sorted(CASES)


@pytest.fixture(scope="module", params=CASES)
def compared(request):
    """(case, {prompt: (ours at the sample ids, our top-1, ours at llama.cpp's top ids)})."""
    kind, name = request.param.split("/")
    path = default_model_file(name) if kind == "default" else random_model_file(QT[name])
    recorded = META["files"][request.param]
    assert sha256(path) == recorded["sha256"], (
        f"{path}: llama-quantize wrote other bytes than the file the goldens were recorded on; "
        f"re-record them with `tox -e oracle`")
    model = el.load_model(path, n_ctx=512, progress=False)
    prompts = META["default_prompts"] if kind == "default" else ["tokens"]
    sample = GOLDEN[f"{kind}/sample_ids"]
    out = {}
    for prompt in prompts:
        tokens = GOLDEN[f"default/{prompt}/tokens" if kind == "default" else "random/tokens"]
        logits = model.logits(tokens.tolist())                                  # [n, V]
        top_ids = GOLDEN[f"{request.param}/{prompt}/top_ids"]
        out[prompt] = (logits[:, sample], logits.argmax(-1),
                       np.take_along_axis(logits, top_ids, axis=1))
    return request.param, path, out


def test_tensor_types_are_what_llama_cpp_wrote(compared):
    case, path, _ = compared
    ours = collections.Counter(t.qtype.name for t in open_gguf(path).tensors.values())
    assert dict(ours) == META["files"][case]["tensor_types"]


def test_top1_agrees_wherever_llama_cpp_is_clear(compared):
    case, _, out = compared
    for prompt, (_, ours_top1, _) in out.items():
        top_logits = GOLDEN[f"{case}/{prompt}/top_logits"]
        clear = top_logits[:, 0] - top_logits[:, 1] >= CLEAR_MARGIN
        theirs = GOLDEN[f"{case}/{prompt}/top_ids"][:, 0]
        np.testing.assert_array_equal(ours_top1[clear], theirs[clear], err_msg=prompt)


def test_top1_agrees_at_95_percent_of_all_positions(compared):
    case, _, out = compared
    agree = np.concatenate([o[1] == GOLDEN[f"{case}/{p}/top_ids"][:, 0] for p, o in out.items()])
    assert agree.mean() >= 0.95, f"top-1 agreement {agree.mean():.3f} over {agree.size}"


def test_logit_differences_within_bounds(compared):
    case, _, out = compared
    diffs = np.concatenate(
        [np.abs(o[0] - GOLDEN[f"{case}/{p}/sample_logits"]).ravel() for p, o in out.items()]
        + [np.abs(o[2] - GOLDEN[f"{case}/{p}/top_logits"]).ravel() for p, o in out.items()])
    assert diffs.mean() <= 0.3, f"mean |logit difference| {diffs.mean():.3f}"
    assert diffs.max() <= 2.0, f"max |logit difference| {diffs.max():.3f}"
