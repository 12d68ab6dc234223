"""Loading GGUF files: what the reader returns equals what gguf.GGUFReader sees, the config
equals the metadata, and every kind of bad file fails with a specific error naming the culprit.

Bad files are tiny models from tests/tiny_model.py broken on purpose, each loaded through the
public `edgelora_np.load_model`.
"""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from tiny_model import TinySpec, k_spec, tensor_shapes, write_tiny_model

import edgelora_np as el
from edgelora_np.errors import (
    EdgeLoraError,
    GGUFFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
    UnsupportedQuantError,
)
from edgelora_np.gguf.reader import open_gguf
from edgelora_np.model.config import config_from_gguf


def load(path):
    return el.load_model(path, progress=False)


# --- what the reader returns ------------------------------------------------------------------

def gguf_py_fields(path) -> dict:
    """Metadata as gguf-py reads it (without its own GGUF.* pseudo-keys)."""
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("spec", [TinySpec(), TinySpec(qtype=QT.Q4_1, tied=False),
                                  k_spec(QT.Q6_K)], ids=["F32", "Q4_1", "Q6_K"])
def test_reader_agrees_with_gguf_py(tmp_path, spec):
    path = write_tiny_model(tmp_path / "m.gguf", spec)
    gf = open_gguf(path)
    assert gf.fields == gguf_py_fields(path)
    reader = gguf.GGUFReader(path)
    assert set(gf.tensors) == {t.name for t in reader.tensors} == set(tensor_shapes(spec))
    for t in reader.tensors:
        ours = gf.tensors[t.name]
        assert ours.shape == tuple(reversed(t.shape.tolist())) == tensor_shapes(spec)[t.name]
        assert ours.qtype == t.tensor_type
        assert np.array_equal(np.asarray(ours.data).view(np.uint8).reshape(-1),
                              np.asarray(t.data).view(np.uint8).reshape(-1)), t.name


def test_config_of_a_tiny_model(tmp_path):
    spec = TinySpec(n_layers=3, dim=96, n_heads=6, n_kv_heads=2, ffn_dim=160, vocab=290,
                    context=80, rope_base=5e5, rms_eps=1e-6)
    cfg = config_from_gguf(open_gguf(write_tiny_model(tmp_path / "m.gguf", spec)))
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim,
            cfg.vocab_size, cfg.context_length) == (3, 96, 6, 2, 16, 160, 290, 80)
    assert (cfg.rope_dim, cfg.rope_base, cfg.rope_freq_scale) == (16, 5e5, 1.0)
    assert cfg.rms_eps == float(np.float32(1e-6))                    # stored as float32
    assert (cfg.q_dim, cfg.kv_dim) == (96, 32)


def test_config_of_the_real_model_equals_its_metadata(default_model_path):
    meta = gguf_py_fields(default_model_path)
    reader = gguf.GGUFReader(default_model_path)
    cfg = config_from_gguf(open_gguf(default_model_path))
    arch = meta["general.architecture"]
    assert arch == "llama"
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    head_dim = meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]
    assert cfg.n_layers == meta[f"{arch}.block_count"]
    assert cfg.dim == meta[f"{arch}.embedding_length"]
    assert cfg.n_heads == meta[f"{arch}.attention.head_count"]
    assert cfg.n_kv_heads == meta[f"{arch}.attention.head_count_kv"]
    assert cfg.head_dim == head_dim
    assert cfg.ffn_dim == meta[f"{arch}.feed_forward_length"]
    assert cfg.vocab_size == meta[f"{arch}.vocab_size"] == int(embd.shape[1])
    assert cfg.vocab_size == len(meta["tokenizer.ggml.tokens"])
    assert cfg.context_length == meta[f"{arch}.context_length"]
    assert cfg.rope_base == meta[f"{arch}.rope.freq_base"]
    assert cfg.rope_dim == meta.get(f"{arch}.rope.dimension_count", head_dim)
    assert cfg.rope_freq_scale == 1.0 and f"{arch}.rope.scaling.type" not in meta
    assert cfg.rms_eps == meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    assert cfg.name == meta["general.name"]


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):            # a mapping's header line
                ours = line.rstrip().endswith(str(path))
            elif ours and first == "Rss:":
                total += int(line.split()[1])
    return total


def test_loading_the_weights_leaves_little_of_the_file_resident(default_model_path):
    """The repacked weights are the copy; the file's pages must not stay counted as ours too.
    (Releasing each tensor's own range left 37 MB of the 96 MB file resident: reading maps
    the pages around each fault as well.)"""
    from edgelora_np.model.weights import load_weights

    gf = open_gguf(default_model_path)
    load_weights(gf, config_from_gguf(gf), n_threads=1)
    size_kb = default_model_path.stat().st_size // 1024
    assert _mapped_rss_kb(default_model_path) < 0.02 * size_kb


# --- bad input ----------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match="model.gguf"):
        load(path)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04 a zip file, not a model" * 10],
                         ids=["empty", "short", "zip"])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match="weights.bin"):
        load(path)


@pytest.mark.parametrize("keep", [-1, -100, -5000, 0.5], ids=["1B", "100B", "5000B", "half"])
def test_truncated_in_tensor_data(tmp_path, keep):
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec())
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else len(data) + keep
    path.write_bytes(data[:cut])
    with pytest.raises(GGUFFormatError, match=r"m\.gguf.*truncated.*tensor '[\w.]+'") as e:
        load(path)
    assert "blk." in str(e.value) or "output" in str(e.value)


@pytest.mark.parametrize("keep", [6, 30, 1000], ids=["version", "counts", "metadata"])
def test_truncated_in_header(tmp_path, keep):
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec())
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(GGUFFormatError, match=r"m\.gguf.*truncated"):
        load(path)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec(), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf.*'gpt2'.*llama"):
        load(path)


# The codebook types llama-quantize offers that edgelora_np does not read.
IQ_CODEBOOK_TYPES = [QT.IQ1_S, QT.IQ1_M, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S]


@pytest.mark.parametrize("qtype", IQ_CODEBOOK_TYPES, ids=lambda t: t.name)
def test_unsupported_quant_type(tmp_path, qtype):
    path = write_tiny_model(tmp_path / "m.gguf", k_spec(QT.Q4_K),
                            tensor_types={"blk.1.ffn_up.weight": qtype})
    with pytest.raises(UnsupportedQuantError) as e:
        load(path)
    assert "blk.1.ffn_up.weight" in str(e.value) and qtype.name in str(e.value)


@pytest.mark.parametrize("name", ["blk.1.ffn_up.weight", "blk.0.attn_norm.weight",
                                  "token_embd.weight", "output_norm.weight"])
def test_missing_tensor(tmp_path, name):
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec(), drop=(name,))
    with pytest.raises(GGUFFormatError, match=rf"m\.gguf.*'{name}'.*missing"):
        load(path)


@pytest.mark.parametrize("name, shape", [
    ("blk.0.attn_k.weight", (64, 64)),             # a kv projection as wide as q
    ("blk.1.ffn_down.weight", (64, 96)),
    ("output.weight", (301, 64)),
    ("blk.1.ffn_norm.weight", (32,)),
])
def test_wrong_shape(tmp_path, name, shape):
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec(tied=False), shapes={name: shape})
    with pytest.raises(GGUFFormatError, match=rf"'{name}'.*{shape[0]}") as e:
        load(path)
    expected = tensor_shapes(TinySpec(tied=False))[name]
    assert str(expected) in str(e.value)


def test_every_error_is_an_edgelora_error():
    for cls in (GGUFFormatError, ModelNotFoundError, UnsupportedModelError, UnsupportedQuantError):
        assert issubclass(cls, EdgeLoraError)
