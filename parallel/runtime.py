"""What a training loop needs to know about the layout it runs in.

A `Runtime` ties a `Layout` (`parallel.layout`) to this rank's `Mesh` and to the sharding of the
model's parameters (dense or tensor-parallel, whole or, under ZeRO-3, sharded over dp; a MoE
layer's experts split over ep and reduced over edp, `parallel.experts`), and
offers the few layout-dependent steps of a training step: this rank's share of the batch,
gradient synchronisation, the global gradient norm, and the loss averaged over data-parallel
ranks. With a world of one rank every step is local and nothing is sent. The update itself
(plain data parallelism or ZeRO) is `parallel.update`.
"""

from __future__ import annotations

import numpy as np

from civetta import meta
from civetta.nn import DENSE, WHOLE, DenseSharding, ParameterStore
from parallel.comm import Ledger
from parallel.context import ContextShard
from parallel.data_parallel import GradientAverager
from parallel.experts import ExpertShard
from parallel.layout import Layout
from parallel.mesh import Mesh
from parallel.tensor_parallel import TensorParallelSharding
from parallel.zero import ShardedStore


class Runtime:
    """`layout` defaults to one process; `mesh` to this process's place in the MPI world for
    that layout (a virtual mesh, `parallel.virtual`, runs one rank of it alone)."""

    def __init__(self, layout: Layout | None = None, mesh: Mesh | None = None) -> None:
        self.layout = Layout() if layout is None else layout
        lay = self.layout
        if mesh is None:
            mesh = Mesh(lay.dp, lay.tp, lay.pp, lay.order, cp=lay.cp, ep=lay.ep)
        self.mesh = mesh
        assert self.mesh.layout == lay.mesh, (self.mesh.layout, lay.mesh)
        self.ledger: Ledger = self.mesh.ledger
        # Gradients are averaged, and ZeRO shards, over every rank holding the same parameters:
        # dp × cp (context-parallel ranks hold other tokens of the same sequences).
        self.dp_group = self.mesh.group("dp_cp")
        self.tp_group = self.mesh.group("tp")
        self.pp_group = self.mesh.group("pp")
        self.cp_group = self.mesh.group("cp")
        # Experts fold onto dp × cp: ep ranks hold different experts, edp ranks the same ones.
        self.ep_group = self.mesh.group("ep")
        self.edp_group = self.mesh.group("edp")
        context = None
        if self.cp_group.size > 1:
            context = ContextShard(self.cp_group, lay.cp_comm, lay.cp_balance)
        # ZeRO-3 shards every parameter (each tensor-parallel slice) over the dp group.
        store: ParameterStore = ShardedStore(self.dp_group) if lay.zero == 3 else WHOLE
        self.sequence_parallel = lay.sequence_parallel and self.tp_group.size > 1
        experts = self._expert_shard() if self.mesh.world_size > 1 else None
        plain = store is WHOLE and context is None and experts is None
        self.sharding: DenseSharding = DENSE if plain else DenseSharding(store, context, experts)
        if self.tp_group.size > 1:
            self.sharding = TensorParallelSharding(
                self.tp_group, lay.sequence_parallel, store, context, experts
            )
        self.averager = GradientAverager(self.dp_group, lay.bucket_mb)
        # Expert gradients: summed over the ranks holding the same experts, divided by dp × cp
        # (every rank's tokens reached them through the all-to-alls).
        self.expert_averager = GradientAverager(
            self.edp_group, lay.bucket_mb, divisor=self.dp_group.size
        )

    def _expert_shard(self) -> ExpertShard:
        """Where a MoE layer's experts live and whose tokens its routing statistics pool: the
        ranks splitting this rank's sequences (cp, and tp under sequence parallelism), or with
        every data-parallel rank's as well."""
        expert_store: ParameterStore = (
            ShardedStore(self.edp_group) if self.layout.zero == 3 else WHOLE
        )
        split = (self.tp_group,) if self.sequence_parallel else ()
        token_groups = {
            "microbatch": (*split, self.cp_group),
            "data_parallel": (*split, self.dp_group),
        }
        aux_scale = 1.0 / self.tp_group.size if self.sequence_parallel else 1.0
        return ExpertShard(self.ep_group, expert_store, token_groups, aux_scale)

    @property
    def expert_names(self) -> frozenset[str]:
        """The expert parameters this rank holds (gradients over edp, not dp)."""
        experts = self.sharding.experts
        return frozenset(experts.names) if experts is not None else frozenset()

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which rows of the batch it takes."""
        return self.mesh.coords["dp"]

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def cp_rank(self) -> int:
        """This rank's context-parallel index: which chunks of each sequence it takes."""
        return self.cp_group.rank

    @property
    def pp_rank(self) -> int:
        return self.pp_group.rank

    def _holds_tied_copy(self, name: str, tied: tuple[str, ...]) -> bool:
        """Whether `name` is the second copy of a weight tied across the first and last stage."""
        if self.layout.shares_ends_rank:  # one table on one rank: no second copy anywhere
            return False
        return name in tied and self.pp_group.size > 1 and self.pp_rank == self.pp_group.size - 1

    def _sharded(self, name: str) -> bool:
        sharding = self.sharding
        return isinstance(sharding, TensorParallelSharding) and sharding.is_sharded(name)

    def full_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Whole parameters or gradients from arrays shaped like this rank's parameters
        (collective over dp under ZeRO-3, then over tp)."""
        sharding, store = self.sharding, self.sharding.store
        experts = self.expert_names
        with self.ledger.phase("other"):
            if isinstance(store, ShardedStore):
                expert_store = sharding.experts.store if sharding.experts is not None else store
                arrays = {
                    name: (expert_store if name in experts else store).full_array(name, a)
                    for name, a in arrays.items()
                }
            if isinstance(sharding, TensorParallelSharding):
                arrays = {name: sharding.full_array(name, a) for name, a in arrays.items()}
        return dict(arrays)

    def synchronize_gradients(
        self, grads: dict[str, np.ndarray], tied: tuple[str, ...] = ()
    ) -> dict[str, np.ndarray]:
        """Combine partial gradients (`combine_partial_gradients`), then average over dp (the
        experts' over edp, `expert_averager`)."""
        grads = self.combine_partial_gradients(grads, tied)
        experts = self.expert_names
        if not experts:
            return self.averager(grads)
        averaged = self.averager({n: g for n, g in grads.items() if n not in experts})
        averaged.update(self.expert_averager({n: g for n, g in grads.items() if n in experts}))
        return {name: averaged[name] for name in grads}

    def combine_partial_gradients(
        self, grads: dict[str, np.ndarray], tied: tuple[str, ...] = ()
    ) -> dict[str, np.ndarray]:
        """Everything before the dp reduction: sum the two copies of weights `tied` across the
        first and last pipeline stage (as Megatron-LM's embedding group does), and sum
        sequence-parallel partial gradients over tp."""
        if self.pp_group.size > 1 and not self.layout.shares_ends_rank:
            grads = {**grads, **self._sum_tied_copies(grads, tied)}
        if self.sequence_parallel:
            # Replicated parameters saw only this rank's part of the sequence.
            grads = {
                name: g if self._sharded(name) else self.tp_group.all_reduce(g)
                for name, g in grads.items()
            }
        elif isinstance(self.sharding, TensorParallelSharding) and self.sharding.partial_over_tp:
            # Replicated parameters applied to this rank's heads only (per-head norms).
            partial = self.sharding.partial_over_tp
            grads = {
                name: self.tp_group.all_reduce(g) if name in partial else g
                for name, g in grads.items()
            }
        return grads

    def _sum_tied_copies(
        self, grads: dict[str, np.ndarray], tied: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        last = self.pp_group.size - 1
        if self.pp_rank not in (0, last):
            return {}
        summed = {}
        for name in tied:
            if name not in grads:
                continue
            mine = meta.ascontiguousarray(grads[name])
            # First stage sends first, last stage receives first: no circular wait.
            if self.pp_rank == 0:
                self.pp_group.send(mine, last)
                other = self.pp_group.recv(mine.shape, mine.dtype, last, like=mine)
                summed[name] = mine + other
            else:
                other = self.pp_group.recv(mine.shape, mine.dtype, 0, like=mine)
                self.pp_group.send(mine, 0)
                summed[name] = other + mine  # first + last on both ranks: bitwise equal
        return summed

    def global_grad_sq_norm(
        self,
        grads: dict[str, np.ndarray],
        tied: tuple[str, ...] = (),
        sharded_over_dp: bool = False,
    ) -> float:
        """Σ g² over the whole model: shards counted on their rank, replicated parameters and
        tied copies once. `sharded_over_dp`: each dp rank holds a different part of the
        gradients (ZeRO), so the partial sums are added over dp as well.

        Data-free gradients (`civetta.meta`) have no values: this is the one place a data-free
        step asks for one, and it gets NaN (so clipping leaves the gradients as they are). The
        all-reduces of the partial sums still run, as in an executed step.

        Expert parameters differ over ep: their partial sum is added over the ep group (under
        ZeRO the dp × cp sum covers ep × edp)."""
        total = np.zeros(1)
        expert_total = np.zeros(1)
        experts = self.expert_names
        data_free = False
        for name, g in grads.items():
            if self._holds_tied_copy(name, tied):
                continue
            if self.tp_group.rank == 0 or self._sharded(name):
                if meta.is_meta(g):
                    data_free = True
                    continue
                flat = g.reshape(-1).astype(np.float64, copy=False)
                (expert_total if name in experts else total)[0] += np.dot(flat, flat)
        if experts:
            if not sharded_over_dp:
                expert_total = self.ep_group.all_reduce(expert_total)
            total = total + expert_total
        total = self.tp_group.all_reduce(total)
        total = self.pp_group.all_reduce(total)
        if sharded_over_dp:
            total = self.dp_group.all_reduce(total)
        return float("nan") if data_free else float(total[0])

    def mean_loss(self, losses: list[float]) -> float:
        """The mean of the microbatch losses, which only the last pipeline stage holds, over
        the whole data-parallel batch (every rank gets it)."""
        with self.ledger.phase("other"):
            local = np.array([sum(losses), len(losses)], dtype=np.float64)
            total = self.dp_group.all_reduce(self.pp_group.all_reduce(local))
        # No count only on a virtual mesh (`parallel.virtual`), whose values mean nothing.
        return float(total[0] / total[1]) if total[1] else float("nan")
