"""The engine's forward pass against the plain float64 reference (model/reference.py), on tiny
random llama models written by tests/tiny_model.py, plus the invariances a serving engine needs:
a sequence's logits do not depend on the batch around it, on how its prompt was chunked, or on
the thread count the weights were tiled for.

How close engine and reference must be. The reference rounds nowhere; the engine rounds where
llama.cpp does, and each rounding has a unit roundoff u (relative error of one value):
    q, k, v (the fp16 KV cache) and attention probabilities    u16  = 2^-11  (every type)
    activations before an F16 / BF16 matmul                    u16, ubf16 = 2^-8
    activations before a quantized matmul: 8 bit per block     u8   = 2^-7 of the block's max
The weights themselves are the same on both sides (the reference dequantizes the same bits).
Each layer has about a dozen rounding sites; their errors are independent and pass through
the residual stream and RMSNorm without growing, so the logits' relative error is a few u.
We assert, relative to the reference logits' std (rms) and max |logit| (max):
    rms <= 2u, max <= 4u for F32;  rms <= 4u, max <= 8u for F16 / BF16;  rms <= 6u8, max <= 10u8
for 8-bit activations (measured over 5 seeds: at most 0.45u, 0.8u; 1.8u, 2.4u; 4u8, 4.5u8).
So F32 weights agree to ~5e-4, not float32 precision: the fp16 KV cache sets the floor.
"""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from tiny_model import TinySpec, k_spec, write_tiny_model

import edgelora_np as el
from edgelora_np.model.batch import Batch
from edgelora_np.model.reference import reference_hidden_states, reference_logits

U16, UBF16, U8 = 2.0**-11, 2.0**-8, 2.0**-7
# weight type -> (rms bound, max bound) on the relative error of the logits (see above)
BOUNDS = {QT.F32: (2 * U16, 4 * U16), QT.F16: (4 * U16, 8 * U16), QT.BF16: (4 * UBF16, 8 * UBF16)}
QUANTIZED_BOUNDS = (6 * U8, 10 * U8)

SPECS = {
    "F32-tied": TinySpec(),
    "F32-untied": TinySpec(tied=False),
    "F16": TinySpec(qtype=QT.F16),
    "BF16": TinySpec(qtype=QT.BF16, tied=False),
    "Q8_0": TinySpec(qtype=QT.Q8_0),
    "Q4_0-untied": TinySpec(qtype=QT.Q4_0, tied=False),
    "Q4_1": TinySpec(qtype=QT.Q4_1),
    "Q4_0+Q8_0-embd": TinySpec(qtype=QT.Q4_0, embd_qtype=QT.Q8_0, tied=False),
    "Q5_0": TinySpec(qtype=QT.Q5_0),
    "Q5_1-untied": TinySpec(qtype=QT.Q5_1, tied=False),
    "IQ4_NL": TinySpec(qtype=QT.IQ4_NL),
}
# K-quants need rows of whole 256-blocks (D=256, F=512): too slow for the no-JIT run.
K_SPECS = {
    "Q4_K": k_spec(QT.Q4_K),
    "Q5_K": k_spec(QT.Q5_K, tied=False),
    "Q6_K": k_spec(QT.Q6_K),
    "Q4_0+Q6_K-embd": k_spec(QT.Q4_0, embd_qtype=QT.Q6_K, tied=False),
    "Q2_K": k_spec(QT.Q2_K),
    "Q3_K": k_spec(QT.Q3_K, tied=False),
    "IQ4_XS": k_spec(QT.IQ4_XS),
}
N_TOKENS = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


def model_path(model_dir, name: str, spec: TinySpec):
    path = model_dir / f"{name}.gguf"
    if not path.exists():
        write_tiny_model(path, spec)
    return path


def check_against_reference(path, spec: TinySpec):
    ids = np.random.default_rng(spec.seed).integers(0, spec.vocab, N_TOKENS)
    ours = el.load_model(path, progress=False).logits(ids).astype(np.float64)       # [n, V]
    ref = reference_logits(path, ids)                                                # [n, V]
    assert ours.shape == ref.shape == (N_TOKENS, spec.vocab)
    rms_bound, max_bound = BOUNDS.get(spec.qtype, QUANTIZED_BOUNDS)
    err = ours - ref
    assert np.sqrt((err**2).mean()) <= rms_bound * ref.std()
    assert np.abs(err).max() <= max_bound * np.abs(ref).max()
    # Top-1 must agree wherever the reference's lead is clear: 6 x the error bound, about
    # 4 standard deviations of the difference of two logits' errors.
    top2 = np.sort(ref, axis=1)[:, -2:]                                              # [n, 2]
    clear = top2[:, 1] - top2[:, 0] > 6 * rms_bound * ref.std()
    assert clear.mean() >= 0.2                                  # the check is not vacuous
    np.testing.assert_array_equal(ours.argmax(1)[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("name", SPECS)
def test_logits_match_reference(model_dir, name):
    check_against_reference(model_path(model_dir, name, SPECS[name]), SPECS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", K_SPECS)
def test_logits_match_reference_k_quants(model_dir, name):
    check_against_reference(model_path(model_dir, name, K_SPECS[name]), K_SPECS[name])


def test_attention_free_model_matches_to_float32_precision(model_dir):
    """With no layers the forward is embed -> RMSNorm -> output: no fp16 rounding anywhere,
    so F32 weights must agree to float32 accumulation error."""
    spec = TinySpec(n_layers=0, tied=False)
    path = model_path(model_dir, "no-layers", spec)
    ids = np.arange(0, 300, 7)
    ours = el.load_model(path, progress=False).logits(ids)
    ref = reference_logits(path, ids)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


# --- invariances on the real forward -------------------------------------------------------

INVARIANCE_SPECS = {"F32": TinySpec(seed=1), "Q4_1": TinySpec(qtype=QT.Q4_1, seed=2)}


# Quantized models run the invariance tests only with the JIT: as plain Python they take ~8 s each.
@pytest.fixture(scope="module", params=["F32", pytest.param("Q4_1", marks=pytest.mark.slow)])
def tiny(request, model_dir):
    name = request.param
    return el.load_model(model_path(model_dir, f"inv-{name}", INVARIANCE_SPECS[name]),
                         progress=False)


def alone(model, ids) -> np.ndarray:
    """Logits of one sequence run by itself from a fresh cache, [len(ids), V]."""
    cache = model.llama.new_cache(64)
    return model.llama.forward(Batch.single(ids, all_logits=True), cache)


def test_batch_of_sequences_equals_each_alone(tiny):
    """Three sequences of different lengths interleaved in one Llama.forward batch."""
    rng = np.random.default_rng(0)
    seqs = {7: rng.integers(0, 300, 9), 2: rng.integers(0, 300, 40), 5: rng.integers(0, 300, 1)}
    seq_ids = np.concatenate([np.full(len(t), s) for s, t in seqs.items()])
    positions = np.concatenate([np.arange(len(t)) for t in seqs.values()])
    tokens = np.concatenate(list(seqs.values()))
    order = rng.permutation(len(tokens))            # rows of all three in any order
    batch = Batch(tokens[order].astype(np.int32), seq_ids[order].astype(np.int32),
                  positions[order].astype(np.int32), np.full(len(order), -1, np.int32),
                  np.arange(len(order), dtype=np.int32))
    cache = tiny.llama.new_cache(128)
    logits = tiny.llama.forward(batch, cache)                                        # [B, V]
    for s, ids in seqs.items():
        rows = (batch.seq_ids == s)
        got = logits[rows][np.argsort(batch.positions[rows])]
        np.testing.assert_array_equal(got, alone(tiny, ids), err_msg=f"sequence {s}")
        assert cache.length(s) == len(ids)


def test_decode_tokens_batched_with_a_prefill(tiny):
    """One sequence decoding (its prefix already cached) next to another's prefill."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 300, 34), rng.integers(0, 300, 6)
    cache = tiny.llama.new_cache(128)
    tiny.llama.forward(Batch.single(a[:33], seq_id=0), cache)
    batch = Batch(np.concatenate([b[:3], a[33:], b[3:]]).astype(np.int32),
                  np.array([1, 1, 1, 0, 1, 1, 1], np.int32),
                  np.array([0, 1, 2, 33, 3, 4, 5], np.int32), np.full(7, -1, np.int32),
                  np.array([3, 6], np.int32))
    logits = tiny.llama.forward(batch, cache)                                        # [2, V]
    np.testing.assert_array_equal(logits[0], alone(tiny, a)[-1])
    np.testing.assert_array_equal(logits[1], alone(tiny, b)[-1])


def test_chunked_prefill_equals_one_call(tiny):
    ids = np.random.default_rng(2).integers(0, 300, 45)
    cache = tiny.llama.new_cache(64)
    first = tiny.llama.forward(Batch.single(ids[:29], all_logits=True), cache)
    second = tiny.llama.forward(Batch.single(ids[29:], start=29, all_logits=True), cache)
    np.testing.assert_array_equal(np.concatenate([first, second]), alone(tiny, ids))


def test_logits_api_equals_forward(tiny):
    ids = np.random.default_rng(3).integers(0, 300, 20)
    np.testing.assert_array_equal(tiny.logits(ids), alone(tiny, ids))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("qtype", [QT.F32, pytest.param(QT.Q8_0, marks=pytest.mark.slow),
                                   pytest.param(QT.Q4_1, marks=pytest.mark.slow)],
                         ids=lambda t: t.name)
def test_thread_count_does_not_change_logits(model_dir, qtype):
    """Weights are tiled for the thread count; every tiling sums in the same order."""
    path = model_path(model_dir, f"threads-{qtype.name}", TinySpec(qtype=qtype, seed=3))
    ids = np.random.default_rng(4).integers(0, 300, 24)
    try:
        one = el.load_model(path, n_threads=1, progress=False)
        logits_one = one.logits(ids)
        two = el.load_model(path, n_threads=2, progress=False)
        logits_two = two.logits(ids)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert one.llama.weights.layers[0].wo.qs.shape != two.llama.weights.layers[0].wo.qs.shape
    np.testing.assert_array_equal(logits_one, logits_two)



# --- the partial forward (Llama.hidden_states, the router's prompt embedding) ----------------

HIDDEN_SPECS = {"F32": TinySpec(n_layers=3, seed=5), "Q8_0": TinySpec(n_layers=3, qtype=QT.Q8_0, seed=6)}


# The quantized model only with the JIT (as plain Python its kernels take seconds per call).
@pytest.mark.parametrize("name", ["F32", pytest.param("Q8_0", marks=pytest.mark.slow)])
def test_hidden_states_match_reference(model_dir, name):
    """The residual stream after the first n blocks against the float64 reference, within
    the logits' bounds (the same roundings, fewer of them); after 0 blocks it is the embedding."""
    spec = HIDDEN_SPECS[name]
    path = model_path(model_dir, f"hidden-{name}", spec)
    model = el.load_model(path, progress=False)
    ids = np.random.default_rng(7).integers(0, spec.vocab, N_TOKENS)
    rms_bound, max_bound = BOUNDS.get(spec.qtype, QUANTIZED_BOUNDS)
    for n_layers in range(spec.n_layers + 1):
        cache = model.llama.new_cache(64)
        ours = model.llama.hidden_states(Batch.single(ids), cache, n_layers).astype(np.float64)
        ref = reference_hidden_states(path, ids, n_layers)                       # [n, D]
        assert ours.shape == ref.shape == (N_TOKENS, spec.dim)
        err = ours - ref
        if n_layers == 0 and spec.qtype == QT.F32:
            np.testing.assert_array_equal(ours, ref)
        assert np.sqrt((err**2).mean()) <= rms_bound * ref.std(), n_layers
        assert np.abs(err).max() <= max_bound * np.abs(ref).max(), n_layers
        assert cache.length(0) == N_TOKENS


def test_hidden_states_are_the_forwards_stream(model_dir):
    """All blocks, then the final norm and output matrix, give forward's logits bit for bit;
    every_layer stacks the stream after each block (its last row is the plain call's)."""
    from edgelora_np.kernels.elementwise import rmsnorm
    from edgelora_np.kernels.pack import matmul

    spec = HIDDEN_SPECS["F32"]
    model = el.load_model(model_path(model_dir, "hidden-F32", spec), progress=False)
    llama = model.llama
    ids = np.random.default_rng(8).integers(0, spec.vocab, 11)
    batch = Batch.single(ids, all_logits=True)
    every = llama.hidden_states(batch, llama.new_cache(64), spec.n_layers, every_layer=True)
    assert every.shape == (spec.n_layers, len(ids), spec.dim)
    for n_layers in range(1, spec.n_layers + 1):
        x = llama.hidden_states(batch, llama.new_cache(64), n_layers)
        np.testing.assert_array_equal(x, every[n_layers - 1])
    normed = np.empty_like(x)
    rmsnorm(x, llama.weights.output_norm, llama.cfg.rms_eps, normed)
    np.testing.assert_array_equal(matmul(llama.weights.output, normed), alone(model, ids))
    with pytest.raises(el.EdgeLoraError, match="n_layers must be between 0 and 3"):
        llama.hidden_states(batch, llama.new_cache(64), 4)


# Run in a fresh process: in this one, earlier tests may already have loaded any kernel.
_LOADED_AFTER_WARMUP = """
import sys
import numba
import numpy as np
import edgelora_np as el
from edgelora_np.kernels import actquant, attention, elementwise, lora, pack, qmatmul, qmatmul_decoded

def loaded():
    return {f"{module.__name__}.{name}": len(kernel.signatures)
            for module in (actquant, attention, elementwise, lora, pack, qmatmul, qmatmul_decoded)
            for name, kernel in vars(module).items()
            if isinstance(kernel, numba.core.dispatcher.Dispatcher)}

model = el.load_model(sys.argv[1], progress=False)
before = loaded()
model.logits(np.arange(40) % model.config.vocab_size)       # a 40-token prefill
model.logits(np.arange(1))                                   # one token, as decode runs
after = loaded()
print({name: (before[name], after[name]) for name in after if after[name] != before[name]})
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="counts the kernels' compiled signatures")
def test_loading_a_model_loads_every_kernel_its_forwards_use(model_dir):
    """load_model's warm-up runs every kernel signature a forward of any batch size uses, so
    that none is loaded later, after warmup.release_compiler_memory. One loaded then raised
    peak RSS by ~10 MB (the parallel activation quantizer, when the warm-up's prefill had no
    more rows than actquant.SERIAL_ROWS)."""
    import subprocess
    import sys

    path = model_path(model_dir, "warm-Q4_1", TinySpec(qtype=QT.Q4_1, seed=3))
    result = subprocess.run([sys.executable, "-c", _LOADED_AFTER_WARMUP, str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{}", f"loaded after the warm-up (before, after): {result.stdout}"
