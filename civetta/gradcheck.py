"""Finite-difference gradient checking for civetta graphs.

The check compares reverse mode against central differences of the scalar
``f(x) = Σ_i sum(out_i(x) · g_i)``, where ``g_i`` is a random upstream gradient for output ``i``.
A random ``g`` (never all ones) matters: with ones, a backward that sums or permutes its upstream
gradient wrongly can still produce the right answer.

Error definition, elementwise over every checked entry of every input::

    err = |analytic - numeric| / max(1, |analytic|, |numeric|)

and the result is the maximum. The floor of 1 makes it an absolute error for small gradients
(where a plain relative error explodes near zero and flags finite-difference noise) and a
relative error for large ones. A NaN or inf on either side counts as an infinite error.

Two entry points:

- ``check_gradients(fn, inputs)``: ``fn`` is a function of Tensors; the inputs are numpy arrays
  that become float64 leaves.
- ``check_tensor_gradients(fn, tensors)``: ``fn`` takes no arguments and reads ``tensors`` itself
  (e.g. a model's parameters captured in its closures); each tensor's ``.data`` is perturbed in
  place and restored. ``max_elements`` checks a seeded random subset of each large tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from civetta.tensor import Tensor, no_grad

Outputs = Tensor | Sequence[Tensor]


class GradientCheckError(AssertionError):
    """Reverse mode disagrees with finite differences beyond the tolerance."""


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> np.ndarray:
    """Elementwise |a - n| / max(1, |a|, |n|); non-finite entries give inf."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    scale = np.maximum(1.0, np.maximum(np.abs(a), np.abs(n)))
    with np.errstate(invalid="ignore"):
        err = np.abs(a - n) / scale
    return np.where(np.isfinite(a) & np.isfinite(n), err, np.inf)


def check_gradients(
    fn: Callable[..., Outputs],
    inputs: Sequence[np.ndarray],
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    max_elements: int | None = None,
) -> float:
    """Max relative error of ``fn``'s gradients w.r.t. every input; raises above ``rtol``."""
    leaves = [Tensor(np.array(x, dtype=np.float64), requires_grad=True) for x in inputs]
    return check_tensor_gradients(
        lambda: fn(*leaves), leaves, seed=seed, eps=eps, rtol=rtol, max_elements=max_elements
    )


def check_tensor_gradients(
    fn: Callable[[], Outputs],
    tensors: Sequence[Tensor],
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    max_elements: int | None = None,
) -> float:
    """Max relative error of the gradients of ``fn()`` w.r.t. ``tensors`` (float64 leaves)."""
    for t in tensors:
        if t.dtype != np.float64:
            # float32 rounding (~1e-7 relative) swamps a 1e-6 central difference.
            raise TypeError(f"gradient check needs float64 tensors, got {t.dtype}")
        if not (t.requires_grad and t.is_leaf):
            raise ValueError("gradient check needs leaf tensors with requires_grad=True")
        flags = t.data.flags
        if not (flags.writeable and flags.owndata and flags.c_contiguous):
            # Perturbing in place must neither touch a shared buffer nor land in a copy.
            t.data = np.array(t.data, order="C")
    rng = np.random.default_rng(seed)

    # Reverse mode with a random upstream gradient per output.
    saved = [t.grad for t in tensors]  # the caller's gradients are left as they were
    try:
        for t in tensors:
            t.grad = None
        outputs = _as_list(fn())
        upstream = [rng.standard_normal(out.shape) for out in outputs]
        live = [(out, g) for out, g in zip(outputs, upstream, strict=True) if out.requires_grad]
        for i, (out, g) in enumerate(live):
            out.backward(g, retain_graph=i < len(live) - 1)  # outputs may share a graph
        analytic = [np.zeros(t.shape) if t.grad is None else np.asarray(t.grad) for t in tensors]
    finally:
        for t, grad in zip(tensors, saved, strict=True):
            t.grad = grad

    def objective() -> float:
        with no_grad():
            outs = _as_list(fn())
        return float(sum(np.sum(out.data * g) for out, g in zip(outs, upstream, strict=True)))

    worst = 0.0
    for which, (t, grad) in enumerate(zip(tensors, analytic, strict=True)):
        if grad.shape != t.shape:
            raise GradientCheckError(f"input {which}: grad shape {grad.shape} != {t.shape}")
        flat = t.data.reshape(-1)  # a view: t.data is C-contiguous, ensured above
        positions = np.arange(flat.size)
        if max_elements is not None and flat.size > max_elements:
            positions = np.sort(rng.choice(flat.size, size=max_elements, replace=False))
        numeric = np.empty(positions.size)
        for j, pos in enumerate(positions):
            original = flat[pos]
            flat[pos] = original + eps
            plus = objective()
            flat[pos] = original - eps
            minus = objective()
            flat[pos] = original
            numeric[j] = (plus - minus) / (2 * eps)
        checked = grad.reshape(-1)[positions]
        errors = relative_error(checked, numeric)
        if errors.size and errors.max() > worst:
            worst = float(errors.max())
            if worst > rtol:
                j = int(np.argmax(errors))
                index = np.unravel_index(positions[j], t.shape) if t.shape else ()
                raise GradientCheckError(
                    f"input {which} {t.shape} at {tuple(int(i) for i in index)}: "
                    f"analytic {checked[j]!r} vs numeric {numeric[j]!r} "
                    f"(relative error {worst:.3g} > {rtol:.3g})"
                )
    return worst


def _as_list(outputs: Outputs) -> list[Tensor]:
    return [outputs] if isinstance(outputs, Tensor) else list(outputs)
