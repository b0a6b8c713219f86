"""The cost model projects whatever the model's code does: a model arranged differently from the
GPT, built from the existing modules and registered as a family, is projected with no new
cost-model code, and its projection equals what executing it counts.

The model here is a "parallel block" GPT (as GPT-J and PaLM arrange it): one LayerNorm feeds both
the attention and an MLP of twice the width (not four times), whose outputs are added to the
residual together. Its FLOPs, bytes per axis and model state are compared with executed steps:
in one process, and for tensor and data parallelism on a virtual mesh (`parallel.virtual`),
which runs every rank's arithmetic on real data and records exactly the executed ledger
(`tests/test_virtual_mesh.py` checks that against mpiexec runs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from civetta import axioms as ax
from civetta.models import STAGES
from civetta.models.gpt import GPTConfig, GPTStage
from civetta.nn import MLP, CausalSelfAttention, LayerNorm, Model, Module, merge
from launch.config import load
from launch.profiles import load_profile
from launch.simulate import workload_of
from launch.trainer import Trainer
from parallel.cost.projection import device_memory_of, project
from parallel.runtime import Runtime
from parallel.virtual import virtual_mesh

A100 = load_profile("a100-dgx")
TINY = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=32",
    "model.block_size=16",
    "model.vocab_size=256",
    "data.source=synthetic",
    "train.batch_size=4",
    "train.steps=1",
    "train.eval_batches=1",
    "train.dtype=float32",
]


@dataclasses.dataclass(frozen=True)
class ParallelBlockConfig(GPTConfig):
    mlp_ratio: int = 2

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """6 × matmul weights (4h² attention + 2·ratio·h² MLP + the head) + 12·L·h·T."""
        t, h = seq_len or self.block_size, self.n_embd
        weights = self.n_layer * (4 + 2 * self.mlp_ratio) * h * h + self.vocab_size * h
        return 6 * weights + 12 * self.n_layer * h * t


def parallel_block(name: str, c: ParallelBlockConfig, sharding: Any, **kw: Any) -> Module:
    """x + attn(ln(x)) + mlp(ln(x)): one norm, both branches side by side."""
    std = 0.02 / math.sqrt(2 * c.n_layer)
    ln = LayerNorm(f"{name}.ln", c.n_embd, bias=c.bias, dtype=kw["dtype"], store=sharding.store)
    attn = CausalSelfAttention(f"{name}.attn", c.n_embd, c.n_head, proj_std=std, sharding=sharding,
                               bias=c.bias, **kw)  # fmt: skip
    mlp = MLP(f"{name}.mlp", c.n_embd, c.mlp_ratio * c.n_embd, proj_std=std, sharding=sharding,
              bias=c.bias, **kw)  # fmt: skip

    def forward(x: Any) -> Any:
        h = ln(x)
        return ax.add(ax.add(x, attn(h)), mlp(h))

    return Module(forward, merge(ln, attn, mlp))


def parallel_stage(
    c: ParallelBlockConfig,
    layers: range,
    first: bool,
    last: bool,
    seed: int = 0,
    dtype: Any = np.float32,
    sharding: Any = None,
    recompute: str = "none",
) -> Model:
    """The GPT's ends (embeddings; final norm, head and loss: GPT stages without blocks) around
    parallel blocks. Untied embeddings, so the two ends are independent modules."""
    assert not c.tie_embeddings
    ends = {"dtype": dtype, "sharding": sharding, "seed": seed}
    embed = GPTStage(c, range(0), True, False, **ends) if first else None
    head = GPTStage(c, range(0), False, True, **ends) if last else None
    blocks = [parallel_block(f"transformer.h.{i}", c, sharding, seed=seed, dtype=dtype)
              for i in layers]  # fmt: skip

    def forward(inputs: Any, targets: Any = None) -> Any:
        x = embed(inputs) if embed else inputs
        for block in blocks:
            x = block(x)
        return head(x, targets) if head else x

    parts = [m for m in (embed, *blocks, head) if m is not None]
    return Model(forward, merge(*parts), config=c)


@pytest.fixture
def family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGES, ParallelBlockConfig, parallel_stage)


def _model(config: Any) -> ParallelBlockConfig:
    m = config.model
    return ParallelBlockConfig(
        m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, tie_embeddings=False
    )


def _executed(config: Any) -> dict[str, Any]:
    """One training step of every rank on a virtual mesh: FLOPs over the world, the busiest
    rank's ledger bytes per axis (the projection's convention: no receives, no bookkeeping), and
    each rank's model state."""
    layout, model = config.layout, _model(config)
    flops, comm, state = 0, dict.fromkeys(("tp", "pp", "dp", "cp", "ep"), 0), []
    for rank in range(layout.world_size):
        mesh = virtual_mesh(layout.dp, layout.tp, layout.pp, layout.order, rank)
        trainer = Trainer(config, Runtime(layout, mesh), model=model)
        flops += trainer.step(0).flops
        for axis in comm:
            sent = sum(
                row["bytes"]
                for row in mesh.ledger.as_list()
                if row["axis"] == axis and row["op"] != "recv" and row["phase"] != "other"
            )
            comm[axis] = max(comm[axis], sent)
        memory = trainer.memory()
        state.append({k: memory[k] for k in ("params", "grads", "optimizer")})
    return {"flops": flops, "comm": comm, "state": state}


@pytest.mark.parametrize(
    "overrides",
    [[], ["parallel.tp=2"], ["parallel.dp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"],
     ["parallel.pp=2", "train.microbatch_size=1"], ["parallel.dp=2", "parallel.zero=3"],
     ["parallel.recompute=full"]],
    ids=lambda o: "-".join(x.split("=")[0].split(".")[-1] + x.split("=")[1] for x in o) or "single",
)  # fmt: skip
def test_a_differently_arranged_model_is_projected_from_its_code(
    family: None, overrides: list[str]
) -> None:
    config = load(None, [*TINY, *overrides])
    model = _model(config)
    projected = project(model, config.layout, A100, work=workload_of(config))
    executed = _executed(config)
    assert projected.hardware_flops_per_step == executed["flops"]
    tokens = config.train.batch_size * config.model.block_size
    if config.layout.recompute == "none":
        assert projected.model_flops_per_step == model.flops_per_token() * tokens
    assert projected.comm_bytes == executed["comm"]
    # The model state of every pipeline position, and the projection's busiest GPU is one of them.
    layout, work = config.layout, workload_of(config)
    for rank, state in enumerate(executed["state"]):
        position = layout.mesh.coords_of(rank)["pp"]
        expected = device_memory_of(model, layout, position, work).as_dict()
        if layout.zero == 0:
            assert {k: expected[k] for k in state} == state
    shown = {k: projected.memory_per_gpu[k] for k in ("params", "grads", "optimizer")}
    if layout.zero == 0:
        assert shown in executed["state"]
    else:  # ZeRO-3 shards differ by their padding: the busiest rank
        assert shown == max(executed["state"], key=lambda m: sum(m.values()))


def test_the_arrangement_changes_the_projection(family: None) -> None:
    """Not the GPT's numbers under another name: the narrower MLP does less work."""
    config = load(None, TINY)
    gpt = GPTConfig(256, 16, 2, 4, 32, tie_embeddings=False)
    gpt = project(gpt, config.layout, A100, work=workload_of(config))
    other = project(_model(config), config.layout, A100, work=workload_of(config))
    assert other.model_flops_per_step < gpt.model_flops_per_step
    assert other.memory_per_gpu["params"] < gpt.memory_per_gpu["params"]


def test_a_llama_block_is_traced_with_its_grouped_kv_and_three_mlp_gemms() -> None:
    """Llama 3.1 8B at tp=8 with sequence parallelism: the traced block runs q, k, v and o with
    k and v a quarter of q's width (8 of 32 heads), the attention batched over this rank's one
    key/value group with its 4 query heads stacked (rep·T rows), and SwiGLU's gate, up and down;
    the head is one vocabulary-parallel GEMM, whose share of the model FLOPs is exactly
    V / (per-block weights + attention) of a block's."""
    from civetta.models import LlamaConfig
    from parallel.cost.trace import key_for, trace
    from parallel.layout import Layout

    c = LlamaConfig(vocab_size=128256, block_size=8192, n_layer=32, n_head=32, n_kv_head=8,
                    n_embd=4096, ffn_hidden=14336, rope_theta=500000.0)  # fmt: skip
    layout, s, tp = Layout(tp=8, sequence_parallel=True), 8192, 8
    block = trace(key_for(c, "block", layout, "bf16"))
    shapes = [(g.m, g.k, g.n, g.batch) for g in block.gemms("forward")]
    h, d = c.n_embd, c.head_dim
    assert shapes == [
        (s, h, c.n_head * d // tp, 1),  # q
        (s, h, c.n_kv_head * d // tp, 1),  # k: a quarter of q
        (s, h, c.n_kv_head * d // tp, 1),  # v
        (4 * s, d, s, 1),  # scores: 4 query heads per key/value head, 1 group on this rank
        (4 * s, s, d, 1),  # weighted values
        (s, c.n_head * d // tp, h, 1),  # o
        (s, h, c.ffn_hidden // tp, 1),  # gate
        (s, h, c.ffn_hidden // tp, 1),  # up
        (s, c.ffn_hidden // tp, h, 1),  # down
    ]
    last = trace(key_for(c, "last", layout, "bf16"))
    assert [(g.m, g.k, g.n) for g in last.gemms("forward")] == [(s, h, c.vocab_size // tp)]
    per_block = 2 * h * (c.n_head + c.n_kv_head) * d + 3 * h * c.ffn_hidden
    attention = 2 * c.n_head * d * s  # scores and values per token, as flops_per_token counts
    assert last.flops / block.flops == pytest.approx(c.vocab_size * h / (per_block + attention))
