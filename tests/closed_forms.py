"""The papers' closed forms of the GPT's costs: independent checks of the traced projection.

The cost model counts what the model's code does (`parallel.cost.trace`); these formulas restate
the GPT by hand, as Narayanan et al. 2021 (Eq. 3), Korthikanti et al. 2022 (§4, Table 2) and the
ZeRO paper do, so the tests can hold the two against each other. Nothing in the product imports
this file.
"""

from __future__ import annotations

from dataclasses import dataclass

from civetta.models.gpt import GPTConfig
from parallel.cost.memory import element_bytes

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Gemm:
    """`batch` independent (m × k) @ (k × n) products in one kernel."""

    name: str
    m: int
    k: int
    n: int
    batch: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.batch

    def nbytes(self, element_bytes: int) -> int:
        """Bytes read and written once: both operands and the result."""
        return element_bytes * self.batch * (self.m * self.k + self.k * self.n + self.m * self.n)

    def backward(self) -> tuple[Gemm, Gemm]:
        """(input gradient, weight gradient) GEMMs: dX = dY·Wᵀ, dW = Xᵀ·dY."""
        return (
            Gemm(f"{self.name}.dgrad", self.m, self.n, self.k, self.batch),
            Gemm(f"{self.name}.wgrad", self.k, self.m, self.n, self.batch),
        )


def layer_gemms(config: GPTConfig, microbatch: int, seq_len: int, tp: int = 1) -> list[Gemm]:
    """Forward GEMMs of one transformer block on one tensor-parallel rank (heads split by tp)."""
    h, heads = config.n_embd, config.n_head
    tokens = microbatch * seq_len
    head_dim = h // heads
    local_heads = heads // tp
    return [
        Gemm("attn.c_attn", tokens, h, 3 * h // tp),
        Gemm("attn.scores", seq_len, head_dim, seq_len, microbatch * local_heads),
        Gemm("attn.values", seq_len, seq_len, head_dim, microbatch * local_heads),
        Gemm("attn.c_proj", tokens, h // tp, h),
        Gemm("mlp.c_fc", tokens, h, 4 * h // tp),
        Gemm("mlp.c_proj", tokens, 4 * h // tp, h),
    ]


ATTENTION_CORE = ("attn.scores", "attn.values")  # what selective recomputation runs again


def head_gemm(config: GPTConfig, microbatch: int, seq_len: int, tp: int = 1) -> Gemm:
    """The logits GEMM on one rank (vocabulary split by tp)."""
    return Gemm("lm_head", microbatch * seq_len, config.n_embd, config.vocab_size // tp)


def layer_forward_flops(config: GPTConfig, microbatch: int, seq_len: int) -> int:
    """24·T·h² + 4·T·s·h for one block and one microbatch, unsplit."""
    return sum(g.flops for g in layer_gemms(config, microbatch, seq_len))


def recompute_flops(config: GPTConfig, microbatch: int, seq_len: int, recompute: str) -> int:
    """Extra forward FLOPs of one block and one microbatch that recomputation runs again."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if recompute == "none":
        return 0
    gemms = layer_gemms(config, microbatch, seq_len)
    if recompute == "selective":
        gemms = [g for g in gemms if g.name in ATTENTION_CORE]
    return sum(g.flops for g in gemms)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step over the whole global batch (all GPUs together)."""

    model: int  # forward + backward
    hardware: int  # model + recomputation

    def per_token(self, tokens: int) -> tuple[float, float]:
        return self.model / tokens, self.hardware / tokens


def step_flops(
    config: GPTConfig, sequences: int, seq_len: int | None = None, recompute: str = "none"
) -> StepFlops:
    """Model and hardware FLOPs of one step on `sequences` sequences of `seq_len` tokens."""
    s = seq_len or config.block_size
    layer = layer_forward_flops(config, sequences, s)
    head = head_gemm(config, sequences, s).flops
    model = 3 * (config.n_layer * layer + head)
    extra = config.n_layer * recompute_flops(config, sequences, s, recompute)
    return StepFlops(model=model, hardware=model + extra)


def megatron_flops(config: GPTConfig, sequences: int, seq_len: int | None = None) -> float:
    """Eq. 3 of Narayanan et al. 2021: 96·B·s·l·h²·(1 + s/6h + V/16lh), which assumes full
    recomputation; equal to `step_flops(..., recompute="full").hardware`."""
    s = seq_len or config.block_size
    b, layers, h, v = sequences, config.n_layer, config.n_embd, config.vocab_size
    return 96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))


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
