"""The Tensor and the reverse-mode engine.

A Tensor holds a numpy array and, when it was produced by an op that needs gradients, its
parents and one backward closure ``g -> tuple of parent gradients``. ``backward`` walks the graph
in reverse topological order (computed iteratively, so deep graphs need no recursion), keeps the
pending gradients in a dict keyed by node, and drops every closure once it has been used, which
frees the graph as the walk proceeds.

An op tells `make_node` which arrays its closure keeps (`saved=`); the activation meter holds
their buffers (each once, leaves' not) from the node's creation until backward consumes it or it
is garbage collected, so its peak is the memory a step keeps for backward.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np

from civetta.meta import MetaArray
from civetta.meta import asarray as _asarray
from civetta.meters import activation_meter, gemm_log

DEFAULT_DTYPE = np.float32

BackwardFn = Callable[[np.ndarray], Sequence[np.ndarray | None]]

_grad_enabled = True
_created = itertools.count()  # `Tensor._seq`: the order tensors are created in


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Build no graph inside the block: ops return constants."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


@contextlib.contextmanager
def enable_grad() -> Iterator[None]:
    """Build graphs inside the block even within `no_grad` (activation recomputation)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


class DeferredGrad:
    """A weight gradient an op chose to compute later (see `WeightGradStore`)."""

    __slots__ = ("compute",)

    def __init__(self, compute: Callable[[], np.ndarray]) -> None:
        self.compute = compute


class RegionGrad:
    """A gradient that is zero outside `region` of an array of `shape`: what a slice of its
    input (`axioms.split`) hands back. The engine writes `values` into the pending gradient
    of the input instead of adding a zero-padded array per slice (for q, k, v: one buffer
    instead of three and two full-size sums)."""

    __slots__ = ("dtype", "order", "region", "shape", "values")

    def __init__(
        self,
        shape: tuple[int, ...],
        region: Any,
        values: np.ndarray,
        order: tuple[int, ...] | None = None,
    ) -> None:
        self.shape, self.region, self.values, self.dtype = shape, region, values, values.dtype
        self.order = order  # the input's memory layout (`memory_order`), which the sum keeps

    def dense(self) -> np.ndarray:
        full = empty_in_order(self.shape, self.dtype, self.order)
        full.fill(0)
        full[self.region] = self.values
        return full


def memory_order(a: np.ndarray) -> tuple[int, ...] | None:
    """`a`'s axes from the largest stride to the smallest, where `a` is a strided view (None
    for a C-contiguous array): the layout a gradient for `a` is best allocated in."""
    if type(a) is not np.ndarray or a.flags.c_contiguous:
        return None
    return tuple(sorted(range(a.ndim), key=lambda axis: -abs(a.strides[axis])))


def empty_in_order(shape: tuple[int, ...], dtype: Any, order: tuple[int, ...] | None) -> np.ndarray:
    """An uninitialised array of `shape` whose memory runs through the axes in `order`.

    A split of a transposed array (the q, k and v heads of one packed projection) hands its
    gradient pieces back in the transposed shape; summed into an array laid out as the input's
    memory, the transposes and the reshape the gradient then flows through are views, where a
    C-ordered sum would be copied once more into the projection's layout."""
    if order is None:
        return np.empty(shape, dtype)
    stored = np.empty([shape[axis] for axis in order], dtype)
    return stored.transpose(np.argsort(order))


class WeightGradStore:
    """Postponed weight gradients: the weight pass of zero-bubble pipeline schedules.

    Inside `defer_weight_grads(store)`, a backward computes the gradients with respect to the
    inputs (what the previous pipeline stage waits for) and ops that support it (`fused.linear`)
    hand back their weight gradients as closures; `apply()` computes them later and accumulates
    them into the weights' `.grad`, in the order they were postponed.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Tensor, DeferredGrad]] = []

    def postpone(self, leaf: Tensor, grad: DeferredGrad) -> None:
        assert leaf._backward is None, "only leaves (weights) take deferred gradients"
        self.pending.append((leaf, grad))

    def apply(self) -> None:
        for leaf, deferred in self.pending:
            g = deferred.compute()
            leaf.grad = g if leaf.grad is None else leaf.grad + g
        self.pending.clear()


_weight_grad_store: WeightGradStore | None = None


@contextlib.contextmanager
def defer_weight_grads(store: WeightGradStore) -> Iterator[WeightGradStore]:
    """Backward passes inside the block postpone weight gradients into `store`."""
    global _weight_grad_store
    previous, _weight_grad_store = _weight_grad_store, store
    try:
        yield store
    finally:
        _weight_grad_store = previous


def weight_grads_deferred() -> bool:
    return _weight_grad_store is not None


class Tensor:
    __slots__ = (
        "__weakref__", "_backward", "_held", "_parents", "_seq", "data", "grad", "requires_grad"
    )  # fmt: skip

    __array_priority__ = 100  # numpy defers `ndarray op Tensor` to our reflected methods

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        if isinstance(data, Tensor):
            data = data.data
        if type(data) is MetaArray:  # data-free: keep the shape-only array (cast if asked)
            # A MetaArray stands in for an ndarray (duck-typed, as FakeTensor for a Tensor).
            array = cast(np.ndarray, data if dtype is None else data.astype(dtype, copy=False))
        elif dtype is not None:
            array = np.asarray(data, dtype=dtype)
        else:
            array = np.asarray(data)
            if array.dtype.kind in "fc" and not isinstance(data, np.ndarray | np.generic):
                array = array.astype(DEFAULT_DTYPE)  # Python floats and lists start as float32
        self.data: np.ndarray = array
        self.requires_grad = requires_grad
        self.grad: np.ndarray | None = None
        self._parents: tuple[Tensor, ...] = ()
        self._backward: BackwardFn | None = None
        self._held: tuple[int, ...] = ()  # the activation meter's keys of the buffers kept
        self._seq = next(_created)  # creation order: every input was created before its op

    def __del__(self) -> None:
        if self._held:
            activation_meter.release(self._held)

    # ---- basic properties -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{flag})"

    # ---- reverse mode -----------------------------------------------------------------------
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) · grad into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a one-element tensor; a pipeline stage passes the gradient it
        received for its output instead.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError("backward() needs an explicit grad for a non-scalar tensor")
            grad = np.ones_like(self.data)
        grad = _asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"grad shape {grad.shape} does not match tensor shape {self.shape}")

        pending: dict[Tensor, Any] = {self: grad}  # arrays, or `_Regions` of a split input
        stored: set[int] = set()  # ids of arrays this pass already gave to a leaf
        summed: set[int] = set()  # ids of pending sums this pass allocated (see `_accumulate`)
        pop, get = pending.pop, pending.get
        # Nodes in reverse creation order: an op's output is created after all its inputs, so
        # every node that adds to a gradient is done before that gradient's node is reached.
        # Only nodes that received a gradient enter the heap (no walk of the whole graph first).
        heap: list[tuple[int, Tensor]] = [(-self._seq, self)]
        push, popmin = heapq.heappush, heapq.heappop
        while heap:
            node = popmin(heap)[1]
            g = pop(node)
            if type(g) is _Regions:
                g = g.dense()  # every piece has arrived: one write per piece
            if summed:
                summed.discard(id(g))  # leaves the pending dict: no longer ours to add into
            backward = node._backward
            if backward is None:
                if node._parents:
                    raise RuntimeError("graph already freed: pass retain_graph=True to reuse it")
                if node.grad is None:
                    node.grad = _private(g, grad, stored)
                    stored.add(id(node.grad))
                else:
                    node.grad = _asarray(node.grad + g)
                continue
            for parent, parent_grad in zip(node._parents, backward(g), strict=True):
                if parent_grad is None or not parent.requires_grad:
                    continue
                if type(parent_grad) is DeferredGrad:
                    # Ops defer only inside `defer_weight_grads`, which sets the store.
                    assert _weight_grad_store is not None, "a DeferredGrad outside its store"
                    _weight_grad_store.postpone(parent, parent_grad)
                    continue
                assert parent_grad.shape == parent.data.shape, (parent_grad.shape, parent.shape)
                previous = get(parent)
                if previous is None:  # the common case: the input's first gradient
                    push(heap, (-parent._seq, parent))
                    regions = type(parent_grad) is RegionGrad
                    pending[parent] = _Regions(parent_grad) if regions else parent_grad
                    continue
                if type(previous) is _Regions:
                    if type(parent_grad) is RegionGrad and parent_grad.dtype == previous.dtype:
                        previous.parts.append(parent_grad)  # written when the input is reached
                        continue
                    previous = previous.dense()  # a whole gradient joins: sum into the pieces
                    summed.add(id(previous))
                    pending[parent] = previous
                if type(parent_grad) is RegionGrad:
                    pending[parent] = _add_region(previous, parent_grad, summed)
                elif id(previous) in summed and previous.dtype == parent_grad.dtype:
                    previous += parent_grad  # into a sum this pass allocated (see `_accumulate`)
                else:
                    pending[parent] = _accumulate(previous, parent_grad, summed)
            if not retain_graph:  # `_release`, inline: once per node
                node._backward = None
                node._parents = _FREED_PARENTS
                if node._held:
                    activation_meter.release(node._held)
                    node._held = ()

    def _release(self) -> None:
        # A freed node keeps a sentinel parent, so a second backward that reaches it can tell it
        # from a true leaf and raise instead of silently stopping there.
        self._backward = None
        self._parents = _FREED_PARENTS
        if self._held:
            activation_meter.release(self._held)
            self._held = ()

    # ---- operators (defined in axioms/functional; bound below) -------------------------------
    def __add__(self, other: Any) -> Tensor:
        return _ops.add(self, other)

    def __radd__(self, other: Any) -> Tensor:
        return _ops.add(other, self)

    def __sub__(self, other: Any) -> Tensor:
        return _fn.sub(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return _fn.sub(other, self)

    def __mul__(self, other: Any) -> Tensor:
        return _ops.mul(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return _ops.mul(other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return _fn.div(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return _fn.div(other, self)

    def __neg__(self) -> Tensor:
        return _ops.neg(self)

    def __pow__(self, exponent: float) -> Tensor:
        return _fn.pow(self, exponent)

    def __matmul__(self, other: Tensor) -> Tensor:
        return _fn.matmul(self, other)

    def __getitem__(self, index: Any) -> Tensor:
        return _ops.getitem(self, index)

    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return _ops.sum(self, axis, keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return _fn.mean(self, axis, keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return _ops.max(self, axis, keepdims)

    def reshape(self, *shape: Any) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return _ops.reshape(self, shape)

    def transpose(self, *axes: int) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        return _ops.transpose(self, axes or None)

    @property
    def T(self) -> Tensor:  # noqa: N802 - numpy's name
        return _ops.transpose(self, None)

    def exp(self) -> Tensor:
        return _ops.exp(self)

    def log(self) -> Tensor:
        return _ops.log(self)

    def relu(self) -> Tensor:
        return _fn.relu(self)


_FREED = Tensor(np.zeros(()))
_FREED_PARENTS = (_FREED,)


class _Regions:
    """The slices' gradients (`RegionGrad`s) waiting for one input, written into one array when
    the engine reaches that input or a whole gradient joins them. Pieces that tile the input
    along one axis (q, k and v of a split) are copied into an uninitialised array, one write
    each; any other set is added into zeros."""

    __slots__ = ("dtype", "order", "parts", "shape")

    def __init__(self, first: RegionGrad) -> None:
        self.shape, self.dtype, self.parts = first.shape, first.dtype, [first]
        self.order = first.order

    def dense(self) -> np.ndarray:
        total = empty_in_order(self.shape, self.dtype, self.order)
        if _tile(self.parts, self.shape):
            for part in self.parts:
                total[part.region] = part.values
            return total
        total.fill(0)
        for part in self.parts:
            total[part.region] += part.values
        return total


def _tile(parts: list[RegionGrad], shape: tuple[int, ...]) -> bool:
    """Whether the regions are slices along one axis (whole along the others) that cover it
    exactly once: then every element is written by exactly one piece."""
    axis, spans = None, []
    for part in parts:
        region = part.region
        if type(region) is not tuple or len(region) != len(shape):
            return False
        sliced = [i for i, s in enumerate(region) if s != _WHOLE]
        if len(sliced) != 1 or type(region[sliced[0]]) is not slice:
            return False
        if axis is None:
            axis = sliced[0]
        elif sliced[0] != axis:
            return False
        start, stop, step = region[axis].indices(shape[axis])
        if step != 1:
            return False
        spans.append((start, stop))
    if axis is None:
        return False
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end or stop <= start:
            return False
        end = stop
    return end == shape[axis]


_WHOLE = slice(None)


def _add_region(previous: np.ndarray, grad: RegionGrad, summed: set[int]) -> np.ndarray:
    """previous + grad with grad zero outside its region: in place into a sum this pass owns,
    else into a new array that it then owns (see `_accumulate`)."""
    if id(previous) in summed and previous.dtype == grad.dtype:
        previous[grad.region] += grad.values
        return previous
    total = previous + np.zeros((), grad.dtype)  # a private copy, in the sum's dtype
    total[grad.region] += grad.values
    summed.add(id(total))
    return total


def _accumulate(previous: np.ndarray, g: np.ndarray, summed: set[int]) -> np.ndarray:
    """previous + g, a new array that `summed` records, so the next gradient for the same node
    is added into it in place (`backward` does that inline, for equal dtypes: the same values).

    Closures may return arrays someone else holds (`add` hands one array to both inputs, a
    reshape returns a view of its upstream gradient), so only the engine's own sums, tracked in
    `summed` by id while they wait in the pending dict, are written into.
    """
    total = previous + g
    if type(total) is np.ndarray:
        summed.add(id(total))
    return total


def _private(g: np.ndarray, caller_grad: np.ndarray, stored: set[int]) -> np.ndarray:
    """`g` itself when no one else holds it, else a copy: a leaf's ``.grad`` must be its own
    writable array, since optimizers and all-reduces update it in place.

    Backward closures return fresh arrays or views. Views (a reshape, sum's read-only broadcast)
    do not own their data; a fresh array may still be shared: `add` hands one array to both
    inputs, and the caller keeps the upstream gradient it passed in. Stealing the rest saves a
    parameter-sized copy per leaf and step.
    """
    if type(g) is MetaArray:
        return g if g.base is None and g is not caller_grad and id(g) not in stored else g.copy()
    fresh = (
        isinstance(g, np.ndarray)
        and g.flags.owndata
        and g.flags.writeable
        and g is not caller_grad
        and id(g) not in stored
    )
    return g if fresh else np.array(g)


_precision: Any = None  # a civetta.precision.Precision while autocasting


def set_precision(policy: Any) -> Any:
    """Install a low-precision policy for op outputs and gradients; returns the previous one."""
    global _precision
    previous, _precision = _precision, policy
    return previous


def current_precision() -> Any:
    """The low-precision policy ops round to now (None outside `autocast`)."""
    return _precision


def make_node(
    data: np.ndarray,
    parents: tuple[Tensor, ...],
    backward: BackwardFn,
    round_grads: bool = True,
    saved: Sequence[Any] | None = None,
    computed: bool = True,
) -> Tensor:
    """Wrap an op's result; attach the closure only when some parent needs a gradient.

    `round_grads=False`: the op rounds its input gradients itself (under autocast).
    `computed=False`: the output was written by a collective, not computed by an elementwise
    kernel (the GEMM log's `output_bytes`, the elementwise traffic, leaves it out).

    `saved`: the arrays the backward closure keeps (None entries are skipped); while the node
    waits for its backward the activation meter holds their buffers (see `ActivationMeter`):
    each counted whole and once, leaf tensors' buffers not at all, the op's output under
    autocast as the rounded array the node returns. Without `saved`, the output counts when the
    op allocated it (the rule before ops declared what they keep).
    """
    fresh = data.base is None or _owns_new_memory(data, parents)
    unrounded = data
    if _precision is not None:
        if fresh:  # a view of an input shares its already-rounded values
            data = _precision.round(data)
        if round_grads:
            backward = _rounding(backward, _precision)
    if gemm_log.enabled and fresh and computed:
        nbytes = data.nbytes
        gemm_log.output_bytes += (
            nbytes if _precision is None else nbytes // data.itemsize * _precision.itemsize
        )
    out = Tensor.__new__(Tensor)
    out._seq = next(_created)
    out.data = data
    out.grad = None
    needs_grad = False
    if _grad_enabled:
        for parent in parents:
            if parent.requires_grad:
                needs_grad = True
                break
    if needs_grad:
        out.requires_grad = True
        out._parents = parents
        out._backward = backward
        activation_meter.nodes += 1
        if saved is None:
            buffers = [data if data.base is None else data.base] if fresh else None
        else:
            buffers = _saved_buffers(saved, parents, unrounded, data) if saved else None
        out._held = (
            activation_meter.hold(buffers, None if _precision is None else _precision.itemsize)
            if buffers
            else ()
        )
    else:
        out.requires_grad = False
        out._parents = ()
        out._backward = None
        out._held = ()
    return out


def _saved_buffers(
    saved: Sequence[Any], parents: tuple[Tensor, ...], computed: np.ndarray, data: np.ndarray
) -> list[Any]:
    """The buffers (arrays that own their memory) behind `saved`, leaves' buffers left out.

    `computed` is the op's output before autocast rounded it into `data`: a closure that keeps
    its output (exp, softmax, normalize) holds `computed`, which stands for the one
    low-precision output a real kernel keeps, `data`.
    """
    rounded = data is not computed
    buffers = []
    for array in saved:
        if array is None:
            continue
        owner = array.base
        if owner is None or not isinstance(owner, np.ndarray | MetaArray):
            owner = array  # an array over foreign memory (np.frombuffer) stands for it
        if rounded and owner is (computed if computed.base is None else computed.base):
            owner = data if data.base is None else data.base
        if not _is_leaf_buffer(owner, parents):
            buffers.append(owner)
    return buffers


def _is_leaf_buffer(owner: Any, parents: tuple[Tensor, ...]) -> bool:
    """Whether `owner` is the memory of a leaf tensor among `parents` or behind the views they
    are (a transposed weight is a node whose data is a view of the weight's)."""
    for node in parents:
        while True:
            d = node.data
            if (d if d.base is None else d.base) is not owner:
                break
            if node._backward is None:
                return True
            for parent in node._parents:  # a view node: follow the input it views
                pd = parent.data
                if (pd if pd.base is None else pd.base) is owner:
                    node = parent
                    break
            else:
                break
    return False


def _owns_new_memory(data: np.ndarray, parents: tuple[Tensor, ...]) -> bool:
    """Whether an op's output is new memory rather than a view of one of its inputs."""
    owner = data if data.base is None else data.base
    if owner is data:
        return True
    return all(owner is not p.data and owner is not p.data.base for p in parents)


def _rounding(backward: BackwardFn, policy: Any) -> BackwardFn:
    """The op's backward with its input gradients rounded to the low precision (a deferred
    weight gradient when the weight pass computes it)."""

    def rounded(g: np.ndarray) -> Sequence[Any]:
        return tuple(_rounded(grad, policy) for grad in backward(g))

    return rounded


def _rounded(grad: Any, policy: Any) -> Any:
    if isinstance(grad, np.ndarray):
        return policy.round(grad)
    if isinstance(grad, RegionGrad):  # rounding keeps the zeros outside the region zero
        return RegionGrad(grad.shape, grad.region, policy.round(grad.values), grad.order)
    if isinstance(grad, DeferredGrad):
        compute = grad.compute
        return DeferredGrad(lambda: policy.round(compute()))
    return grad


def as_tensor(value: Any, like: Tensor | None = None) -> Tensor:
    """A Tensor for `value`; Python scalars take `like`'s dtype so float32 stays float32."""
    if isinstance(value, Tensor):
        return value
    if like is not None and not isinstance(value, np.ndarray):
        return Tensor(np.asarray(value, dtype=like.dtype))
    return Tensor(value)


# Late imports: the operator methods above dispatch to these modules, which import Tensor.
from civetta import axioms as _ops  # noqa: E402
from civetta import functional as _fn  # noqa: E402
