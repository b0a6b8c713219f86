"""Data-free (shape-only) execution: arrays that carry a shape, a dtype and a memory layout, and
no values.

A `MetaArray` flows through the engine's ordinary numpy code: ufuncs (with ``out=`` and the
in-place operators), reductions, indexing and the numpy functions the ops use dispatch to it by
numpy's `__array_ufunc__` / `__array_function__` protocols and return new MetaArrays of the
shape, dtype and strides numpy would have produced. Views know their `base`, as numpy's do, so
the activation meter tells fresh memory from views exactly as on real data; strides are tracked
because whether a `reshape` copies depends on them.

Ops decide by their operands: whatever is computed from a MetaArray is a MetaArray. Only code
that creates an array from a shape alone (parameter initialisation, constants, token ids) has no
operand to follow; it calls `zeros` / `ones` / `empty` here, which consult `data_free()`.

Values do not exist: ``float()``, ``int()``, ``bool()``, ``.item()``, ``np.asarray`` and
value-dependent shapes (boolean masks, ``np.nonzero``) raise `DataFreeError`, as does any numpy
function this module does not implement (named in the message) — never a silent allocation.
The few engine paths that read values (the count of non-ignored targets in `cross_entropy`,
the row sort of an embedding's backward) branch on `is_meta` explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np

Shape = tuple[int, ...]


class DataFreeError(TypeError):
    """A value was asked of a data-free array, or a numpy function it does not implement."""


_data_free = False


@contextlib.contextmanager
def data_free(enabled: bool = True) -> Iterator[None]:
    """Arrays created from a shape inside the block (parameters, constants) are MetaArrays."""
    global _data_free
    previous, _data_free = _data_free, enabled
    try:
        yield
    finally:
        _data_free = previous


def is_data_free() -> bool:
    return _data_free


def is_meta(x: Any) -> bool:
    return type(x) is MetaArray


# ---- layouts ------------------------------------------------------------------------------------
def _c_strides(shape: Shape, itemsize: int) -> Shape:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _operand_strides(shape: Shape, x: Any) -> Shape:
    """`x`'s strides broadcast to `shape`: 0 on broadcast and length-1 axes, as numpy's
    iterator sees them."""
    own_shape, own_strides = _shape_of(x), _strides_of(x)
    lead = len(shape) - len(own_shape)
    return tuple(
        0 if i < lead or own_shape[i - lead] == 1 else own_strides[i - lead]
        for i in range(len(shape))
    )


def _shape_of(x: Any) -> Shape:
    return x.shape if isinstance(x, MetaArray | np.ndarray | np.generic) else np.shape(x)


def _strides_of(x: Any) -> Shape:
    if isinstance(x, MetaArray | np.ndarray):
        return x.strides
    return (0,) * np.ndim(x)


def _k_strides(shape: Shape, itemsize: int, operands: Sequence[Any]) -> Shape:
    """Strides of a fresh array numpy allocates in order "K" (ufunc, reduction and `astype`
    outputs): its axes sorted by the operands' strides, as numpy's iterator sorts them."""
    ndim = len(shape)
    strides = [_operand_strides(shape, x) for x in operands]
    perm = list(reversed(range(ndim)))  # fastest-varying first, C order to start with
    # A stable insertion sort from the smallest stride up; where operands disagree C order wins,
    # and axes some operand broadcasts over (stride 0) say nothing.
    for i0 in range(1, ndim):
        axis0, position = perm[i0], i0
        for i1 in range(i0 - 1, -1, -1):
            axis1 = perm[i1]
            ambiguous, swap = True, False
            for s in strides:
                if s[axis0] != 0 and s[axis1] != 0:
                    if abs(s[axis1]) <= abs(s[axis0]):
                        swap = False
                    elif ambiguous:
                        swap = True
                    ambiguous = False
            if not ambiguous:
                if swap:
                    position = i1
                else:
                    break
        if position != i0:
            perm.insert(position, perm.pop(i0))
    out, step = [0] * ndim, itemsize
    for axis in perm:
        out[axis] = step
        step *= max(shape[axis], 1)
    return tuple(out)


def _nocopy_reshape(shape: Shape, strides: Shape, new_shape: Shape, itemsize: int) -> Shape | None:
    """The strides of `new_shape` as a view of an array of `shape`/`strides` in C order, or
    None when numpy's reshape must copy (its `_attempt_nocopy_reshape`)."""
    old = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    old_dims, old_strides = [n for n, _ in old], [s for _, s in old]
    new_strides = [0] * len(new_shape)
    oi, oj, ni, nj = 0, 1, 0, 1
    while ni < len(new_shape) and oi < len(old_dims):
        np_, op = new_shape[ni], old_dims[oi]
        while np_ != op:
            if np_ < op:
                np_ *= new_shape[nj]
                nj += 1
            else:
                op *= old_dims[oj]
                oj += 1
        for ok in range(oi, oj - 1):
            if old_strides[ok] != old_dims[ok + 1] * old_strides[ok + 1]:
                return None
        new_strides[nj - 1] = old_strides[oj - 1]
        for nk in range(nj - 1, ni, -1):
            new_strides[nk - 1] = new_strides[nk] * new_shape[nk]
        ni, nj, oi, oj = nj, nj + 1, oj, oj + 1
    last = new_strides[ni - 1] if ni >= 1 else itemsize
    for nk in range(ni, len(new_shape)):
        new_strides[nk] = last
    return tuple(new_strides)


def _infer_shape(new_shape: Any, size: int) -> Shape:
    if isinstance(new_shape, int | np.integer):
        new_shape = (new_shape,)
    dims = [int(n) for n in new_shape]
    if dims.count(-1) > 1:
        raise ValueError("can only specify one unknown dimension")
    if -1 in dims:
        known = math.prod(n for n in dims if n != -1)
        if known == 0 or size % known:
            raise ValueError(f"cannot reshape array of size {size} into shape {tuple(dims)}")
        dims[dims.index(-1)] = size // known
    if math.prod(dims) != size:
        raise ValueError(f"cannot reshape array of size {size} into shape {tuple(dims)}")
    return tuple(dims)


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    return tuple(sorted(int(a) % ndim for a in axes)) if ndim else ()


class _Flags:
    """The part of `ndarray.flags` the engine reads."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata", "writeable")

    def __init__(self, a: MetaArray) -> None:
        self.owndata = a.base is None
        self.writeable = a._writeable
        dims = [(n, s) for n, s in zip(a.shape, a.strides, strict=True) if n != 1]
        c = _c_strides(tuple(n for n, _ in dims), a.itemsize)
        f = tuple(reversed(_c_strides(tuple(reversed([n for n, _ in dims])), a.itemsize)))
        self.c_contiguous = tuple(s for _, s in dims) == c
        self.f_contiguous = tuple(s for _, s in dims) == f


def _binary(ufunc: np.ufunc) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """An operator, its reflection and its in-place form, all numpy's `ufunc` (so dtypes and
    layouts follow numpy's rules); a Tensor operand gets its own operator instead."""

    def forward(self: MetaArray, other: Any) -> Any:
        return ufunc(self, other) if _is_operand(other) else NotImplemented

    def reflected(self: MetaArray, other: Any) -> Any:
        return ufunc(other, self) if _is_operand(other) else NotImplemented

    def in_place(self: MetaArray, other: Any) -> Any:
        return ufunc(self, other, out=self) if _is_operand(other) else NotImplemented

    return forward, reflected, in_place


def _unary(ufunc: np.ufunc) -> Callable[..., Any]:
    def apply(self: MetaArray) -> Any:
        return ufunc(self)

    return apply


# ---- the array ----------------------------------------------------------------------------------
class MetaArray:
    """An array with a shape, a dtype and strides but no data (see the module docstring)."""

    __slots__ = ("_writeable", "base", "dtype", "shape", "strides")
    __array_priority__ = 50  # below Tensor's, so `meta op Tensor` is the Tensor's operator

    def __init__(
        self,
        shape: Any,
        dtype: Any = np.float64,
        strides: Shape | None = None,
        base: MetaArray | None = None,
        writeable: bool = True,
    ) -> None:
        self.shape: Shape = (
            (int(shape),) if isinstance(shape, int | np.integer) else tuple(map(int, shape))
        )
        self.dtype: np.dtype = np.dtype(dtype)
        self.strides: Shape = (
            _c_strides(self.shape, self.dtype.itemsize) if strides is None else tuple(strides)
        )
        # numpy's convention: a view's base is the array that owns the memory, never a view.
        self.base = base if base is None or base.base is None else base.base
        self._writeable = writeable

    # ---- properties like ndarray's --------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def flags(self) -> _Flags:
        return _Flags(self)

    @property
    def T(self) -> MetaArray:  # noqa: N802 - numpy's name
        return self.transpose()

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self) -> Iterator[MetaArray]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"MetaArray(shape={self.shape}, dtype={self.dtype})"

    # ---- no values ------------------------------------------------------------------------------
    def _no_value(self, what: str) -> DataFreeError:
        return DataFreeError(
            f"{what} of a data-free array {self.shape} {self.dtype}: it has no values"
        )

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise self._no_value("np.asarray/np.array")

    def __float__(self) -> float:
        raise self._no_value("float()")

    def __int__(self) -> int:
        raise self._no_value("int()")

    def __index__(self) -> int:
        raise self._no_value("an index")

    def __bool__(self) -> bool:
        raise self._no_value("the truth value")

    def __complex__(self) -> complex:
        raise self._no_value("complex()")

    def item(self, *args: Any) -> Any:
        raise self._no_value(".item()")

    def tolist(self) -> Any:
        raise self._no_value(".tolist()")

    # ---- views ----------------------------------------------------------------------------------
    def _view(self, shape: Shape, strides: Shape, writeable: bool | None = None) -> MetaArray:
        own = self._writeable if writeable is None else writeable
        return MetaArray(shape, self.dtype, strides, base=self, writeable=own)

    def reshape(self, *shape: Any, order: str = "C") -> MetaArray:
        if order != "C":
            raise DataFreeError(f"reshape(order={order!r}) is not supported on data-free arrays")
        if len(shape) == 1:
            shape = shape[0]
        new_shape = _infer_shape(shape, self.size)
        strides = _nocopy_reshape(self.shape, self.strides, new_shape, self.itemsize)
        if strides is None:  # numpy copies in C order, then views the copy
            return MetaArray(new_shape, self.dtype)
        return self._view(new_shape, strides)

    def ravel(self) -> MetaArray:
        return self.reshape(-1)

    def transpose(self, *axes: Any) -> MetaArray:
        given: Any = axes
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], tuple | list)):
            given = axes[0]
        perm = tuple(a % self.ndim for a in given) if given else tuple(reversed(range(self.ndim)))
        if sorted(perm) != list(range(self.ndim)):
            raise ValueError(f"axes {given} do not match an array of {self.ndim} dimensions")
        return self._view(tuple(self.shape[a] for a in perm), tuple(self.strides[a] for a in perm))

    def swapaxes(self, axis1: int, axis2: int) -> MetaArray:
        perm = list(range(self.ndim))
        a, b = axis1 % self.ndim, axis2 % self.ndim
        perm[a], perm[b] = perm[b], perm[a]
        return self.transpose(perm)

    def squeeze(self, axis: Any = None) -> MetaArray:
        if axis is None:
            drop = tuple(i for i, n in enumerate(self.shape) if n == 1)
        else:
            drop = _axes(axis, self.ndim)
            if any(self.shape[i] != 1 for i in drop):
                raise ValueError(
                    "cannot select an axis to squeeze out which has size not equal to one"
                )
        keep = [i for i in range(self.ndim) if i not in drop]
        return self._view(tuple(self.shape[i] for i in keep), tuple(self.strides[i] for i in keep))

    def view(self, dtype: Any = None) -> MetaArray:
        if dtype is not None and np.dtype(dtype) != self.dtype:
            raise DataFreeError("view() with another dtype is not supported on data-free arrays")
        return self._view(self.shape, self.strides)

    # ---- copies ---------------------------------------------------------------------------------
    def copy(self, order: str = "C") -> MetaArray:
        return self._fresh(self.dtype, order)

    def astype(self, dtype: Any, order: str = "K", copy: bool = True, **_: Any) -> MetaArray:
        dtype = np.dtype(dtype)
        if not copy and dtype == self.dtype:
            return self
        return self._fresh(dtype, order)

    def _fresh(self, dtype: np.dtype, order: str) -> MetaArray:
        if order == "K":
            return MetaArray(self.shape, dtype, _k_strides(self.shape, dtype.itemsize, [self]))
        if order == "F":
            strides = tuple(reversed(_c_strides(tuple(reversed(self.shape)), dtype.itemsize)))
            return MetaArray(self.shape, dtype, strides)
        return MetaArray(self.shape, dtype)

    def fill(self, value: Any) -> None:
        pass

    # ---- indexing -------------------------------------------------------------------------------
    def __getitem__(self, index: Any) -> MetaArray:
        return _getitem(self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        _getitem(self, index)  # checks the index; writing values is a no-op

    # ---- reductions as methods ------------------------------------------------------------------
    def sum(
        self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, **_: Any
    ) -> MetaArray:
        return _reduce(self, axis, keepdims, _sum_dtype(self.dtype, dtype), out)

    def prod(
        self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, **_: Any
    ) -> MetaArray:
        return _reduce(self, axis, keepdims, _sum_dtype(self.dtype, dtype), out)

    def max(self, axis: Any = None, out: Any = None, keepdims: bool = False, **_: Any) -> MetaArray:
        return _reduce(self, axis, keepdims, self.dtype, out)

    def min(self, axis: Any = None, out: Any = None, keepdims: bool = False, **_: Any) -> MetaArray:
        return _reduce(self, axis, keepdims, self.dtype, out)

    def mean(
        self, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, **_: Any
    ) -> MetaArray:
        return _reduce(self, axis, keepdims, _mean_dtype(self.dtype, dtype), out)

    def all(self, axis: Any = None, out: Any = None, keepdims: bool = False, **_: Any) -> MetaArray:
        return _reduce(self, axis, keepdims, np.dtype(bool), out)

    def any(self, axis: Any = None, out: Any = None, keepdims: bool = False, **_: Any) -> MetaArray:
        return _reduce(self, axis, keepdims, np.dtype(bool), out)

    # ---- operators ------------------------------------------------------------------------------
    __add__, __radd__, __iadd__ = _binary(np.add)
    __sub__, __rsub__, __isub__ = _binary(np.subtract)
    __mul__, __rmul__, __imul__ = _binary(np.multiply)
    __truediv__, __rtruediv__, __itruediv__ = _binary(np.true_divide)
    __floordiv__, __rfloordiv__, __ifloordiv__ = _binary(np.floor_divide)
    __mod__, __rmod__, __imod__ = _binary(np.remainder)
    __pow__, __rpow__, __ipow__ = _binary(np.power)
    __matmul__, __rmatmul__, __imatmul__ = _binary(np.matmul)
    __and__, __rand__, __iand__ = _binary(np.bitwise_and)
    __or__, __ror__, __ior__ = _binary(np.bitwise_or)
    __xor__, __rxor__, __ixor__ = _binary(np.bitwise_xor)
    __eq__ = _binary(np.equal)[0]  # type: ignore[assignment]
    __ne__ = _binary(np.not_equal)[0]  # type: ignore[assignment]
    __lt__ = _binary(np.less)[0]
    __le__ = _binary(np.less_equal)[0]
    __gt__ = _binary(np.greater)[0]
    __ge__ = _binary(np.greater_equal)[0]
    __neg__ = _unary(np.negative)
    __pos__ = _unary(np.positive)
    __abs__ = _unary(np.absolute)
    __invert__ = _unary(np.invert)
    __hash__ = None  # type: ignore[assignment]  # unhashable, like ndarray

    # ---- the protocols --------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if not all(_is_operand(x) for x in inputs):
            return NotImplemented  # a Tensor: let its own operator run
        if method == "__call__":
            return _ufunc_call(ufunc, inputs, kwargs)
        if method == "reduce":
            return _ufunc_reduce(ufunc, inputs, kwargs)
        if method == "accumulate":
            return MetaArray(np.shape(inputs[0]), _dtype_of(inputs[0]))
        if method == "at":  # np.add.at(full, index, g): values only, nothing to do
            _getitem(inputs[0], inputs[1])
            return None
        raise DataFreeError(f"numpy.{ufunc.__name__}.{method} is not supported on data-free arrays")

    def __array_function__(self, func: Callable, types: Any, args: Any, kwargs: Any) -> Any:
        impl = _FUNCTIONS.get(func)
        if impl is None:
            name = getattr(func, "__name__", repr(func))
            raise DataFreeError(f"numpy.{name} is not supported on data-free arrays")
        return impl(*args, **kwargs)


def _is_operand(x: Any) -> bool:
    """What numpy would take as an array; anything else (a Tensor) gets its own operator."""
    return isinstance(x, MetaArray | np.ndarray | np.generic | int | float | complex | list | tuple)


def _dtype_of(x: Any) -> np.dtype:
    if isinstance(x, MetaArray | np.ndarray | np.generic):
        return x.dtype
    return np.result_type(x)


def _weak(x: Any) -> Any:
    """What `ufunc.resolve_dtypes` takes for an operand: Python numbers stay "weak" (NEP 50)."""
    if isinstance(x, MetaArray | np.ndarray | np.generic):
        return x.dtype
    if isinstance(x, bool | list | tuple):
        return np.asarray(x).dtype
    return type(x)


@functools.cache
def _resolve(ufunc: np.ufunc, dtypes: tuple[Any, ...]) -> tuple[np.dtype, ...]:
    return ufunc.resolve_dtypes((*dtypes, *(None,) * ufunc.nout))[ufunc.nin :]


def _sum_dtype(dtype: np.dtype, requested: Any) -> np.dtype:
    """np.sum's dtype: booleans and small integers add up in the platform integer."""
    if requested is not None:
        return np.dtype(requested)
    if dtype.kind == "b" or (dtype.kind == "i" and dtype.itemsize < 8):
        return np.dtype(np.int64)
    if dtype.kind == "u" and dtype.itemsize < 8:
        return np.dtype(np.uint64)
    return dtype


def _mean_dtype(dtype: np.dtype, requested: Any) -> np.dtype:
    if requested is not None:
        return np.dtype(requested)
    return np.dtype(np.float64) if dtype.kind in "biu" else dtype


def _check_out(out: Any, shape: Shape) -> MetaArray:
    if isinstance(out, tuple):
        (out,) = out
    if not is_meta(out):
        raise DataFreeError("a data-free result needs a data-free out= array")
    if out.shape != shape:
        raise ValueError(f"out= has shape {out.shape}, the result has shape {shape}")
    return out


def _ufunc_call(ufunc: np.ufunc, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if ufunc is np.matmul:
        shape = _matmul_shape(_shape_of(inputs[0]), _shape_of(inputs[1]))
    elif ufunc.signature is not None:
        raise DataFreeError(f"numpy.{ufunc.__name__} is not supported on data-free arrays")
    else:
        shape = np.broadcast_shapes(*map(_shape_of, inputs))
    requested = kwargs.get("dtype")
    if requested is not None:
        dtypes: tuple[np.dtype, ...] = (np.dtype(requested),) * ufunc.nout
    else:
        dtypes = _resolve(ufunc, tuple(_weak(x) for x in inputs))
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, tuple) else (out,)
        results = tuple(_check_out(o, shape) for o in outs)
    elif ufunc is np.matmul:
        results = tuple(MetaArray(shape, dt) for dt in dtypes)
    else:
        results = tuple(
            MetaArray(shape, dt, _k_strides(shape, dt.itemsize, inputs)) for dt in dtypes
        )
    return results[0] if ufunc.nout == 1 else results


def _matmul_shape(a: Shape, b: Shape) -> Shape:
    if not a or not b:
        raise ValueError("matmul: input operand does not have enough dimensions")
    # A 1-D operand is a row (left) or a column (right) whose axis the result drops.
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ValueError(f"matmul: mismatch in core dimension, {a} @ {b}")
    rows = (a2[-2],) if len(a) > 1 else ()
    cols = (b2[-1],) if len(b) > 1 else ()
    return (*np.broadcast_shapes(a2[:-2], b2[:-2]), *rows, *cols)


def _reduce(a: MetaArray, axis: Any, keepdims: bool, dtype: np.dtype, out: Any = None) -> MetaArray:
    axes = _axes(axis, a.ndim)
    kept = tuple(1 if i in axes else n for i, n in enumerate(a.shape))
    shape = kept if keepdims else tuple(n for i, n in enumerate(a.shape) if i not in axes)
    if out is not None:
        return _check_out(out, shape)
    strides = _k_strides(kept, dtype.itemsize, [a])
    if not keepdims:
        strides = tuple(s for i, s in enumerate(strides) if i not in axes)
    return MetaArray(shape, dtype, strides)


def _ufunc_reduce(ufunc: np.ufunc, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> MetaArray:
    (a,) = inputs
    dtype = kwargs.get("dtype")
    if ufunc in (np.add, np.multiply):
        dtype = _sum_dtype(a.dtype, dtype)
    elif ufunc in (np.logical_and, np.logical_or):
        dtype = np.dtype(bool)
    else:
        dtype = a.dtype if dtype is None else np.dtype(dtype)
    return _reduce(
        a, kwargs.get("axis", 0), kwargs.get("keepdims", False), dtype, kwargs.get("out")
    )


# ---- indexing -----------------------------------------------------------------------------------
def _is_index_array(i: Any) -> bool:
    return isinstance(i, MetaArray | np.ndarray | list)


def _getitem(a: MetaArray, index: Any) -> MetaArray:
    entries = list(index) if isinstance(index, tuple) else [index]
    advanced = any(_is_index_array(i) for i in entries)
    used = sum(1 for i in entries if i is not None and i is not Ellipsis)
    if used > a.ndim:
        raise IndexError(f"too many indices for an array of {a.ndim} dimensions")
    dots = [k for k, i in enumerate(entries) if i is Ellipsis]
    if dots:
        at = dots[0]
        entries[at : at + 1] = [slice(None)] * (a.ndim - used)
    else:
        entries += [slice(None)] * (a.ndim - used)
    if advanced:
        return _advanced(a, entries)
    shape, strides, axis = [], [], 0
    for i in entries:
        if i is None:
            shape.append(1)
            strides.append(0)
        elif isinstance(i, slice):
            n = len(range(*i.indices(a.shape[axis])))
            shape.append(n)
            strides.append(a.strides[axis] * (i.step or 1))
            axis += 1
        elif isinstance(i, int | np.integer):
            if not -a.shape[axis] <= i < a.shape[axis]:
                raise IndexError(
                    f"index {i} is out of bounds for axis {axis} of size {a.shape[axis]}"
                )
            axis += 1
        else:
            raise DataFreeError(f"index {i!r} is not supported on data-free arrays")
    return a._view(tuple(shape), tuple(strides))


def _advanced(a: MetaArray, entries: list[Any]) -> MetaArray:
    """Integer-array indexing: a fresh array. The broadcast index shape replaces the indexed
    axes where they are adjacent, else comes first (integers count as 0-d index arrays)."""
    layout: list[tuple[bool, Any]] = []  # (advanced?, index array or the basic axis' length)
    axis = 0
    for i in entries:
        if i is None:
            layout.append((False, 1))
        elif isinstance(i, slice):
            layout.append((False, len(range(*i.indices(a.shape[axis])))))
            axis += 1
        else:
            kind = i.dtype.kind if is_meta(i) else np.asarray(i).dtype.kind
            if kind == "b" and is_meta(i):
                raise DataFreeError("a boolean mask of a data-free array has no known shape")
            if kind == "b":  # a real mask: its True positions, one index array per axis
                layout.extend((True, rows) for rows in np.nonzero(i))
                axis += np.ndim(i)
                continue
            if kind not in "iu":
                raise IndexError("arrays used as indices must be of integer (or boolean) type")
            layout.append((True, i))
            axis += 1
    positions = [p for p, (adv, _) in enumerate(layout) if adv]
    index_shape = np.broadcast_shapes(*(np.shape(x) for adv, x in layout if adv))
    basic = [n for adv, n in layout if not adv]
    adjacent = positions == list(range(positions[0], positions[0] + len(positions)))
    before = positions[0] if adjacent else 0
    return MetaArray((*basic[:before], *index_shape, *basic[before:]), a.dtype)


# ---- numpy functions ----------------------------------------------------------------------------
def _like(prototype: Any, dtype: Any = None, shape: Any = None, **_: Any) -> MetaArray:
    dtype = _dtype_of(prototype) if dtype is None else np.dtype(dtype)
    if shape is not None:
        return MetaArray(shape, dtype)
    return MetaArray(
        np.shape(prototype), dtype, _k_strides(np.shape(prototype), dtype.itemsize, [prototype])
    )


def _full_like(prototype: Any, fill_value: Any, dtype: Any = None, **kw: Any) -> MetaArray:
    return _like(prototype, dtype, **kw)


def _as_meta(x: Any) -> MetaArray:
    if is_meta(x):
        return x
    raise DataFreeError(f"expected a data-free array, got {type(x).__name__}")


def _concatenate(
    arrays: Sequence[Any], axis: int = 0, out: Any = None, dtype: Any = None, **_: Any
) -> MetaArray:
    shapes = [np.shape(x) for x in arrays]
    axis %= len(shapes[0])
    shape = list(shapes[0])
    shape[axis] = sum(s[axis] for s in shapes)
    result_dtype = (
        np.dtype(dtype) if dtype is not None else np.result_type(*(_dtype_of(x) for x in arrays))
    )
    if out is not None:
        return _check_out(out, tuple(shape))
    full = tuple(shape)
    # numpy lays the result out like its (first) input, by the order of its strides.
    order_of = MetaArray(full, result_dtype, _strides_of(arrays[0]))
    return MetaArray(full, result_dtype, _k_strides(full, result_dtype.itemsize, [order_of]))


def _stack(arrays: Sequence[Any], axis: int = 0, **kw: Any) -> MetaArray:
    expanded = [_expand_dims(_as_meta(x), axis) for x in arrays]
    return _concatenate(expanded, axis % expanded[0].ndim, **kw)


def _split(a: MetaArray, indices_or_sections: Any, axis: int = 0) -> list[MetaArray]:
    axis %= a.ndim
    n = a.shape[axis]
    if isinstance(indices_or_sections, int | np.integer):
        if n % indices_or_sections:
            raise ValueError("array split does not result in an equal division")
        step = n // int(indices_or_sections)
        bounds = [step * i for i in range(1, int(indices_or_sections))]
    else:
        bounds = [int(b) for b in indices_or_sections]
    edges = [0, *bounds, n]
    pieces = []
    for start, stop in itertools.pairwise(edges):
        region = [slice(None)] * a.ndim
        region[axis] = slice(start, stop)
        pieces.append(a[tuple(region)])
    return pieces


def _broadcast_to(a: Any, shape: Any, subok: bool = False) -> MetaArray:
    a = _as_meta(a)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    if np.broadcast_shapes(a.shape, shape) != shape:
        raise ValueError(f"cannot broadcast {a.shape} to {shape}")
    return a._view(shape, _operand_strides(shape, a), writeable=False)


def _expand_dims(a: MetaArray, axis: Any) -> MetaArray:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    ndim = a.ndim + len(axes)
    axes = tuple(sorted(ax % ndim for ax in axes))
    index = tuple(None if i in axes else slice(None) for i in range(ndim))
    return a[index]


def _where(condition: Any, x: Any = None, y: Any = None) -> MetaArray:
    if x is None or y is None:
        raise DataFreeError("np.where(condition) has a data-dependent shape")
    operands = (condition, x, y)
    shape = np.broadcast_shapes(*(np.shape(v) for v in operands))
    dtype = np.result_type(_weak_value(x), _weak_value(y))
    return MetaArray(shape, dtype, _k_strides(shape, dtype.itemsize, operands))


def _weak_value(x: Any) -> Any:
    return x.dtype if isinstance(x, MetaArray | np.ndarray | np.generic) else x


def _einsum_labels(term: str, ndim: int) -> list[str]:
    """One label per axis; the axes under "..." get labels "0", "1", ... counted from the right,
    so they line up across operands as broadcasting does."""
    if "..." not in term:
        return list(term)
    head, tail = term.split("...")
    n = ndim - len(head) - len(tail)
    return [*head, *(str(n - 1 - i) for i in range(n)), *tail]


def _einsum(
    subscripts: str, *operands: Any, out: Any = None, dtype: Any = None, **_: Any
) -> MetaArray:
    inputs, arrow, output = subscripts.replace(" ", "").partition("->")
    labelled = [
        _einsum_labels(term, np.ndim(x))
        for term, x in zip(inputs.split(","), operands, strict=True)
    ]
    sizes: dict[str, int] = {}
    for labels, x in zip(labelled, operands, strict=True):
        for label, n in zip(labels, np.shape(x), strict=True):
            if sizes.get(label, 1) == 1:
                sizes[label] = n
            elif n not in (1, sizes[label]):
                raise ValueError(f"einsum: operands disagree on the size of {label!r}")
    dims = max((sum(c.isdigit() for c in labels) for labels in labelled), default=0)
    if not arrow:  # implicit output: the broadcast axes, then labels used once, sorted
        once = sorted(c for c in sizes if not c.isdigit() and inputs.count(c) == 1)
        output = ("..." if "..." in inputs else "") + "".join(once)
    out_labels = _einsum_labels(output, len(output.replace("...", "")) + dims)
    shape = tuple(sizes[c] for c in out_labels)
    if out is not None:
        return _check_out(out, shape)
    result = np.dtype(dtype) if dtype is not None else np.result_type(*map(_dtype_of, operands))
    # order "K": the output's axes sorted by the strides the operands have along them
    order_of = []
    for labels, x in zip(labelled, operands, strict=True):
        along = dict(zip(labels, _strides_of(x), strict=True))
        order_of.append(MetaArray(shape, result, tuple(along.get(c, 0) for c in out_labels)))
    return MetaArray(shape, result, _k_strides(shape, result.itemsize, order_of))


def _copyto(dst: Any, src: Any, casting: str = "same_kind", where: Any = True) -> None:
    dst = _as_meta(dst)
    np.broadcast_shapes(np.shape(src), dst.shape)


def _tri(m: Any, k: int = 0) -> MetaArray:
    return _like(_as_meta(m))


def _sum(
    a: Any, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, **kw: Any
) -> MetaArray:
    return _as_meta(a).sum(axis, dtype, out, keepdims)


def _max(a: Any, axis: Any = None, out: Any = None, keepdims: bool = False, **kw: Any) -> MetaArray:
    return _as_meta(a).max(axis, out, keepdims)


def _min(a: Any, axis: Any = None, out: Any = None, keepdims: bool = False, **kw: Any) -> MetaArray:
    return _as_meta(a).min(axis, out, keepdims)


def _mean(
    a: Any, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, **kw: Any
) -> MetaArray:
    return _as_meta(a).mean(axis, dtype, out, keepdims)


def _all(a: Any, axis: Any = None, out: Any = None, keepdims: bool = False, **kw: Any) -> MetaArray:
    return _as_meta(a).all(axis, out, keepdims)


def _any(a: Any, axis: Any = None, out: Any = None, keepdims: bool = False, **kw: Any) -> MetaArray:
    return _as_meta(a).any(axis, out, keepdims)


def _transpose(a: Any, axes: Any = None) -> MetaArray:
    return _as_meta(a).transpose(axes)


def _reshape(a: Any, shape: Any = None, order: str = "C", **kw: Any) -> MetaArray:
    return _as_meta(a).reshape(kw.get("newshape", shape), order=order)


def _copy(a: Any, order: str = "K", **_: Any) -> MetaArray:
    return _as_meta(a).copy(order)


def _result_type(*arrays_and_dtypes: Any) -> np.dtype:
    return np.result_type(*(x.dtype if is_meta(x) else x for x in arrays_and_dtypes))


_FUNCTIONS: dict[Callable, Callable] = {
    np.reshape: _reshape,
    np.ravel: lambda a, order="C": _as_meta(a).reshape(-1, order=order),
    np.transpose: _transpose,
    np.swapaxes: lambda a, axis1, axis2: _as_meta(a).swapaxes(axis1, axis2),
    np.squeeze: lambda a, axis=None: _as_meta(a).squeeze(axis),
    np.expand_dims: lambda a, axis: _expand_dims(_as_meta(a), axis),
    np.broadcast_to: _broadcast_to,
    np.concatenate: _concatenate,
    np.stack: _stack,
    np.split: _split,
    np.sum: _sum,
    np.max: _max,
    np.amax: _max,
    np.min: _min,
    np.amin: _min,
    np.mean: _mean,
    np.all: _all,
    np.any: _any,
    np.einsum: _einsum,
    np.where: _where,
    np.empty_like: _like,
    np.zeros_like: _like,
    np.ones_like: _like,
    np.full_like: _full_like,
    np.copyto: _copyto,
    np.copy: _copy,
    np.tril: _tri,
    np.triu: _tri,
    np.shape: lambda a: a.shape,
    np.ndim: lambda a: a.ndim,
    np.size: lambda a, axis=None: a.size if axis is None else a.shape[axis],
    np.result_type: _result_type,
}


# ---- creating arrays: what the engine calls where it has only a shape ---------------------------
# These are typed as returning ndarrays: in the engine a MetaArray stands in for one (duck-typed,
# as PyTorch's FakeTensor stands in for a Tensor).
def shaped(shape: Any, dtype: Any = np.float64) -> np.ndarray:
    """A fresh C-contiguous MetaArray, typed as the ndarray it stands in for."""
    return cast(np.ndarray, MetaArray(shape, dtype))


def _wants_meta(like: Any) -> bool:
    return is_meta(like) if like is not None else _data_free


def empty(shape: Any, dtype: Any = np.float64, like: Any = None) -> np.ndarray:
    """`np.empty`, or a MetaArray when `like` is one (or, without `like`, in `data_free()`)."""
    return shaped(shape, dtype) if _wants_meta(like) else np.empty(shape, dtype)


def zeros(shape: Any, dtype: Any = np.float64, like: Any = None) -> np.ndarray:
    """`np.zeros`, or a MetaArray (see `empty`)."""
    return shaped(shape, dtype) if _wants_meta(like) else np.zeros(shape, dtype)


def ones(shape: Any, dtype: Any = np.float64, like: Any = None) -> np.ndarray:
    """`np.ones`, or a MetaArray (see `empty`)."""
    return shaped(shape, dtype) if _wants_meta(like) else np.ones(shape, dtype)


def arange(n: int, like: Any = None) -> np.ndarray:
    """`np.arange(n)` (int64), or a MetaArray of its shape (see `empty`)."""
    return shaped(n, np.int64) if _wants_meta(like) else np.arange(n, dtype=np.int64)


def uniform(rng: np.random.Generator, shape: Shape, like: Any = None) -> np.ndarray:
    """`rng.random(shape)`, or a float64 MetaArray without drawing (see `empty`)."""
    return shaped(shape, np.float64) if _wants_meta(like) else rng.random(shape)


def asarray(x: Any, dtype: Any = None) -> np.ndarray:
    """`np.asarray` that keeps a MetaArray (cast to `dtype` when given)."""
    if type(x) is MetaArray:
        return cast(np.ndarray, x if dtype is None else x.astype(dtype, copy=False))
    return np.asarray(x, dtype=dtype)


def ascontiguousarray(x: Any) -> np.ndarray:
    """`np.ascontiguousarray` that keeps a MetaArray: `x` itself when it is already C-contiguous
    and at least 1-d, else a fresh C-contiguous copy (a 0-d array becomes shape (1,))."""
    if type(x) is MetaArray:
        if x.ndim and x.flags.c_contiguous:
            return cast(np.ndarray, x)
        return shaped(x.shape or (1,), x.dtype)
    return np.ascontiguousarray(x)


def token_ids(shape: Shape) -> MetaArray:
    """Data-free token ids (int64) of `shape`, e.g. (batch, block) for a model's inputs."""
    return MetaArray(shape, np.int64)
