"""Hugging Face checkpoints: a `config.json` and one `model.safetensors`, written and read.

    DIR/config.json          the transformers config (model_type gpt2, llama, mixtral or qwen3)
    DIR/model.safetensors    the weights under transformers' names (no pickle anywhere)

A GPT is written as `GPT2LMHeadModel`, whose `Conv1D` layers hold their weights as (in, out):
civetta's (out, in) matrices of `attn.c_attn`, `attn.c_proj`, `mlp.c_fc` and `mlp.c_proj` are
transposed on the way out and back on the way in. A Llama is written as `LlamaForCausalLM`,
whose state-dict names civetta's Llama already uses; with `moe` as `MixtralForCausalLM` under the
classic Mixtral names civetta uses (`block_sparse_moe.gate`, `block_sparse_moe.experts.{j}.w1|
w2|w3`, which transformers 5 fuses when it loads); with `qk_norm` as `Qwen3ForCausalLM`
(`self_attn.q_norm`, `self_attn.k_norm`). A tied head is not written (safetensors refuses tensors
that share memory, and transformers ties `lm_head.weight` when it loads).

Reading refuses, with one line, whatever civetta's models cannot run exactly: another
model_type, rope scaling, sliding windows, biases on a Llama, another activation, router jitter,
and missing, unexpected or mis-shaped tensors. A Mixtral's experts are read under the classic
names or under transformers 5's fused ones (`mlp.gate.weight`, `mlp.experts.gate_up_proj` of
shape (experts, 2·ffn, n_embd) holding w1 then w3, `mlp.experts.down_proj` (experts, n_embd,
ffn)), which are split into civetta's. numpy and safetensors only: torch and transformers are
needed by the tests alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from civetta import meta
from civetta.models import GPTConfig, LlamaConfig, ModelDescription, build_stage
from civetta.models.moe import MoEConfig
from launch.config import FAMILIES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Conv1D layers of GPT2: (in, out) in the file, (out, in) in civetta.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers that older transformers versions saved beside the weights.
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# safetensors dtype → numpy; civetta computes in float32 or float64.
DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh form, as civetta's
GPT_NORM_EPS = 1e-5  # civetta's LayerNorm
MIXTRAL_AUX_LOSS_COEF = 0.001  # MixtralConfig's default router_aux_loss_coef


class HFError(ValueError):
    """A Hugging Face checkpoint civetta cannot write or read; one line for the user."""


# ---- civetta → Hugging Face -------------------------------------------------------------------
def parameter_shapes(description: ModelDescription) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole model by civetta name, shaped as civetta holds it (a tied
    head is the table alone). Built data-free: shapes, no values."""
    with meta.data_free():
        model = build_stage(description, range(description.n_layer), first=True, last=True)
    return {name: tuple(p.data.shape) for name, p in model.params.items()}


def check_expressible(description: ModelDescription) -> None:
    """Refuse a model that no transformers class holds exactly."""
    if isinstance(description, GPTConfig) and not description.bias:
        raise HFError(
            "model.bias=false cannot be written as GPT2LMHeadModel, which has biases in every "
            "layer (export it with --format npz)"
        )
    if not isinstance(description, LlamaConfig) or description.moe is None:
        return
    moe = description.moe
    # MixtralForCausalLM routes every token: a model trained dropping tokens over capacity
    # would compute something else there, so it is refused rather than exported with a warning.
    if moe.capacity_factor is not None:
        raise HFError(
            f"model.moe.capacity_factor={moe.capacity_factor} cannot be written as "
            "MixtralForCausalLM, which routes every token (dropless); export it with --format npz"
        )
    if moe.shared_experts:
        raise HFError(
            f"model.moe.shared_experts={moe.shared_experts} cannot be written as "
            "MixtralForCausalLM, which has no shared experts (export it with --format npz)"
        )
    if description.qk_norm:
        raise HFError(
            "model.qk_norm with model.moe (Qwen3MoeForCausalLM) cannot be written yet "
            "(export it with --format npz)"
        )


def hf_config(description: ModelDescription, dtype: np.dtype) -> dict[str, Any]:
    """The config.json of the transformers model that computes what `description` does."""
    check_expressible(description)
    common = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    d = description
    if isinstance(d, GPTConfig):
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": d.vocab_size,
            "n_positions": d.block_size,
            "n_embd": d.n_embd,
            "n_layer": d.n_layer,
            "n_head": d.n_head,
            "n_inner": None,  # 4 · n_embd
            "activation_function": "gelu_new",
            "layer_norm_epsilon": GPT_NORM_EPS,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            # civetta trains without dropout; so does the exported model when trained further.
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "tie_word_embeddings": d.tie_embeddings,
            "dtype": dtype.name,
            **common,
        }
    return _llama_family_config(d, dtype) | common


def _llama_family_config(d: LlamaConfig, dtype: np.dtype) -> dict[str, Any]:
    """LlamaForCausalLM's keys, with Mixtral's (`moe`) or Qwen3's (`qk_norm`) where they apply."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": d.vocab_size,
        "max_position_embeddings": d.block_size,
        "hidden_size": d.n_embd,
        "intermediate_size": d.ffn_hidden,
        "num_hidden_layers": d.n_layer,
        "num_attention_heads": d.n_head,
        "num_key_value_heads": d.n_kv_head,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": d.norm_eps,
        # transformers 5 reads rope_parameters; before 5 it read rope_theta: write both.
        "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},
        "rope_theta": d.rope_theta,
        "tie_word_embeddings": d.tie_embeddings,
        "dtype": dtype.name,
    }
    if d.moe is not None:
        del config["mlp_bias"]  # Mixtral's experts have no bias key
        return config | {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": d.moe.ffn_hidden,
            "num_local_experts": d.moe.experts,
            "num_experts_per_tok": d.moe.top_k,
            # The coefficient as civetta's; HF's loss it weighs is top_k times civetta's and
            # pools the layers (see tests/test_moe_parity.py), and counts only with
            # output_router_logits, which stays off.
            "router_aux_loss_coef": d.moe.aux_loss_coef,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }
    if d.qk_norm:
        del config["mlp_bias"]
        return config | {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": d.n_layer,
            "layer_types": ["full_attention"] * d.n_layer,
        }
    return config


def to_hf(
    description: ModelDescription, weights: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, tensors by transformers name) from the full weights by civetta name (an
    `lm_head.weight` beside a tied table is the table again, and is dropped)."""
    check_expressible(description)
    shapes = parameter_shapes(description)
    given = {n: a for n, a in weights.items() if n in shapes}
    for name, shape in shapes.items():
        if name not in given:
            raise HFError(f"the weights have no {name!r}")
        if tuple(given[name].shape) != shape:
            raise HFError(f"{name!r} expected shape {shape}, got {tuple(given[name].shape)}")
    extra = sorted(set(weights) - set(shapes) - {"lm_head.weight"})
    if extra:
        raise HFError(f"{extra[0]!r} is not a parameter of the model")
    dtype = np.result_type(*given.values())
    tensors = {name: _to_file_layout(description, name, a) for name, a in given.items()}
    return hf_config(description, dtype), tensors


def _to_file_layout(description: ModelDescription, name: str, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T if _is_conv1d(description, name) else array)


def write(directory: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Write `config.json` and `model.safetensors` into `directory`. Both go into a temporary
    sibling that then replaces `directory`, so a failure leaves an earlier export as it was.
    A directory holding anything else is refused rather than replaced."""
    directory = Path(directory)
    _check_replaceable(directory)
    target = directory.resolve()  # `--out .` too has a parent and a name
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{target.name}.partial-{os.getpid()}"
    retired = parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write_durably(staging / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        _fsync(staging / WEIGHTS_FILE)
        _fsync(staging)
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
        _fsync(parent)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise HFError(f"{str(directory)!r} could not be written: {e.strerror or e}") from None
    shutil.rmtree(retired, ignore_errors=True)


def _check_replaceable(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise HFError(f"{str(directory)!r} exists and is not a directory")
    others = sorted(
        p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE)
    )
    if others:
        raise HFError(
            f"{str(directory)!r} holds {others[0]!r}, which is not part of an export "
            "(give a new directory, or an earlier export's)"
        )


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- Hugging Face → civetta -------------------------------------------------------------------
def read_config(directory: Path) -> dict[str, Any]:
    """The parsed config.json of `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HFError(f"{str(directory)!r} is not a directory")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise HFError(f"{str(directory)!r} holds no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{str(path)!r} cannot be read as JSON: {e}") from None
    if not isinstance(config, dict):
        raise HFError(f"{str(path)!r} expected a JSON object, got {type(config).__name__}")
    return config


def description_from_config(config: dict[str, Any], where: str = CONFIG_FILE) -> ModelDescription:
    """The civetta model a transformers config.json describes, or one line on why civetta
    cannot run it; `where` names the file in messages."""
    kind = config.get("model_type")
    reader = READERS.get(str(kind))
    if reader is None:
        wanted = ", ".join(json.dumps(k) for k in list(READERS)[:-1])
        raise HFError(
            f"{where}: model_type expected {wanted} or {json.dumps(list(READERS)[-1])}, "
            f"got {_json(kind)}"
        )
    try:
        return reader(_Keys(config, where))
    except ValueError as e:  # the description's own checks (heads dividing the width, ...)
        if isinstance(e, HFError):
            raise
        raise HFError(f"{where}: {e}") from None


@dataclasses.dataclass
class _Keys:
    """Typed access to a config.json's keys, each error naming the file and the key."""

    config: dict[str, Any]
    where: str

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key, default)
        if value is None and default is not None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HFError(f"{self.where}: {key} expected a positive integer, got {_json(value)}")
        return value

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise HFError(f"{self.where}: {key} expected a positive number, got {_json(value)}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if not isinstance(value, bool):
            raise HFError(f"{self.where}: {key} expected true or false, got {_json(value)}")
        return value

    def expect(self, key: str, wanted: Any, default: Any, text: str | None = None) -> None:
        """Refuse a key whose value civetta's model does not compute with."""
        value = self.config.get(key, default)
        allowed = wanted if isinstance(wanted, tuple) else (wanted,)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            shown = text or " or ".join(json.dumps(a) for a in allowed)
            raise HFError(f"{self.where}: {key} expected {shown}, got {_json(value)}")


def _json(value: Any) -> str:
    """A config.json value as the file writes it: "silu", true, null, 1e-05."""
    return json.dumps(value)


def _gpt2_description(keys: _Keys) -> GPTConfig:
    embd = keys.integer("n_embd")
    keys.expect("activation_function", GPT2_ACTIVATIONS, "gelu_new")
    keys.expect("n_inner", (None, 4 * embd), None, text=f"null or {4 * embd} (4 · n_embd)")
    keys.expect("layer_norm_epsilon", GPT_NORM_EPS, GPT_NORM_EPS)
    keys.expect("scale_attn_weights", True, True)
    keys.expect("scale_attn_by_inverse_layer_idx", False, False)
    keys.expect("add_cross_attention", False, False)
    return GPTConfig(
        vocab_size=keys.integer("vocab_size"),
        block_size=keys.integer("n_positions", keys.config.get("n_ctx")),
        n_layer=keys.integer("n_layer"),
        n_head=keys.integer("n_head"),
        n_embd=embd,
        tie_embeddings=keys.flag("tie_word_embeddings", True),
        bias=True,
    )


def _llama_description(keys: _Keys) -> LlamaConfig:
    keys.expect("mlp_bias", False, False)
    return LlamaConfig(**_llama_fields(keys, head_dim=None))


def _mixtral_description(keys: _Keys) -> LlamaConfig:
    """MixtralForCausalLM: a Llama whose MLPs are sparse (dropless, no shared experts)."""
    keys.expect("sliding_window", None, None)
    keys.expect("router_jitter_noise", (0, 0.0), 0.0, text="0.0 (civetta routes without noise)")
    coef = keys.config.get("router_aux_loss_coef", MIXTRAL_AUX_LOSS_COEF)
    if isinstance(coef, bool) or not isinstance(coef, int | float) or not coef >= 0:
        raise HFError(
            f"{keys.where}: router_aux_loss_coef expected a number >= 0, got {_json(coef)}"
        )
    moe = MoEConfig(
        experts=keys.integer("num_local_experts", 8),
        top_k=keys.integer("num_experts_per_tok", 2),
        ffn_hidden=keys.integer("intermediate_size"),
        aux_loss_coef=float(coef),
    )
    fields = _llama_fields(keys, head_dim=None)
    return LlamaConfig(**{**fields, "ffn_hidden": 0, "moe": moe})  # the dense width is unused


def _qwen3_description(keys: _Keys) -> LlamaConfig:
    """Qwen3ForCausalLM: a Llama with per-head q/k RMSNorm and its own head_dim (default 128)."""
    keys.expect("use_sliding_window", False, False)
    layer_types = keys.config.get("layer_types")
    if layer_types is not None and set(layer_types) - {"full_attention"}:
        raise HFError(
            f'{keys.where}: layer_types expected "full_attention" only, got {_json(layer_types)}'
        )
    return LlamaConfig(**_llama_fields(keys, head_dim=128), qk_norm=True)


def _llama_fields(keys: _Keys, head_dim: int | None) -> dict[str, Any]:
    """LlamaConfig's fields from the keys the Llama family shares; `head_dim`: the model
    class's default when config.json has none (None: hidden_size / num_attention_heads)."""
    keys.expect("hidden_act", "silu", "silu")
    keys.expect("attention_bias", False, False)
    heads = keys.integer("num_attention_heads")
    given = keys.config.get("head_dim", head_dim)
    return {
        "vocab_size": keys.integer("vocab_size"),
        "block_size": keys.integer("max_position_embeddings", 2048),
        "n_layer": keys.integer("num_hidden_layers"),
        "n_head": heads,
        "n_kv_head": keys.integer("num_key_value_heads", heads),
        "n_embd": keys.integer("hidden_size"),
        "head_dim": None if given is None else keys.integer("head_dim", given),
        "ffn_hidden": keys.integer("intermediate_size"),
        "rope_theta": _rope_theta(keys),
        "norm_eps": keys.number("rms_norm_eps", keys.config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": keys.flag("tie_word_embeddings", False),
    }


READERS: dict[str, Callable[[_Keys], ModelDescription]] = {
    "gpt2": _gpt2_description,
    "llama": _llama_description,
    "mixtral": _mixtral_description,
    "qwen3": _qwen3_description,
}


def _rope_theta(keys: _Keys) -> float:
    """θ of plain RoPE, from transformers 5's `rope_parameters` or the older `rope_theta` (and
    `rope_scaling`, which transformers 5 still reads first); any scaling is refused."""
    config, where = keys.config, keys.where
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(key) or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise HFError(f"{where}: {key} expected one mapping of plain RoPE, got {_json(rope)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise HFError(
            f'{where}: {key}.rope_type expected "default" (civetta runs RoPE unscaled), '
            f"got {_json(rope_type)}"
        )
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFError(f"{where}: partial_rotary_factor expected 1.0, got {_json(partial)}")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return keys.number(f"{key}.rope_theta" if "rope_theta" in rope else "rope_theta", theta)


def read_description(directory: Path) -> ModelDescription:
    """The model of the checkpoint in `directory`, from its config.json alone."""
    config = read_config(directory)
    return description_from_config(config, str(Path(directory) / CONFIG_FILE))


def read(directory: Path, load: bool = True) -> tuple[ModelDescription, dict[str, np.ndarray]]:
    """(description, full weights by civetta name in civetta's layout) of the checkpoint in
    `directory`, every tensor's name, shape and dtype checked first. With `load=False` only the
    checks run (the weights come back empty): the file's header is read, not its data."""
    directory = Path(directory)
    description = read_description(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        index = directory / f"{WEIGHTS_FILE}.index.json"
        sharded = (
            f" (it holds {index.name}: civetta reads one unsharded file)" if index.exists() else ""
        )
        raise HFError(f"{str(directory)!r} holds no {WEIGHTS_FILE}{sharded}")
    weights: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="np") as file:
            sources = _checked_sources(description, file, str(path))
            if load:
                weights = _loaded(description, file, sources)
    except HFError:
        raise
    except Exception as e:  # damaged bytes fail anywhere in safetensors' header or data
        raise HFError(f"{str(path)!r} cannot be read: {type(e).__name__}: {e}") from None
    return description, weights


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the file holds a civetta parameter: tensor `key` whole, or its part `part` (one
    expert's piece of a fused tensor)."""

    key: str
    part: tuple[int | slice, ...] = ()


def _checked_sources(description: ModelDescription, file: Any, where: str) -> dict[str, _Source]:
    """civetta name → where the file holds it, after checking the file holds every tensor
    needed, in the right shape and a float dtype, and nothing else but buffers and a tied head."""
    available = set(file.keys())
    sources, shapes = _sources(description, available)
    for key, wanted in shapes.items():
        if key not in available:
            raise HFError(f"{where}: tensor {key!r} is missing")
        shape = tuple(file.get_slice(key).get_shape())
        if shape != wanted:
            raise HFError(f"{where}: tensor {key!r} expected shape {wanted}, got {shape}")
        dtype = file.get_slice(key).get_dtype()
        if dtype not in DTYPES:
            raise HFError(f"{where}: tensor {key!r} expected F16, F32 or F64, got {dtype}")
    tied_head = {"lm_head.weight"} if description.tie_embeddings else set()  # transformers ties
    extra = sorted(k for k in available - set(shapes) - tied_head if not k.endswith(BUFFERS))
    if extra:
        raise HFError(
            f"{where}: tensor {extra[0]!r} is not a parameter of the model config.json describes"
        )
    return sources


def _sources(
    description: ModelDescription, available: set[str]
) -> tuple[dict[str, _Source], dict[str, tuple[int, ...]]]:
    """(civetta name → source, file tensor → the shape it must have) for a file holding the
    tensors `available` (whose names decide between the naming schemes a model may have)."""
    shapes = parameter_shapes(description)
    base_only = isinstance(description, GPTConfig) and not any(
        k.startswith("transformer.") for k in available
    )
    sources: dict[str, _Source] = {}
    wanted: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        # GPT2Model checkpoints name the base model's tensors bare.
        key = name.removeprefix("transformer.") if base_only else name
        sources[name] = _Source(key)
        wanted[key] = shape[::-1] if _is_conv1d(description, name) else shape
    if isinstance(description, LlamaConfig) and description.moe is not None:
        for i in range(description.n_layer):
            if f"model.layers.{i}.mlp.gate.weight" in available:
                _fused_experts(description, i, sources, wanted)
    return sources, wanted


def _fused_experts(
    description: LlamaConfig,
    layer: int,
    sources: dict[str, _Source],
    wanted: dict[str, tuple[int, ...]],
) -> None:
    """Point layer `layer`'s MoE parameters at transformers 5's fused tensors: the router
    `mlp.gate.weight`, `mlp.experts.gate_up_proj` (E, 2F, C) holding each expert's w1 rows then
    its w3 rows, and `mlp.experts.down_proj` (E, C, F) holding each w2."""
    assert description.moe is not None
    e, f, c = description.moe.experts, description.moe.ffn_hidden, description.n_embd
    classic, fused = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
    for name in [n for n in sources if n.startswith(classic + ".")]:
        del wanted[sources.pop(name).key]
    router, gate_up, down = (
        f"{fused}.gate.weight",
        f"{fused}.experts.gate_up_proj",
        f"{fused}.experts.down_proj",
    )
    sources[f"{classic}.gate.weight"] = _Source(router)
    wanted |= {router: (e, c), gate_up: (e, 2 * f, c), down: (e, c, f)}
    for j in range(e):
        expert = f"{classic}.experts.{j}"
        sources[f"{expert}.w1.weight"] = _Source(gate_up, (j, slice(0, f)))
        sources[f"{expert}.w3.weight"] = _Source(gate_up, (j, slice(f, 2 * f)))
        sources[f"{expert}.w2.weight"] = _Source(down, (j,))


def _loaded(
    description: ModelDescription, file: Any, sources: dict[str, _Source]
) -> dict[str, np.ndarray]:
    """Every parameter's array from the file, each file tensor read once."""
    tensors: dict[str, np.ndarray] = {}
    weights = {}
    for name, source in sources.items():
        if source.key not in tensors:
            tensors[source.key] = file.get_tensor(source.key)
        array = tensors[source.key][source.part]
        weights[name] = _from_file(description, name, array)
    return weights


def _is_conv1d(description: ModelDescription, name: str) -> bool:
    return isinstance(description, GPTConfig) and name.endswith(CONV1D)


def _from_file(description: ModelDescription, name: str, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T if _is_conv1d(description, name) else array)


def differences(ours: ModelDescription, theirs: ModelDescription) -> tuple[str, Any, Any] | None:
    """The first key (model.kind, then the family's fields in order, a nested section's as
    `moe.top_k`) on which two models differ, as (key, ours, theirs); None when they are the
    same model. A mixture of experts' dense `ffn_hidden` computes nothing and is not compared."""
    if type(ours) is not type(theirs):
        return "kind", _kind(ours), _kind(theirs)
    return _first_difference(ours, theirs, "")


def _first_difference(ours: Any, theirs: Any, prefix: str) -> tuple[str, Any, Any] | None:
    sparse = getattr(ours, "moe", None) is not None and getattr(theirs, "moe", None) is not None
    for f in dataclasses.fields(ours):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if sparse and f.name == "ffn_hidden":
            continue
        if dataclasses.is_dataclass(a) and type(a) is type(b):
            nested = _first_difference(a, b, f"{prefix}{f.name}.")
            if nested is not None:
                return nested
            continue
        close = isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12)
        same = close or a == b
        if not same:
            return f"{prefix}{f.name}", a, b
    return None


def _kind(description: ModelDescription) -> str:
    return next(kind for kind, family in FAMILIES.items() if isinstance(description, family))
