"""Memory per GPU by category: parameters, gradients, optimizer state and activations.

Model state (bytes per parameter):

- mixed precision (bf16/fp16): 2 (half weights) + 2 (half gradients) + 12 for Adam (fp32 master
  weights, first and second moments) or 4 for SGD without momentum (the fp32 master): the
  "16 bytes per parameter" of ZeRO (Rajbhandari et al. 2020);
- float32 / float64: 4 / 8 for weights and gradients, 2 states for Adam, none for plain SGD.

ZeRO shards over the data-parallel group: stage 1 the optimizer state, stage 2 also the
gradients, stage 3 also the weights.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", §4): with 2-byte activations and 1-byte dropout masks a block stores
s·b·h·(34 + 5·a·s/h) bytes; with tensor parallelism the 10·s·b·h of layer norms, dropout masks
and block inputs stay replicated unless sequence parallelism splits them as well. Selective
recomputation drops the 5·a·s/h term (scores, softmax, its dropout), full recomputation keeps only
the block input. For other dtypes the same tensors are counted at the dtype's size (masks stay one
byte). A pipeline's first stage holds the activations of the microbatches in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from civetta.models.gpt import GPTConfig

HALF = ("bf16", "fp16")
ELEMENT_BYTES = {"float64": 8, "float32": 4, "tf32": 4, "bf16": 2, "fp16": 2}


def element_bytes(dtype: str) -> int:
    return ELEMENT_BYTES[dtype]


def state_bytes_per_param(dtype: str, optimizer: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter before any ZeRO sharding."""
    if dtype in HALF:
        master = 4  # fp32 copy the optimizer updates
        return 2, 2, master + (8 if optimizer == "adamw" else 0)
    e = element_bytes(dtype)
    return e, e, (2 * e if optimizer == "adamw" else 0)


# ---- parameters on one rank ---------------------------------------------------------------------
def block_params_per_rank(config: GPTConfig, tp: int) -> int:
    """One block's parameters on one tensor-parallel rank: weights and column-parallel biases
    split by tp; row-parallel biases and layer norms replicated."""
    h, bias = config.n_embd, int(config.bias)
    weights = 12 * h * h // tp
    split_biases = bias * (3 * h + 4 * h) // tp
    replicated = bias * (h + h) + 2 * h * (1 + bias)
    return weights + split_biases + replicated


def device_params(config: GPTConfig, tp: int, pp: int, device: int) -> int:
    """Parameters on one rank of pipeline position `device` (0 = first).

    The first device holds the token (vocabulary-parallel) and position embeddings; the last the
    final layer norm and the head; with tied embeddings and pp > 1 the last device keeps its own
    copy of the token embedding for the head, as Megatron-LM does.
    """
    h, bias = config.n_embd, int(config.bias)
    count = (config.n_layer // pp) * block_params_per_rank(config, tp)
    token_embedding = config.vocab_size * h // tp
    if device == 0:
        count += token_embedding + config.block_size * h
    if device == pp - 1:
        count += h * (1 + bias)  # ln_f
        if not config.tie_embeddings or pp > 1:
            count += token_embedding
    return count


def block_tensors(config: GPTConfig, tp: int, index: int) -> list[tuple[str, int]]:
    """(name, elements) of block `index`'s parameters on one tensor-parallel rank, in the
    model's order (`civetta.models.gpt`)."""
    h, bias = config.n_embd, config.bias
    prefix = f"transformer.h.{index}"

    def linear(name: str, rows: int, cols: int, bias_size: int) -> list[tuple[str, int]]:
        weight = [(f"{prefix}.{name}.weight", rows * cols)]
        return weight + ([(f"{prefix}.{name}.bias", bias_size)] if bias else [])

    def norm(name: str) -> list[tuple[str, int]]:
        return [(f"{prefix}.{name}.weight", h)] + ([(f"{prefix}.{name}.bias", h)] if bias else [])

    return [
        *norm("ln_1"),
        *linear("attn.c_attn", 3 * h // tp, h, 3 * h // tp),  # column-parallel
        *linear("attn.c_proj", h, h // tp, h),  # row-parallel: the bias stays whole
        *norm("ln_2"),
        *linear("mlp.c_fc", 4 * h // tp, h, 4 * h // tp),
        *linear("mlp.c_proj", h, 4 * h // tp, h),
    ]


def device_tensors(
    config: GPTConfig, tp: int, pp: int, device: int, virtual_stages: int = 1
) -> list[tuple[str, int]]:
    """(name, elements) of every parameter one rank holds at pipeline position `device`, in the
    order the trainer merges its stages (the order gradient buckets are planned in). A tied
    head on a last stage that is not the first holds its own copy of the token embedding."""
    h = config.n_embd
    stages = pp * virtual_stages
    per_stage = config.n_layer // stages
    token = config.vocab_size * h // tp
    out: list[tuple[str, int]] = []
    for stage in range(device, stages, pp):
        if stage == 0:
            out += [
                ("transformer.wte.weight", token),
                ("transformer.wpe.weight", config.block_size * h),
            ]
        for index in range(stage * per_stage, (stage + 1) * per_stage):
            out += block_tensors(config, tp, index)
        if stage == stages - 1:
            out.append(("transformer.ln_f.weight", h))
            if config.bias:
                out.append(("transformer.ln_f.bias", h))
            if not config.tie_embeddings:
                out.append(("lm_head.weight", token))
            elif stage != 0:
                out.append(("transformer.wte.weight", token))
    return out


# ---- activations --------------------------------------------------------------------------------
def block_activation_bytes(
    config: GPTConfig,
    microbatch: int,
    seq_len: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
    dtype: str = "bf16",
) -> float:
    """Bytes one block keeps for backward for one microbatch on one rank (Korthikanti §4)."""
    e = element_bytes(dtype)
    sbh = seq_len * microbatch * config.n_embd
    scores = config.n_head * seq_len * seq_len * microbatch  # a·s²·b
    # Block input (LN1 in), LN2 in, attention and MLP inputs are e bytes each; two dropout masks.
    replicated = (4 * e + 2) * sbh
    replicated = replicated / tp if sequence_parallel else replicated
    if recompute == "full":
        return e * sbh / (tp if sequence_parallel else 1)
    split = 12 * e * sbh / tp  # q, k, v, attention output, GELU in, fc2 in (4h wide twice)
    if recompute == "selective":
        return replicated + split
    return replicated + split + (2 * e + 1) * scores / tp  # softmax out, mask, dropout out


def in_flight_layers(
    n_layer: int, pp: int, microbatches: int, schedule: str, virtual_stages: int = 1
) -> float:
    """Block-microbatches whose activations the first pipeline device holds at its peak."""
    if pp == 1:
        return n_layer  # gradient accumulation: one microbatch through all blocks at a time
    per_device = n_layer / pp
    if schedule == "gpipe":
        return per_device * microbatches
    if schedule == "interleaved-1f1b":
        # Warm-up of (v + 1)·p - 1 chunk-microbatches of L/(p·v) blocks: L·(1 + (p-1)/(p·v)).
        chunks = min((virtual_stages + 1) * pp - 1, microbatches * virtual_stages)
        return chunks * n_layer / (pp * virtual_stages)
    return per_device * min(pp, microbatches)  # 1f1b, zb-h1


@dataclass(frozen=True)
class MemoryPerGPU:
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def device_memory(
    config: GPTConfig,
    *,
    device: int,
    dp: int,
    tp: int,
    pp: int,
    microbatch: int,
    microbatches: int,
    seq_len: int,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    sequence_parallel: bool = False,
    zero: int = 0,
    recompute: str = "none",
    dtype: str = "bf16",
    optimizer: str = "adamw",
) -> MemoryPerGPU:
    """Peak memory of one GPU at pipeline position `device`, by category."""
    count = device_params(config, tp, pp, device)
    w, g, o = state_bytes_per_param(dtype, optimizer)
    params, grads, opt = count * w, count * g, count * o
    if zero >= 1:
        opt = ceil_div(opt, dp)
    if zero >= 2:
        grads = ceil_div(grads, dp)
    if zero >= 3:
        params = ceil_div(params, dp)
    per_block = block_activation_bytes(
        config, microbatch, seq_len, tp, sequence_parallel, recompute, dtype
    )
    layers = in_flight_layers(config.n_layer, pp, microbatches, schedule, virtual_stages)
    acts = per_block * layers
    if recompute != "none":
        # The block being recomputed rebuilds what the stored input does not hold.
        full = block_activation_bytes(
            config, microbatch, seq_len, tp, sequence_parallel, "none", dtype
        )
        acts += full - per_block
    if device == pp - 1:
        # fp32 logits of one microbatch for the loss (vocabulary split by tp).
        acts += 4 * microbatch * seq_len * config.vocab_size / tp
    return MemoryPerGPU(params, grads, opt, int(acts))
