"""Exact matmul FLOP counts of the GPT, per layer, per rank and per training step.

A GEMM (m × k) @ (k × n) costs 2·m·k·n FLOPs; its backward is two GEMMs of the same size (the
input gradient and the weight gradient), so backward = 2 × forward. Only matmuls are counted, as
Megatron-LM and PaLM count them: layer norms, softmax, GELU and adds are memory-bound work that
the cost model times from bytes, not FLOPs. Attention is counted over the full T × T score
matrix (the causal mask does not halve it), as civetta's engine and Megatron compute it.

Per layer and microbatch of b sequences of s tokens (T = b·s), hidden h:

    forward = 24·T·h² (q, k, v, output projection, two MLP matrices) + 4·T·s·h (scores, values)

Model FLOPs are forward + backward (3 × forward); hardware FLOPs add what recomputation runs
again: a whole layer forward (full) or the attention scores and values (selective).
"""

from __future__ import annotations

from dataclasses import dataclass

from civetta.models.gpt import GPTConfig

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
