"""Finite-difference gradient checks for every axiom, the ops with a hand-written backward.

Every other gradient in civetta is composed from these, so each axiom is checked in float64 with
a random upstream gradient over broadcasting shapes, 0-d tensors and size-1 axes. `CASES` maps
each axiom's name to its cases; a coverage test fails when an axiom (in `AXIOMS` or merely
defined in axioms.py) has none.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from civetta import Tensor
from civetta import axioms as ax
from civetta.gradcheck import GradientCheckError, check_gradients, check_tensor_gradients
from civetta.tensor import make_node

RTOL = 1e-6
_rng = np.random.default_rng(20240611)


@dataclass(frozen=True)
class Case:
    fn: Callable[..., Tensor | list[Tensor]]
    inputs: tuple[np.ndarray, ...]
    label: str


def normal(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape)


def positive(*shape: int) -> np.ndarray:
    return _rng.uniform(0.5, 2.0, shape)


def separated_pair(sa: tuple[int, ...], sb: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Operands whose broadcast values differ by >= 0.05 everywhere: max/maximum are
    discontinuous at ties, where a finite difference straddles the kink."""
    while True:
        a, b = normal(*sa), normal(*sb)
        if np.all(np.abs(a - b) >= 0.05):
            return a, b


def constant(x: np.ndarray) -> Tensor:
    return Tensor(x)  # float64 and no gradient: exercises the `need_*` branches


BINARY_SHAPES: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
    ((), ()),
    ((2, 3), (2, 3)),
    ((3, 1), (1, 4)),
    ((), (2, 3)),
    ((2, 3), ()),
    ((4,), (3, 4)),
    ((2, 1, 4), (3, 1)),
    ((1,), (2, 1)),
    ((1, 1), (1, 1)),
]
UNARY_SHAPES: list[tuple[int, ...]] = [(), (1,), (5,), (2, 3, 1), (1, 4)]
REDUCE_CASES: list[tuple[tuple[int, ...], object]] = [
    ((), None),
    ((5,), None),
    ((5,), 0),
    ((5,), -1),
    ((2, 3, 4), None),
    ((2, 3, 4), 0),
    ((2, 3, 4), 1),
    ((2, 3, 4), -1),
    ((2, 3, 4), (0, 2)),
    ((2, 3, 4), (-1, -2)),
    ((1, 3), 0),
    ((3, 1), (0, 1)),
]


def _cases() -> dict[str, list[Case]]:
    cases: dict[str, list[Case]] = {}

    def binary(name: str, op: Callable[..., Tensor]) -> list[Case]:
        out = [Case(op, (normal(*sa), normal(*sb)), f"{sa}x{sb}") for sa, sb in BINARY_SHAPES]
        const = normal(3, 1)
        out.append(Case(lambda a: op(a, 2.5), (normal(2, 3),), "tensor-python-scalar"))
        out.append(Case(lambda b: op(-1.5, b), (normal(2, 3),), "python-scalar-tensor"))
        out.append(Case(lambda a: op(a, constant(const)), (normal(3, 4),), "tensor-constant"))
        out.append(Case(lambda b: op(constant(const), b), (normal(3, 4),), "constant-tensor"))
        out.append(Case(lambda a: op(a, a), (normal(2, 2),), "same-tensor-twice"))
        return out

    cases["add"] = binary("add", ax.add)
    cases["mul"] = binary("mul", ax.mul)
    cases["neg"] = [Case(ax.neg, (normal(*s),), f"{s}") for s in UNARY_SHAPES]
    cases["exp"] = [Case(ax.exp, (normal(*s),), f"{s}") for s in UNARY_SHAPES]
    cases["log"] = [Case(ax.log, (positive(*s),), f"{s}") for s in UNARY_SHAPES]
    cases["reciprocal"] = [Case(ax.reciprocal, (positive(*s),), f"{s}") for s in UNARY_SHAPES]
    cases["reciprocal"].append(Case(ax.reciprocal, (-positive(3, 2),), "negative"))

    cases["maximum"] = [
        Case(ax.maximum, separated_pair(sa, sb), f"{sa}x{sb}") for sa, sb in BINARY_SHAPES
    ]
    away_from_zero = np.array([-1.5, -0.3, 0.2, 0.7, 2.0])
    cases["maximum"].append(Case(lambda a: ax.maximum(a, 0.0), (away_from_zero,), "relu-like"))
    cases["maximum"].append(
        Case(lambda b: ax.maximum(constant(np.full(5, 0.1)), b), (away_from_zero,), "constant-a")
    )

    where_shapes = [
        ((2, 3), (2, 3), (2, 3)),
        ((3, 1), (3, 4), (3, 4)),
        ((4,), (3, 4), ()),
        ((3, 4), (4,), (3, 1)),
        ((), (2, 2), (2, 2)),
        ((2, 1, 3), (4, 1), (1,)),
    ]
    cases["where"] = []
    for sc, sa, sb in where_shapes:
        cond = _rng.random(sc) > 0.5
        cases["where"].append(
            Case(lambda a, b, c=cond: ax.where(c, a, b), (normal(*sa), normal(*sb)), f"{sc}")
        )
    cond = np.array([True, False, True])
    cases["where"].append(
        Case(lambda a: ax.where(Tensor(cond), a, 0.0), (normal(2, 3),), "tensor-cond-scalar-b")
    )

    cases["sum"] = []
    cases["max"] = []
    for shape, axis in REDUCE_CASES:
        for keepdims in (False, True):
            label = f"{shape}-axis={axis}-keepdims={keepdims}"
            cases["sum"].append(
                Case(lambda a, x=axis, k=keepdims: ax.sum(a, x, k), (normal(*shape),), label)
            )
            cases["max"].append(
                Case(lambda a, x=axis, k=keepdims: ax.max(a, x, k), (normal(*shape),), label)
            )

    reshapes = [((2, 3), (3, 2)), ((6,), (1, 2, 3)), ((), (1, 1)), ((2, 3), (-1,)), ((1,), ())]
    cases["reshape"] = [
        Case(lambda a, s=new: ax.reshape(a, s), (normal(*old),), f"{old}->{new}")
        for old, new in reshapes
    ]
    transposes = [((2, 3), None), ((2, 3, 4), (1, 0, 2)), ((2, 3, 4), (-1, 0, 1)), ((), None)]
    cases["transpose"] = [
        Case(lambda a, p=perm: ax.transpose(a, p), (normal(*shape),), f"{shape}-{perm}")
        for shape, perm in transposes
    ]
    broadcasts = [
        ((), (2, 3)),
        ((3, 1), (2, 3, 4)),
        ((1,), (5,)),
        ((2, 3), (2, 3)),
        ((1, 3), (4, 1, 3)),
    ]
    cases["broadcast_to"] = [
        Case(lambda a, s=new: ax.broadcast_to(a, s), (normal(*old),), f"{old}->{new}")
        for old, new in broadcasts
    ]

    indices: list[tuple[object, str]] = [
        (slice(1, 3), "rows-slice"),
        ((slice(None), 2), "column-int"),
        (-1, "negative-int"),
        ((1, 2), "element"),
        ((slice(None, None, -1), slice(0, 5, 2)), "negative-step"),
        ((None, Ellipsis, 1), "newaxis-ellipsis"),
        (np.array([0, 2, 2, 3, 0]), "int-array-repeated"),
        ((np.array([0, 1, 1, 3]), np.array([2, 2, 2, 4])), "pairs-repeated"),
        ((slice(None), np.array([4, 0, 4])), "slice-and-array"),
        (np.array([True, False, True, True]), "bool-mask"),
        ([3, 3, 1], "list-repeated"),
    ]
    cases["getitem"] = [
        Case(lambda a, i=index: ax.getitem(a, i), (normal(4, 5),), label)
        for index, label in indices
    ]

    concats = [
        ([(2, 3), (2, 3)], 0),
        ([(2, 3), (2, 1), (2, 2)], 1),
        ([(2, 3, 1), (2, 3, 2)], -1),
        ([(3,)], 0),
    ]
    cases["concat"] = [
        Case(
            lambda *ts, x=axis: ax.concat(list(ts), x), tuple(normal(*s) for s in shapes), f"{axis}"
        )
        for shapes, axis in concats
    ]
    head = normal(1, 2)
    cases["concat"].append(
        Case(lambda a: ax.concat([constant(head), a], 0), (normal(2, 2),), "with-constant")
    )

    splits: list[tuple[tuple[int, ...], int | list[int], int]] = [
        ((6, 4), 3, 0),
        ((2, 6), [1, 4], 1),
        ((2, 3, 4), 2, -1),
        ((5, 2), [0, 3], 0),  # the first piece is empty
    ]
    cases["split"] = [
        Case(
            lambda a, s=sections, x=axis: ax.split(a, s, x), (normal(*shape),), f"{sections}-{axis}"
        )
        for shape, sections, axis in splits
    ]
    # Only some pieces used: the others get no gradient, the input's gradient is zero there.
    cases["split"].append(Case(lambda a: ax.split(a, 3, 0)[1], (normal(6, 2),), "one-piece-used"))

    matmuls = [
        ((3, 4), (4, 2)),
        ((1, 4), (4, 1)),
        ((2, 3, 4), (2, 4, 5)),
        ((2, 3, 4, 5), (5, 2)),
        ((2, 2, 3, 4), (2, 2, 4, 3)),
    ]
    cases["matmul"] = [
        Case(ax.matmul, (normal(*sa), normal(*sb)), f"{sa}@{sb}") for sa, sb in matmuls
    ]
    w, xs = normal(4, 3), normal(2, 5, 4)
    cases["matmul"].append(Case(lambda a: ax.matmul(a, constant(w)), (normal(2, 5, 4),), "x@const"))
    cases["matmul"].append(Case(lambda b: ax.matmul(constant(xs), b), (normal(4, 3),), "const@w"))
    return cases


CASES = _cases()
ALL_CASES = [(name, case) for name, group in CASES.items() for case in group]


@pytest.mark.parametrize(
    ("name", "case"), ALL_CASES, ids=[f"{name}-{case.label}" for name, case in ALL_CASES]
)
def test_axiom_gradient(name: str, case: Case) -> None:
    error = check_gradients(case.fn, list(case.inputs), seed=len(case.label), rtol=RTOL)
    assert error <= RTOL


def test_every_axiom_has_gradient_cases() -> None:
    listed = {fn.__name__ for fn in ax.AXIOMS}
    defined = {
        name
        for name, fn in inspect.getmembers(ax, inspect.isfunction)
        if fn.__module__ == ax.__name__ and not name.startswith("_")
    }
    assert defined == listed, f"public functions missing from AXIOMS: {defined - listed}"
    assert set(CASES) == listed, f"untested: {listed - set(CASES)}, stale: {set(CASES) - listed}"
    assert all(CASES[name] for name in listed)


def test_checker_rejects_a_wrong_backward() -> None:
    """The check has teeth: a backward that is off by a factor, or routes a gradient by the
    wrong index, fails."""

    def doubled_exp(a: Tensor) -> Tensor:
        out = np.exp(a.data)
        return make_node(out, (a,), lambda g: (2.0 * g * out,))

    def shifted_identity(a: Tensor) -> Tensor:
        return make_node(a.data.copy(), (a,), lambda g: (np.roll(g, 1),))

    with pytest.raises(GradientCheckError):
        check_gradients(doubled_exp, [normal(3)])
    with pytest.raises(GradientCheckError):
        check_gradients(shifted_identity, [normal(4)])


def test_checker_on_captured_parameters() -> None:
    """The model-level entry point: parameters captured in a closure, a sampled subset of a
    large one, existing .grad left as it was, float32 refused."""
    w = Tensor(normal(30, 20), requires_grad=True)
    b = Tensor(normal(20), requires_grad=True)
    w.grad = marker = np.ones(w.shape)
    x = constant(normal(5, 30))

    def model() -> Tensor:
        return ax.exp(ax.mul(ax.add(ax.matmul(x, w), b), 0.1))

    assert check_tensor_gradients(model, [w, b], max_elements=40) <= RTOL
    assert w.grad is marker and b.grad is None
    with pytest.raises(TypeError):
        check_tensor_gradients(model, [Tensor(np.ones(3, dtype=np.float32), requires_grad=True)])


def test_max_shares_tied_gradient_equally() -> None:
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]]), requires_grad=True)
    ax.max(x, axis=1).backward(np.array([4.0, 5.0]))
    np.testing.assert_array_equal(x.grad, [[0.0, 2.0, 2.0], [5.0, 0.0, 0.0]])


def test_maximum_sends_ties_to_first_operand() -> None:
    a = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = Tensor(np.array([1.0, 5.0, 0.0]), requires_grad=True)
    ax.maximum(a, b).backward(np.array([10.0, 20.0, 30.0]))
    np.testing.assert_array_equal(a.grad, [10.0, 0.0, 30.0])
    np.testing.assert_array_equal(b.grad, [0.0, 20.0, 0.0])


def test_getitem_repeated_indices_add_up() -> None:
    x = Tensor(np.zeros(4), requires_grad=True)
    ax.getitem(x, np.array([1, 1, 1, 3])).backward(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 6.0, 0.0, 4.0])


def test_split_pieces_and_concat_round_trip() -> None:
    x = normal(3, 7)
    pieces = ax.split(Tensor(x), [2, 5], axis=1)
    assert [p.shape for p in pieces] == [(3, 2), (3, 3), (3, 2)]
    np.testing.assert_array_equal(ax.concat(pieces, axis=1).data, x)
