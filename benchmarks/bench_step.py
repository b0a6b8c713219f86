"""Training-step speed of the single-process GPT and Llama against this machine's sgemm rate.

    python benchmarks/bench_step.py [--steps 10] [--dtype float32] [--model gpt|llama|both]

Bench configs: the GPT of configs/bench.yaml (vocab 256, block 128, 4 layers, 4 heads, n_embd
256) and the Llama of configs/models/llama-small.yaml (the same sizes, 2 key/value heads, SwiGLU
width 688), batch 16, AdamW. Prints the median time of forward, backward and optimizer, the
model FLOPs per step (`flops_per_token`: 6·N·tokens plus attention), the sgemm throughput
measured in the same run (interleaved with the steps, so both see the same machine load) and
their ratio: the model FLOPs utilisation against sgemm. With `both` the two models' steps
alternate, so their ratio is measured under the same load.

With PyTorch installed, the GPT's step alternates with PyTorch eager's step of the same model
(`benchmarks/torch_gpt.py`: the same shapes and ops, attention through
`F.scaled_dot_product_attention`), and the civetta/PyTorch ratio of the median steps is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Any

import numpy as np

from civetta.allocator import keep_freed_memory
from civetta.data import load_dataset
from civetta.meters import recording_gemms
from civetta.models import GPT, GPTConfig, Llama, LlamaConfig
from civetta.nn import Model
from civetta.optim import AdamW
from civetta.threads import batched_matmul, blas_threads, set_engine_threads

BENCH = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
LLAMA = LlamaConfig(
    vocab_size=256, block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, ffn_hidden=688
)
BATCH = 16

# The timer of every measurement: wall time, or with `--clock cpu` this process's CPU time, which
# on a machine shared with other jobs leaves out the time the OS gave the cores to them (with one
# thread per side, each side's CPU time is its own; with more it sums the threads').
clock = time.perf_counter


def sgemm_seconds(a: np.ndarray, b: np.ndarray, out: np.ndarray, repeats: int = 3) -> float:
    start = clock()
    for _ in range(repeats):
        np.matmul(a, b, out=out)
    return (clock() - start) / repeats


def timed_step(model: Model, optimizer: AdamW, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Seconds of forward, backward and optimizer for one step."""
    t0 = clock()
    loss = model(x, y)
    t1 = clock()
    loss.backward()
    t2 = clock()
    optimizer.step()
    model.zero_grad()
    t3 = clock()
    return [t1 - t0, t2 - t1, t3 - t2]


def timed_torch_step(model: Any, optimizer: Any, x: np.ndarray, y: np.ndarray) -> list[float]:
    """`timed_step` for the PyTorch reference (`torch_gpt.TorchGPT`)."""
    import torch

    idx, targets = torch.from_numpy(x), torch.from_numpy(y)
    t0 = clock()
    loss = model(idx, targets)
    t1 = clock()
    loss.backward()
    t2 = clock()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = clock()
    return [t1 - t0, t2 - t1, t3 - t2]


def torch_reference(dtype: str) -> tuple[Any, Any] | None:
    """PyTorch's bench GPT and optimizer, or None without torch."""
    if importlib.util.find_spec("torch") is None:
        return None
    from torch_gpt import torch_step_runner  # beside this script

    return torch_step_runner(BENCH, dtype)


def gemm_replay_seconds(model: Model, data: Any, repeats: int = 3) -> tuple[float, int]:
    """Seconds of the GEMMs one step runs (from `gemm_log`), replayed alone on random operands,
    and their FLOPs: the step's time if everything but its GEMMs took none."""
    x, y = data.batch("train", 0, 0, BATCH, BENCH.block_size)
    with recording_gemms() as log:
        model(x, y).backward()
    model.zero_grad()
    gemms = list(log.gemms)
    rng = np.random.default_rng(0)
    operands = [
        (rng.standard_normal((g.batch, g.m, g.k)).astype(g.dtype),
         rng.standard_normal((g.batch, g.k, g.n)).astype(g.dtype))
        for g in gemms
    ]  # fmt: skip
    totals = []
    for _ in range(repeats):
        start = clock()
        for a, b in operands:
            if a.shape[0] == 1:
                a[0] @ b[0]
            else:
                batched_matmul(a, b)
        totals.append(clock() - start)
    return float(np.median(totals)), sum(g.flops for g in gemms)


def op_breakdown(model: Model, optimizer: AdamW, data: Any, name: str, steps: int) -> str:
    """The per-op-kind table of `steps` more steps (instrumented: slower than the timed ones)."""
    from op_breakdown import OpTimer  # beside this script

    timer = OpTimer(clock)
    forward = backward = 0.0
    with timer.active():
        for step in range(steps):
            x, y = data.batch("train", 0, step, BATCH, BENCH.block_size)
            f, b, _ = timed_step(model, optimizer, x, y)
            forward, backward = forward + f, backward + b
    title = f"{name}: time per op kind, mean of {steps} instrumented steps"
    return "\n".join([title, *timer.report(steps, forward, backward)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--model", default="both", choices=["gpt", "llama", "both"])
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument(
        "--breakdown", type=int, default=3, help="steps timed per op kind after the run (0: none)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="BLAS and PyTorch threads (default: as loaded)"
    )
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="wall time or process CPU time"
    )
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    dtype = np.dtype(args.dtype)
    if args.threads is not None:
        set_engine_threads(args.threads)  # and as many BLAS threads
    keep_freed_memory()  # as `civetta train` does

    configs = {"gpt": BENCH, "llama": LLAMA}
    chosen = list(configs) if args.model == "both" else [args.model]
    builders = {"gpt": GPT, "llama": Llama}
    models = {name: builders[name](configs[name], seed=0, dtype=dtype) for name in chosen}
    optimizers = {name: AdamW(m.params, lr=1e-3) for name, m in models.items()}
    reference = None if args.no_torch or "gpt" not in chosen else torch_reference(args.dtype)
    if reference is not None and args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    data = load_dataset("stdlib", seed=0)
    n = 2048  # a square GEMM large enough to reach the BLAS peak
    a, b = (np.random.default_rng(i).standard_normal((n, n)).astype(dtype) for i in (0, 1))
    out = np.empty((n, n), dtype)

    phases = {name: [] for name in chosen}  # per step: [forward, backward, optimizer]
    torch_phases: list[list[float]] = []
    gemm: list[float] = []
    for step in range(args.steps + 2):  # two warm-up steps
        x, y = data.batch("train", 0, step, BATCH, BENCH.block_size)
        runs = [*chosen, *(["torch"] if reference is not None else [])]
        # Alternating: every side sees the same machine load; the order turns each step, so
        # no side always runs right after the same neighbour (or the sgemm's cache sweep).
        shift = step % len(runs)
        for name in runs[shift:] + runs[:shift]:
            if name == "torch":
                assert reference is not None
                times = timed_torch_step(*reference, x, y)
                if step >= 2:
                    torch_phases.append(times)
                continue
            times = timed_step(models[name], optimizers[name], x, y)
            if step >= 2:
                phases[name].append(times)
        gemm.append(sgemm_seconds(a, b, out))
    gemm_rate = 2 * n**3 / float(np.median(gemm[2:]))
    tokens = BATCH * BENCH.block_size
    steps = {}
    for name in chosen:
        config, table = configs[name], np.array(phases[name])
        step_time = float(np.median(table.sum(axis=1)))
        steps[name] = step_time
        model_flops = config.flops_per_token() * tokens
        achieved = model_flops / step_time
        print(f"{name}: {config}, batch {BATCH}, {args.dtype}, {config.num_parameters():,} params")
        for label, value in zip(
            ("forward", "backward", "optimizer"), np.median(table, axis=0), strict=True
        ):
            print(f"  {label:<10} {value * 1e3:8.1f} ms")
        print(f"  {'step':<10} {step_time * 1e3:8.1f} ms  ({tokens / step_time:,.0f} tokens/s)")
        print(f"  model FLOPs per step    {model_flops / 1e9:8.2f} GFLOP")
        print(f"  achieved                {achieved / 1e9:8.1f} GFLOP/s")
        print(f"  MFU against gemm        {achieved / gemm_rate:8.3f}  (floor: >= 0.75)")
    gemm_name = f"{'s' if dtype == np.float32 else 'd'}gemm {n}x{n}x{n}, {blas_threads()} thr"
    replay = {name: gemm_replay_seconds(models[name], data) for name in chosen}
    print(f"{gemm_name:<25} {gemm_rate / 1e9:8.1f} GFLOP/s")
    for name, (seconds, flops) in replay.items():
        ceiling = flops / seconds / gemm_rate
        print(  # the MFU of a step that spent no time outside its GEMMs
            f"{name}: its GEMMs alone {seconds * 1e3:6.1f} ms, MFU ceiling at them {ceiling:.3f}"
        )
    if len(steps) == 2:
        print(f"llama step / gpt step     {steps['llama'] / steps['gpt']:8.2f}")
    if args.breakdown:
        for name in chosen:
            print(op_breakdown(models[name], optimizers[name], data, name, args.breakdown))
    if torch_phases:
        import torch

        table = np.array(torch_phases)
        torch_step = float(np.median(table.sum(axis=1)))
        threads = torch.get_num_threads()
        print(f"pytorch {torch.__version__} eager, same GPT, {threads} threads (alternating)")
        for label, value in zip(
            ("forward", "backward", "optimizer"), np.median(table, axis=0), strict=True
        ):
            print(f"  {label:<10} {value * 1e3:8.1f} ms")
        print(f"  {'step':<10} {torch_step * 1e3:8.1f} ms")
        # The same model FLOPs over PyTorch's step: its MFU by civetta's yardstick.
        torch_mfu = BENCH.flops_per_token() * tokens / torch_step / gemm_rate
        print(f"  MFU against gemm        {torch_mfu:8.3f}")
        print(f"civetta gpt step / pytorch step {steps['gpt'] / torch_step:8.3f}  (floor: <= 1.0)")


if __name__ == "__main__":
    main()
