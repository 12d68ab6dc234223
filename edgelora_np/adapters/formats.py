"""LoRA adapter files, read into one in-memory form: per (layer, projection) a pair A, B and a scale.

A LoRA adapter changes a linear layer W [out, in] to W + scale * B @ A, with A [R, in] and
B [out, R]. Two file formats carry the same pairs:

PEFT (Hugging Face) -- a directory with adapter_config.json and adapter_model.safetensors.
    Tensors are named after the Hugging Face modules:
        base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight   A [R, in]
        base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight   B [out, R]
    The config gives the rank r and lora_alpha (per module through rank_pattern/alpha_pattern);
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (PEFT LoraLayer.update_layer).

GGUF-LoRA (llama.cpp, written by convert_lora_to_gguf.py) -- one GGUF file with
    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha and tensors
        blk.N.attn_q.weight.lora_a   A [R, in]     (ggml ne = [in, R])
        blk.N.attn_q.weight.lora_b   B [out, R]    (ggml ne = [R, out])
    scale = alpha / R, or 1 when alpha is 0 or absent (llama_adapter_lora_weight::get_scale).

The q/k row order. Hugging Face llama checkpoints order each head's q and k rows "rotate half"
(the first HD/2 rows pair with the last HD/2 under RoPE); GGUF files interleave them (rows 2i and
2i+1 pair), because convert_hf_to_gguf.py permutes the rows of q_proj and k_proj
(LlamaModel.permute, with H heads for q and KVH for k). A delta B @ A added to a GGUF weight must
be in the same row order, so B's rows are permuted the same way -- A is untouched, since
P(W + B @ A) = P(W) + P(B) @ A for any row permutation P. PEFT B's are permuted here;
GGUF-LoRA B's were already permuted by the converter (its LoraTorchTensor applies the reshape and
swapaxes to lora_B only) and are used as they are.

Everything the engine cannot run faithfully is refused with an AdapterError naming the file and
tensor: DoRA, extra trained modules (modules_to_save, embeddings, lm_head, norms), pickle files,
shapes that do not fit the base model, NaN/Inf weights, unpaired halves.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
from gguf import GGMLQuantizationType

from edgelora_np.errors import AdapterError, EdgeLoraError
from edgelora_np.gguf.quants import dequantize
from edgelora_np.gguf.reader import open_gguf
from edgelora_np.model.config import LlamaConfig
from edgelora_np.model.weights import PROJECTIONS

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"

# Hugging Face llama module (relative to model.layers.N) -> GGUF projection name.
PEFT_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# PEFT LoraConfig defaults, for the (rare) config that leaves r or lora_alpha out.
_PEFT_DEFAULT_R = 8
_PEFT_DEFAULT_ALPHA = 8
MAX_RANK = 1 << 16           # far above any real LoRA rank; bounds what a config may claim

# safetensors dtype -> the ggml type whose decode reads the same bytes.
_SAFETENSORS_DTYPES = {
    "F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
}

# ...model.layers.N.self_attn.q_proj.lora_A.weight, optionally with an adapter-name infix
# (lora_A.default.weight) as in an unfiltered PEFT state dict.
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_LAYER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<sub>.+)$")
_GGUF_KEY = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<proj>[a-z_]+)\.weight\.lora_(?P<half>[ab])$")


@dataclass(frozen=True, eq=False)
class LoraPair:
    """One adapted projection: delta W = scale * b @ a. Arrays are read-only."""

    a: np.ndarray      # float32 [R, in]   (lora_A)
    b: np.ndarray      # float32 [out, R]  (lora_B), rows in GGUF (llama.cpp) order
    scale: float       # alpha / R (alpha / sqrt(R) with rslora) x the user's scale

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    name: str
    path: Path                                  # PEFT directory or GGUF file
    format: str                                 # "peft" or "gguf"
    pairs: dict[tuple[int, str], LoraPair]      # (layer index, projection name) -> pair

    @property
    def targets(self) -> tuple[str, ...]:
        """The projections adapted in at least one layer, in PROJECTIONS order."""
        present = {proj for _, proj in self.pairs}
        return tuple(p for p in PROJECTIONS if p in present)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.pairs}))

    @property
    def ranks(self) -> dict[str, set[int]]:
        """Projection -> the ranks its pairs use (one rank unless rank_pattern varied it)."""
        out: dict[str, set[int]] = {}
        for (_, proj), pair in self.pairs.items():
            out.setdefault(proj, set()).add(pair.rank)
        return out

    @property
    def max_rank(self) -> int:
        return max(pair.rank for pair in self.pairs.values())

    @property
    def nbytes(self) -> int:
        return sum(pair.a.nbytes + pair.b.nbytes for pair in self.pairs.values())


def base_shape(cfg: LlamaConfig, proj: str) -> tuple[int, int]:
    """(out, in) of a base projection: the shapes B @ A must have."""
    D, QD, KVD, F = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.ffn_dim
    return {
        "attn_q": (QD, D), "attn_k": (KVD, D), "attn_v": (KVD, D), "attn_output": (D, QD),
        "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F),
    }[proj]


def permute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k row order -> GGUF order (convert_hf_to_gguf.py LlamaModel.permute).

    Within each head the rows [first half | second half] become interleaved pairs:
    [out, ...] -> [n_head, 2, HD/2, ...] -> swap axes 1, 2 -> [n_head, HD/2, 2, ...] -> [out, ...].
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_adapter(path: str | os.PathLike, cfg: LlamaConfig, *, scale: float = 1.0,
                 name: str | None = None, arch: str = "llama") -> LoraAdapter:
    """Read a PEFT adapter directory or a GGUF-LoRA file and check it fits the base model `cfg`.

    `scale` multiplies every pair's scale (llama.cpp's --lora-scaled). `name` defaults to the
    directory name or file stem. `arch` is the base model's general.architecture.
    """
    path = Path(path)
    scale = float(scale)
    if not math.isfinite(scale):
        raise AdapterError(f"{path}: adapter scale must be a finite number, got {scale}")
    if path.is_dir():
        pairs = _load_peft(path, cfg, scale)
        fmt = "peft"
    elif path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            pairs = _load_gguf_lora(path, cfg, scale, arch)
            fmt = "gguf"
        elif path.suffix == ".bin":
            raise AdapterError(f"{path}: pickle (.bin) adapters are not read (they can run code); "
                               f"save the adapter as {PEFT_WEIGHTS}")
        else:
            raise AdapterError(f"{path}: not an adapter: expected a GGUF-LoRA file or a PEFT "
                               f"directory holding {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    else:
        raise AdapterError(f"adapter not found: {path}")
    if not pairs:
        raise AdapterError(f"{path}: the adapter holds no LoRA tensors")
    return LoraAdapter(name or (path.name if fmt == "peft" else path.stem), path, fmt, pairs)


# --------------------------------------------------------------------------------------------
# Checks shared by both formats


def _check_pair(file: Path, layer: int, proj: str, a: np.ndarray, a_name: str, b: np.ndarray,
                b_name: str, cfg: LlamaConfig) -> None:
    """Check one A [R, in], B [out, R] against the base model."""
    if not 0 <= layer < cfg.n_layers:
        raise AdapterError(f"{file}: tensor '{a_name}': layer {layer} does not exist, the base "
                           f"model has {cfg.n_layers} layers (adapter for another base model?)")
    out_dim, in_dim = base_shape(cfg, proj)
    for t, t_name in ((a, a_name), (b, b_name)):
        if t.ndim != 2:
            raise AdapterError(f"{file}: tensor '{t_name}' has shape {t.shape}, expected a matrix")
    rank = a.shape[0]
    if rank == 0 or b.shape[1] == 0:
        raise AdapterError(f"{file}: tensor '{a_name}' has rank 0 (shape {a.shape})")
    if a.shape != (rank, in_dim):
        raise AdapterError(f"{file}: tensor '{a_name}' has shape {a.shape}, expected "
                           f"({rank}, {in_dim}) = (rank, in) for {proj} "
                           f"(adapter for another base model?)")
    if b.shape != (out_dim, rank):
        raise AdapterError(f"{file}: tensor '{b_name}' has shape {b.shape}, expected "
                           f"({out_dim}, {rank}) = (out, rank) for {proj} with the rank of "
                           f"'{a_name}' (adapter for another base model?)")
    for t, t_name in ((a, a_name), (b, b_name)):
        if not np.isfinite(t).all():
            raise AdapterError(f"{file}: tensor '{t_name}' contains NaN or Inf values")


def _frozen(x: np.ndarray) -> np.ndarray:
    """A freshly decoded array (no other owner) as contiguous read-only float32."""
    x = np.ascontiguousarray(x, np.float32)
    x.setflags(write=False)
    return x


# --------------------------------------------------------------------------------------------
# PEFT


def _load_peft(directory: Path, cfg: LlamaConfig, scale: float) -> dict[tuple[int, str], LoraPair]:
    config_path, weights_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not config_path.is_file():
        raise AdapterError(f"{directory}: not a PEFT adapter directory: {PEFT_CONFIG} is missing")
    if not weights_path.is_file():
        if (directory / PEFT_PICKLE).is_file():
            raise AdapterError(f"{directory / PEFT_PICKLE}: pickle (.bin) adapters are not read "
                               f"(they can run code); save the adapter as {PEFT_WEIGHTS}")
        raise AdapterError(f"{directory}: {PEFT_WEIGHTS} is missing")
    conf = _read_peft_config(config_path)
    tensors = _read_safetensors(weights_path)

    halves: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
    modules: dict[tuple[int, str], str] = {}
    adapter_names: set[str | None] = set()
    for key, value in tensors.items():
        layer, proj, module, half, adapter_name = _parse_peft_key(weights_path, key)
        adapter_names.add(adapter_name)
        if len(adapter_names) > 1:
            raise AdapterError(f"{weights_path}: tensor '{key}': the file mixes adapter names "
                               f"{sorted(map(str, adapter_names))}; expected one adapter")
        slot = halves.setdefault((layer, proj), {})
        if half in slot:
            raise AdapterError(f"{weights_path}: tensors '{slot[half][0]}' and '{key}' are the "
                               f"same lora_{half} of {module}")
        slot[half] = (key, value)
        modules[(layer, proj)] = module

    pairs = {}
    for (layer, proj), slot in sorted(halves.items()):
        module = modules[(layer, proj)]
        for half in "AB":
            if half not in slot:
                present = next(iter(slot.values()))[0]
                raise AdapterError(f"{weights_path}: tensor '{present}' has no lora_{half} "
                                   f"partner: the pair for {module} is incomplete")
        (a_name, a), (b_name, b) = slot["A"], slot["B"]
        _check_targeted(config_path, conf, module, layer, a_name)
        _check_pair(weights_path, layer, proj, a, a_name, b, b_name, cfg)
        r = int(_pattern_value(conf.get("rank_pattern") or {}, module, conf.get("r", _PEFT_DEFAULT_R)))
        alpha = float(_pattern_value(conf.get("alpha_pattern") or {}, module,
                                     conf.get("lora_alpha", _PEFT_DEFAULT_ALPHA)))
        if a.shape[0] != r:
            raise AdapterError(f"{weights_path}: tensor '{a_name}' has rank {a.shape[0]}, but "
                               f"{PEFT_CONFIG} gives {module} rank {r} (r / rank_pattern)")
        pair_scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
        if proj == "attn_q":
            b = permute_qk_rows(b, cfg.n_heads)
        elif proj == "attn_k":
            b = permute_qk_rows(b, cfg.n_kv_heads)
        pairs[(layer, proj)] = LoraPair(_frozen(a), _frozen(b), pair_scale * scale)
    return pairs


def _read_peft_config(path: Path) -> dict:
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:    # RecursionError: nesting too deep
        raise AdapterError(f"{path}: cannot read the adapter config: {type(e).__name__}: "
                           f"{e}") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    peft_type = conf.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    # Options that change the computation beyond W + scale * B @ A, each refused by name.
    refused = {
        "use_dora": "DoRA (weight-decomposed LoRA) adapters are not supported",
        "modules_to_save": "the adapter also replaces whole modules (modules_to_save), "
                           "which is not supported",
        "trainable_token_indices": "the adapter also trains token embeddings "
                                   "(trainable_token_indices), which is not supported",
        "layer_replication": "layer_replication changes the base model's layers; not supported",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
        "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
        "lora_bias": "LoRA with a bias on lora_B (lora_bias) is not supported",
    }
    for key, why in refused.items():
        if conf.get(key):
            raise AdapterError(f"{path}: {key} = {conf[key]!r}: {why}")
    _check_config_types(path, conf)
    # Patterns are regular expressions in PEFT; a broken one is a config error, found here.
    patterns = [*(conf.get("rank_pattern") or {}), *(conf.get("alpha_pattern") or {})]
    patterns += [conf[k] for k in ("target_modules", "exclude_modules") if isinstance(conf.get(k), str)]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterError(f"{path}: pattern {pattern!r} is not a valid regular expression: "
                               f"{e}") from None
    # fan_in_fan_out only describes a Conv1D base layer (GPT-2); PEFT resets it to False for the
    # nn.Linear layers of llama, and lora_A/lora_B are [r, in] / [out, r] either way.
    return conf


def _check_config_types(path: Path, conf: dict) -> None:
    """The config values the loader computes with, checked for type and range before use: ranks
    are integers in 0..MAX_RANK, alphas finite numbers, module lists strings, layers integers."""
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(conf.get(key) or {}, dict):
            raise AdapterError(f"{path}: {key} must be an object (module pattern -> number), "
                               f"got {conf[key]!r}")
    ranks = [("r", conf["r"])] if "r" in conf else []
    ranks += [(f"rank_pattern[{k!r}]", v) for k, v in (conf.get("rank_pattern") or {}).items()]
    alphas = [("lora_alpha", conf["lora_alpha"])] if "lora_alpha" in conf else []
    alphas += [(f"alpha_pattern[{k!r}]", v) for k, v in (conf.get("alpha_pattern") or {}).items()]
    for key, value in ranks + alphas:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterError(f"{path}: {key} must be a number, not NaN or Inf, got {value!r}")
    for key, value in ranks:
        if value != int(value) or not 0 <= value <= MAX_RANK:     # 0: refused with the tensor
            raise AdapterError(f"{path}: {key} must be an integer rank in 0..{MAX_RANK}, "
                               f"got {value!r}")
    for key in ("target_modules", "exclude_modules"):
        value = conf.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(m, str) for m in value)):
            raise AdapterError(f"{path}: {key} must be a string or a list of strings, "
                               f"got {value!r}")
    layers = conf.get("layers_to_transform")
    listed = layers if isinstance(layers, list) else [layers]
    if layers is not None and any(isinstance(x, bool) or not isinstance(x, int) for x in listed):
        raise AdapterError(f"{path}: layers_to_transform must be an integer or a list of "
                           f"integers, got {layers!r}")


def _parse_peft_key(file: Path, key: str) -> tuple[int, str, str, str, str | None]:
    """'base_model.model.model.layers.3.mlp.up_proj.lora_B.weight'
    -> (3, 'ffn_up', 'model.layers.3.mlp.up_proj', 'B', None)."""
    if "lora_magnitude_vector" in key:
        raise AdapterError(f"{file}: tensor '{key}': DoRA (weight-decomposed LoRA) adapters are "
                           f"not supported")
    if "lora_embedding_" in key or "embed_tokens" in key:
        raise AdapterError(f"{file}: tensor '{key}': LoRA on the token embedding (embed_tokens) "
                           f"is not supported")
    if "lm_head" in key:
        raise AdapterError(f"{file}: tensor '{key}': LoRA on the output layer (lm_head) is not "
                           f"supported")
    m = _PEFT_KEY.match(key)
    if m is None:
        raise AdapterError(f"{file}: tensor '{key}' is not a LoRA weight (expected "
                           f"<module>.lora_A.weight or <module>.lora_B.weight)")
    module = m["module"].removeprefix("base_model.model.")
    lm = _PEFT_LAYER.match(module)
    if lm is None or lm["sub"] not in PEFT_MODULES:
        raise AdapterError(f"{file}: tensor '{key}': unknown module {module!r}; a llama adapter "
                           f"may target model.layers.N.{{{', '.join(PEFT_MODULES)}}}")
    return int(lm["layer"]), PEFT_MODULES[lm["sub"]], module, m["half"], m["adapter"]


def _pattern_value(patterns: dict, module: str, default):
    """rank_pattern / alpha_pattern lookup as PEFT's get_pattern_key: the first key (in file order)
    that regex-matches the end of the module name at a dot boundary wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _check_targeted(config_path: Path, conf: dict, module: str, layer: int, tensor: str) -> None:
    """A tensor for a module the config does not adapt means config and weights disagree.

    Matching follows PEFT's check_target_module_exists: a string target_modules is a regex the
    whole module name must match ("all-linear": every linear layer but the output), a list names
    modules by exact name or dotted suffix; exclude_modules the same way; layers_to_transform
    restricts layer indices.
    """
    def matches(spec) -> bool:
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, module) is not None
        return module in spec or any(module.endswith("." + t) for t in spec)

    targets = conf.get("target_modules")
    if targets and not matches(targets):
        raise AdapterError(f"{config_path}: tensor '{tensor}' adapts {module}, which target_modules "
                           f"{targets!r} does not include (config and weights disagree)")
    excluded = conf.get("exclude_modules")
    if excluded and matches(excluded):
        raise AdapterError(f"{config_path}: tensor '{tensor}' adapts {module}, which exclude_modules "
                           f"{excluded!r} excludes (config and weights disagree)")
    layers = conf.get("layers_to_transform")
    if layers is not None:
        allowed = [layers] if isinstance(layers, int) else list(layers)
        if layer not in allowed:
            raise AdapterError(f"{config_path}: tensor '{tensor}' adapts layer {layer}, which "
                               f"layers_to_transform {layers!r} does not include")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> float32 array. Read through safetensors.deserialize, which hands back raw bytes, so
    BF16 (which NumPy has no dtype for) decodes like every other type."""
    try:
        entries = safetensors.deserialize(path.read_bytes())
    except (OSError, safetensors.SafetensorError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file: {e}") from None
    out = {}
    for name, entry in entries:
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        if dtype not in _SAFETENSORS_DTYPES:
            raise AdapterError(f"{path}: tensor '{name}' is stored as {dtype}; LoRA weights must be "
                               f"{', '.join(_SAFETENSORS_DTYPES)}")
        raw = np.frombuffer(entry["data"], np.uint8)
        try:
            out[name] = dequantize(raw, _SAFETENSORS_DTYPES[dtype], shape, name=name)
        except EdgeLoraError as e:
            raise AdapterError(f"{path}: {e}") from None
    return out


# --------------------------------------------------------------------------------------------
# GGUF-LoRA


def _load_gguf_lora(path: Path, cfg: LlamaConfig, scale: float,
                    arch: str) -> dict[tuple[int, str], LoraPair]:
    try:
        gf = open_gguf(path)
    except EdgeLoraError as e:
        raise AdapterError(f"cannot read the GGUF adapter: {e}") from None   # e names the file
    file_type = gf.fields.get("general.type")
    if file_type != "adapter":
        raise AdapterError(f"{path}: general.type is {file_type!r}, expected 'adapter' "
                           f"(a model file, not a LoRA adapter?)")
    adapter_type = gf.fields.get("adapter.type")
    if adapter_type != "lora":
        raise AdapterError(f"{path}: adapter.type is {adapter_type!r}, expected 'lora'")
    file_arch = gf.fields.get("general.architecture")
    if file_arch != arch:
        raise AdapterError(f"{path}: adapter for architecture {file_arch!r}, base model is {arch!r}")
    if gf.fields.get("adapter.alora.invocation_tokens"):
        raise AdapterError(f"{path}: activated LoRA (adapter.alora.invocation_tokens) is not "
                           f"supported")
    alpha = gf.fields.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: adapter.lora.alpha is {alpha!r}, expected a finite number")

    halves: dict[tuple[int, str], dict[str, str]] = {}
    for name in gf.tensors:
        m = _GGUF_KEY.match(name)
        if name.startswith(("token_embd.", "output.")):
            raise AdapterError(f"{path}: tensor '{name}': LoRA on the token embedding or output "
                               f"layer is not supported")
        if "_norm." in name:
            raise AdapterError(f"{path}: tensor '{name}': the adapter replaces a norm weight, "
                               f"which is not supported")
        if m is None or m["proj"] not in PROJECTIONS:
            raise AdapterError(f"{path}: tensor '{name}' is not a LoRA weight (expected "
                               f"blk.N.<{'|'.join(PROJECTIONS)}>.weight.lora_a / .lora_b)")
        halves.setdefault((int(m["layer"]), m["proj"]), {})[m["half"]] = name

    pairs = {}
    for (layer, proj), slot in sorted(halves.items()):
        for half in "ab":
            if half not in slot:
                present = next(iter(slot.values()))
                raise AdapterError(f"{path}: tensor '{present}' has no lora_{half} partner: "
                                   f"the pair for blk.{layer}.{proj} is incomplete")
        a, b = (_read_gguf_tensor(gf, path, slot[h]) for h in "ab")
        _check_pair(path, layer, proj, a, slot["a"], b, slot["b"], cfg)
        rank = a.shape[0]
        pair_scale = alpha / rank if alpha else 1.0      # llama.cpp: alpha 0 means "no scaling"
        pairs[(layer, proj)] = LoraPair(_frozen(a), _frozen(b), pair_scale * scale)
    return pairs


def _read_gguf_tensor(gf, path: Path, name: str) -> np.ndarray:
    t = gf.tensors[name]
    try:
        return dequantize(t.data, t.qtype, t.shape, name=name)
    except EdgeLoraError as e:
        raise AdapterError(f"{path}: {e}") from None
