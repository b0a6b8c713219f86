"""The engine's fixed cost per op: a chain of tiny adds, forward and backward, in µs per op.

    python benchmarks/bench_op_overhead.py [--ops 2000] [--repeats 7] [--clock wall|cpu]

On 4-element float32 arrays numpy's own work is a fraction of a microsecond, so the time is the
engine's: building the node (operand checks, `make_node`, the closure) and, in backward, the
walk that orders the graph, calls each closure and accumulates the gradients. The chain
x_{i+1} = x_i + w adds a leaf that needs a gradient at every op, so every backward step also
accumulates into w's gradient. Printed: the median over repeats of forward, backward and their
sum per op, and numpy's bare `a + b` on the same arrays for scale; with PyTorch installed (the
test extra), the same chain in PyTorch eager, alternating; and, for the floor of a walk in
Python, the same graph's backward by a bare loop (pop the next node, call its closure, pass on or
sum its gradients) without the engine's checks, regions, meters or leaf handling. Floor: <= 2 µs
per op.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import time

import numpy as np

from civetta import axioms as ax
from civetta.tensor import Tensor

# Wall time, or with `--clock cpu` this thread's CPU time: on a machine shared with other jobs,
# the time the OS gave the core to them is left out.
clock = time.perf_counter


def chain_seconds(ops: int) -> tuple[float, float]:
    """Seconds of forward and of backward for `ops` chained adds."""
    x = Tensor(np.ones(4, np.float32), requires_grad=True)
    w = Tensor(np.full(4, 0.5, np.float32), requires_grad=True)
    t0 = clock()
    h = x
    for _ in range(ops):
        h = ax.add(h, w)
    t1 = clock()
    h.backward(np.ones(4, np.float32))
    t2 = clock()
    return t1 - t0, t2 - t1


def bare_walk(root: Tensor, grad: np.ndarray) -> None:
    """The least a reverse walk in Python does per node: what `Tensor.backward` does for this
    chain, with nothing else."""
    pending: dict[Tensor, np.ndarray] = {root: grad}
    summed: set[int] = set()
    heap = [(-root._seq, root)]
    while heap:
        node = heapq.heappop(heap)[1]
        g = pending.pop(node)
        backward = node._backward
        if backward is None:
            node.grad = g
            continue
        for parent, parent_grad in zip(node._parents, backward(g), strict=True):
            previous = pending.get(parent)
            if previous is None:
                heapq.heappush(heap, (-parent._seq, parent))
                pending[parent] = parent_grad
            elif id(previous) in summed:
                previous += parent_grad
            else:
                total = previous + parent_grad
                summed.add(id(total))
                pending[parent] = total
        node._backward, node._parents = None, ()


def bare_walk_seconds(ops: int) -> float:
    x = Tensor(np.ones(4, np.float32), requires_grad=True)
    w = Tensor(np.full(4, 0.5, np.float32), requires_grad=True)
    h = x
    for _ in range(ops):
        h = ax.add(h, w)
    t0 = clock()
    bare_walk(h, np.ones(4, np.float32))
    return clock() - t0


def torch_seconds(ops: int) -> tuple[float, float]:
    """`chain_seconds` in PyTorch eager, one thread."""
    import torch

    x = torch.ones(4, requires_grad=True)
    w = torch.full((4,), 0.5, requires_grad=True)
    t0 = clock()
    h = x
    for _ in range(ops):
        h = h + w
    t1 = clock()
    h.backward(torch.ones(4))
    t2 = clock()
    return t1 - t0, t2 - t1


def numpy_seconds(ops: int) -> float:
    a, b = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    t0 = clock()
    for _ in range(ops):
        a = a + b
    return clock() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    with_torch = importlib.util.find_spec("torch") is not None
    if with_torch:
        import torch

        torch.set_num_threads(1)
        torch_seconds(args.ops)  # warm-up
    chain_seconds(args.ops)  # warm-up
    forward, backward, bare, walks, torch_times = [], [], [], [], []
    for _ in range(args.repeats):  # alternating, so each sees the same machine load
        f, b = chain_seconds(args.ops)
        forward.append(f)
        backward.append(b)
        bare.append(numpy_seconds(args.ops))
        walks.append(bare_walk_seconds(args.ops))
        if with_torch:
            torch_times.append(torch_seconds(args.ops))
    per_op = 1e6 / args.ops
    f, b = float(np.median(forward)) * per_op, float(np.median(backward)) * per_op
    print(f"chain of {args.ops} adds on (4,) float32, median of {args.repeats}, {args.clock} time")
    print(f"  forward             {f:6.2f} µs/op")
    print(f"  backward            {b:6.2f} µs/op")
    print(f"  forward + backward  {f + b:6.2f} µs/op  (floor: <= 2.0)")
    print(f"  numpy a + b         {float(np.median(bare)) * per_op:6.2f} µs/op")
    print(f"  bare backward walk  {float(np.median(walks)) * per_op:6.2f} µs/op")
    if torch_times:
        tf, tb = (float(v) * per_op for v in np.median(np.array(torch_times), axis=0))
        print(f"  pytorch eager       {tf + tb:6.2f} µs/op  ({tf:.2f} forward, {tb:.2f} backward)")


if __name__ == "__main__":
    main()
