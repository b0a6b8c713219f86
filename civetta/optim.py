"""Optimizers, global gradient-norm clipping and learning-rate schedules.

Optimizers update weights outside the graph, in place on ``param.data``, and address parameters
by their dotted names (the names of ``Module.params``), never through the model. Every update is
purely elementwise per parameter: applying it to a shard of a parameter gives bitwise the slice
of the full update, which is what lets ZeRO shard optimizer state across data-parallel ranks.

Clipping is split in two (``grad_sq_norm`` then ``clip_coefficient``) so distributed code can sum
the squared norms of its shards across ranks in between.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from civetta import compiled, meta
from civetta.tensor import Tensor
from civetta.threads import run_blocked

NoDecay = Callable[[str], bool]

# Embedding tables as a whole name component (nanoGPT's `transformer.wte.weight`), so that a
# name merely containing the letters "wte" is not caught.
_EMBEDDING_PART = re.compile(r"(^|\.)(wte|wpe)(\.|$)")


class StateDictError(ValueError):
    """An optimizer state that does not fit the optimizer it is loaded into."""


def default_no_decay(name: str) -> bool:
    """True for parameters that weight decay must not shrink.

    Biases (names ending in ``.bias``), LayerNorm parameters (a name containing ``ln_``, as in
    ``ln_1``/``ln_f``, or ``norm``) and embeddings (a name component ``wte`` or ``wpe``, or a
    name containing ``embed``).
    """
    if name.endswith(".bias") or name == "bias":
        return True
    if "ln_" in name or "norm" in name or "embed" in name:
        return True
    return _EMBEDDING_PART.search(name) is not None


class Optimizer:
    """Shared bookkeeping: parameters by name, the step counter, state arrays by flat key."""

    def __init__(self, params: Mapping[str, Tensor], lr: float, no_decay: NoDecay | None) -> None:
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        seen: dict[int, str] = {}
        for name, p in params.items():
            if not isinstance(p, Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a Tensor")
            # A tied weight listed twice would be updated twice per step.
            if id(p) in seen:
                raise ValueError(f"parameters {seen[id(p)]!r} and {name!r} are the same Tensor")
            seen[id(p)] = name
        self.params: dict[str, Tensor] = dict(params)
        self.lr = float(lr)  # schedules overwrite this before each step
        self.no_decay: NoDecay = default_no_decay if no_decay is None else no_decay
        self.step_count = 0
        # Flat key ("exp_avg.<name>") -> array in the parameter's dtype, created eagerly so that
        # memory reports and checkpoints do not depend on which parameters got a gradient yet.
        self._state: dict[str, np.ndarray] = {}

    # ---- the update ---------------------------------------------------------------------------
    def step(self, grads: Mapping[str, np.ndarray | None] | None = None) -> None:
        """One update from ``grads`` (by name), or from each ``p.grad`` when ``grads`` is None.

        Parameters without a gradient (absent from ``grads``, or a None gradient) are left as
        they are. The gradient arrays are only read.
        """
        if grads is None:
            pairs = [(name, p, p.grad) for name, p in self.params.items()]
        else:
            unknown = [name for name in grads if name not in self.params]
            if unknown:
                raise KeyError(f"gradients for unknown parameters: {', '.join(unknown)}")
            pairs = [(name, self.params[name], g) for name, g in grads.items()]
        pairs = [(name, p, g) for name, p, g in pairs if g is not None]
        for name, p, g in pairs:  # check all before changing any
            if g.shape != p.data.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape}, param {p.shape}")
        self.step_count += 1
        lr = float(self.lr)
        for name, p, g in pairs:
            self._update(name, p.data, g, lr)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    # ---- state --------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the optimizer's state arrays (the step counter is not counted)."""
        return sum(a.nbytes for a in self._state.values())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{key: ndarray}``: ``np.savez`` can store it and load it without pickle."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        state.update((key, a.copy()) for key, a in self._state.items())
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy ``state`` in; every key must be present, expected, and of the right shape."""
        expected = {"step": (), **{key: a.shape for key, a in self._state.items()}}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        misshaped = [
            f"{k} {np.shape(state[k])} != {expected[k]}"
            for k in expected
            if k in state and np.shape(state[k]) != expected[k]
        ]
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        if misshaped:
            problems.append(f"wrong shapes: {', '.join(misshaped)}")
        if problems:
            raise StateDictError(f"{type(self).__name__} state dict: {'; '.join(problems)}")
        self.step_count = int(state["step"])
        for key, a in self._state.items():
            np.copyto(a, state[key], casting="same_kind")

    def _new_state(self, kind: str, name: str, p: Tensor) -> None:
        # Data-free parameters (`civetta.meta`) get data-free state of the same bytes.
        self._state[f"{kind}.{name}"] = meta.zeros(p.data.shape, p.data.dtype, like=p.data)


class SGD(Optimizer):
    """SGD with optional heavy-ball momentum and L2 weight decay, PyTorch semantics.

    ``d = g + wd * p`` (decay coupled to the gradient, skipped for ``no_decay`` names);
    ``buf = momentum * buf + d``; ``p -= lr * buf`` (``p -= lr * d`` without momentum).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        no_decay: NoDecay | None = None,
    ) -> None:
        super().__init__(params, lr, no_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        if self.momentum:
            for name, p in self.params.items():
                self._new_state("momentum", name, p)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        wd = 0.0 if self.no_decay(name) else self.weight_decay
        scratch = np.multiply(p, wd) if wd else None  # never write into g: it may be shared
        if scratch is not None:
            scratch += g
        if self.momentum:
            buf = self._state[f"momentum.{name}"]
            buf *= self.momentum
            buf += g if scratch is None else scratch
            direction = buf
        else:
            direction = g if scratch is None else scratch
        if scratch is None:
            scratch = np.multiply(direction, lr, dtype=p.dtype)
        else:
            np.multiply(direction, lr, out=scratch)
        p -= scratch


class AdamW(Optimizer):
    """Adam with bias correction and decoupled weight decay (Loshchilov & Hutter).

    Per element, with ``t`` the step count (1 on the first step)::

        p   *= 1 - lr * wd                      # decoupled decay, skipped for no_decay names
        m    = b1 * m + (1 - b1) * g
        v    = b2 * v + (1 - b2) * g * g
        p   -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        no_decay: NoDecay | None = None,
    ) -> None:
        super().__init__(params, lr, no_decay)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        for name, p in self.params.items():
            self._new_state("exp_avg", name, p)
            self._new_state("exp_avg_sq", name, p)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        b1, b2 = self.betas
        t = self.step_count
        step_size = lr / (1.0 - b1**t)
        sqrt_bc2 = math.sqrt(1.0 - b2**t)
        decay = bool(self.weight_decay) and not self.no_decay(name)
        m = self._state[f"exp_avg.{name}"]
        v = self._state[f"exp_avg_sq.{name}"]
        constants = (b1, b2, step_size, sqrt_bc2, self.eps, 1.0 - lr * self.weight_decay, decay)
        if type(g) is np.ndarray and all(
            type(a) is np.ndarray and a.flags.c_contiguous for a in (p, m, v)
        ):
            # Blocks of the flat arrays (see `civetta.threads`): the same operations per element.
            flat = (p.reshape(-1), np.asarray(g).reshape(-1), m.reshape(-1), v.reshape(-1))
            fast = compiled.elementwise_for(p) and g.dtype == p.dtype
            run_blocked(_adamw_compiled if fast else _adamw_kernel, flat, constants)
        else:  # data-free, or a strided parameter view: one call on the arrays themselves
            _adamw_kernel(p, g, m, v, *constants)


def _adamw_kernel(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    b1: float,
    b2: float,
    step_size: float,
    sqrt_bc2: float,
    eps: float,
    shrink: float,
    decay: bool,
) -> None:
    """AdamW's update of `p`, `m`, `v` in place (see `AdamW`); Python floats keep float32
    arithmetic float32 (a float64 numpy scalar would promote)."""
    if decay:
        p *= shrink
    scratch = np.multiply(g, 1.0 - b1, dtype=p.dtype)  # the one temporary of this update
    m *= b1
    m += scratch
    np.multiply(g, g, out=scratch)
    scratch *= 1.0 - b2
    v *= b2
    v += scratch
    np.sqrt(v, out=scratch)
    scratch /= sqrt_bc2
    scratch += eps
    np.divide(m, scratch, out=scratch)
    scratch *= step_size
    p -= scratch


def _adamw_compiled(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *constants: Any
) -> None:
    """`_adamw_kernel`'s bits in one compiled pass (`civetta.compiled`), on its constants (b1,
    b2, step size, √bias-correction, eps, shrink, decay), each rounded to the parameters' dtype
    first, as numpy rounds a Python float operand."""
    b1, b2, step_size, sqrt_bc2, eps, shrink, decay = constants
    t = p.dtype.type
    compiled.kernel("adamw")(
        p, g, m, v, t(b1), t(b2), t(1.0 - b1), t(1.0 - b2), t(step_size), t(sqrt_bc2), t(eps),
        t(shrink), decay,
    )  # fmt: skip


def make_optimizer(
    name: str,
    params: Mapping[str, Tensor],
    lr: float,
    weight_decay: float | None = None,
    **kw: Any,
) -> Optimizer:
    """``"sgd"`` or ``"adamw"``; ``weight_decay`` None takes the optimizer's default."""
    classes: dict[str, type[Optimizer]] = {"sgd": SGD, "adamw": AdamW}
    cls = classes.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(classes)}")
    if weight_decay is not None:
        kw["weight_decay"] = weight_decay
    return cls(params, lr, **kw)


# ---- global gradient-norm clipping --------------------------------------------------------------
def grad_sq_norm(grads: Iterable[np.ndarray | None]) -> float:
    """Sum of squares of all gradient entries, accumulated in float64 (None entries skipped)."""
    total = 0.0
    for g in grads:
        if g is None:
            continue
        flat = np.asarray(g, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return total


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """``min(1, max_norm / (total_norm + 1e-6))``: the factor that brings the norm to max_norm.

    A non-finite norm gives 1.0: the gradients are left as they are.
    """
    coef = max_norm / (total_norm + 1e-6)
    return coef if coef < 1.0 else 1.0


def clip_grad_norm(params: Mapping[str, Tensor], max_norm: float) -> float:
    """Scale every ``p.grad`` (by a new array) so the global norm is at most ``max_norm``.

    Returns the norm before clipping.
    """
    grads = [p.grad for p in params.values() if p.grad is not None]
    total_norm = math.sqrt(grad_sq_norm(grads))
    coef = clip_coefficient(total_norm, max_norm)
    if coef < 1.0:
        for p in params.values():
            if p.grad is not None:
                p.grad = p.grad * coef  # a new array: the old one may be shared
    return total_norm


# ---- learning-rate schedules --------------------------------------------------------------------
@dataclass(frozen=True)
class ConstantLR:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class CosineWithWarmup:
    """Linear warmup, then a half cosine from ``lr`` down to ``min_lr``.

    Steps count from 0. During warmup (``step < warmup_steps``) the rate is
    ``lr * (step + 1) / warmup_steps``, so the last warmup step already runs at ``lr`` and the
    first step does not waste an update at 0. From ``warmup_steps`` the rate follows
    ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2`` with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)``: ``lr`` at
    ``warmup_steps``, ``min_lr`` at ``total_steps`` and after it.
    """

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.total_steps < self.warmup_steps:
            raise ValueError(
                f"need 0 <= warmup_steps <= total_steps, got warmup_steps={self.warmup_steps},"
                f" total_steps={self.total_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if step >= self.total_steps or decay_steps == 0:
            return self.min_lr
        progress = (step - self.warmup_steps) / decay_steps
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def constant_lr(lr: float) -> ConstantLR:
    return ConstantLR(float(lr))


def cosine_with_warmup(
    lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> CosineWithWarmup:
    return CosineWithWarmup(float(lr), int(warmup_steps), int(total_steps), float(min_lr))
