"""Time per op kind of civetta's forward and backward: where a training step's time goes.

`OpTimer` wraps, for the duration of a `with` block, every public function of `civetta.axioms`
and `civetta.fused` (the module attributes the models call through) and each backward closure
those ops hand to `make_node`. Forward times are exclusive (an op's time without the ops it
calls: `scaled_dot_product_attention` is its own mask and scaling, its matmuls and softmax are
theirs); a backward closure's time goes to the op that built the node. Backward time outside
every closure (ordering the graph, summing gradients) is reported as the engine's.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from civetta import axioms, fused

MODULES: tuple[ModuleType, ...] = (axioms, fused)


class OpTimer:
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # wall time, or CPU time (`bench_step --clock cpu`)
        self.forward: dict[str, float] = defaultdict(float)
        self.backward: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._children: list[float] = []  # per open forward call: time spent in callees

    def _timed_forward(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self.clock() - start
                inner = self._children.pop()
                self.forward[name] += elapsed - inner
                self.calls[name] += 1
                if self._children:
                    self._children[-1] += elapsed

        return wrapper

    def _timed_make_node(self, make_node: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(
            data: Any, parents: Any, backward: Callable[..., Any], *a: Any, **k: Any
        ) -> Any:
            name = sys._getframe(1).f_code.co_name  # the op that builds the node
            if name == "backward":  # a node built inside a backward (recomputation)
                name = "recompute"

            def timed(g: Any) -> Any:
                start = self.clock()
                try:
                    return backward(g)
                finally:
                    self.backward[name] += self.clock() - start

            return make_node(data, parents, timed, *a, **k)

        return wrapper

    @contextlib.contextmanager
    def active(self) -> Iterator[OpTimer]:
        saved: list[tuple[ModuleType, str, Any]] = []
        for module in MODULES:
            for name, fn in list(vars(module).items()):
                public = inspect.isfunction(fn) and not name.startswith("_")
                if public and fn.__module__ == module.__name__:
                    saved.append((module, name, fn))
                    setattr(module, name, self._timed_forward(name, fn))
            saved.append((module, "make_node", module.make_node))
            module.make_node = self._timed_make_node(module.make_node)
        try:
            yield self
        finally:
            for module, name, fn in reversed(saved):
                setattr(module, name, fn)

    def report(self, steps: int, forward_s: float, backward_s: float) -> list[str]:
        """Lines of a table: per op kind, calls and ms per step, sorted by total time."""
        kinds = sorted(
            set(self.forward) | set(self.backward),
            key=lambda k: -(self.forward.get(k, 0.0) + self.backward.get(k, 0.0)),
        )
        ms = 1e3 / steps
        lines = [f"  {'op':<30}{'calls':>6}{'forward ms':>12}{'backward ms':>13}"]
        for kind in kinds:
            f, b = self.forward.get(kind, 0.0) * ms, self.backward.get(kind, 0.0) * ms
            calls = self.calls.get(kind, 0) // steps
            lines.append(f"  {kind:<30}{calls:>6}{f:>12.1f}{b:>13.1f}")
        outside_f = forward_s * ms - sum(self.forward.values()) * ms
        outside_b = backward_s * ms - sum(self.backward.values()) * ms
        lines.append(f"  {'(model code / engine)':<30}{'':>6}{outside_f:>12.1f}{outside_b:>13.1f}")
        return lines
