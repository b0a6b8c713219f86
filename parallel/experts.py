"""What a mixture-of-experts layer sees of the layout: which experts this rank holds, how its
tokens reach them and come back, and over which ranks routing statistics are pooled.

Expert parallelism (`parallel.ep`) folds the experts onto the data-parallel ranks, as
Megatron-core's parallel folding does: attention and the dense layers run on dp × tp × cp, and
the E experts of every MoE layer are split over the ep ranks of an expert-parallel group (E/ep
consecutive experts each), a group cut out of dp × cp (`parallel.mesh`). Every rank routes its
own tokens, drops what exceeds its per-rank capacity (before any exchange), and sends each kept
slot to the rank of its expert: first the counts (`Group.exchange_counts`), then the rows
(`Group.all_to_all_v`); the outputs come back by the reverse exchange. The ranks holding the same
experts (the expert-data-parallel group, dp·cp/ep ranks) reduce the experts' gradients.

Inside an expert, tensor parallelism is not used (expert tp = 1): the tp ranks of a layer hold
the same experts. Without sequence parallelism they hold the same tokens too and compute the
same result; with it each routes its own part of the sequence, and the experts' gradients are
summed over tp as every replicated parameter's are.

A sharding (`civetta.nn.DenseSharding`) holds one `ExpertShard`; with none (one process) a
layer holds every expert and exchanges nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from civetta import meta
from civetta.nn import WHOLE, ParameterStore
from civetta.tensor import Tensor
from parallel.comm import Group
from parallel.redirect import all_to_all_rows

# Which tokens the load-balancing statistics f_e pool: the rank's microbatch (whole sequences,
# over the ranks that split them: cp, and tp under sequence parallelism), or that microbatch on
# every data-parallel rank as well (dp × cp).
AUX_LOSS_SCOPES = ("microbatch", "data_parallel")


@dataclass(frozen=True)
class Exchange:
    """One dispatch's counts: `send[p]` rows to ep rank p, `recv[q]` from ep rank q, and
    `by_expert[q, l]`: rows from rank q for this rank's l-th expert (each source's rows come
    grouped by expert, in the expert's order)."""

    send: np.ndarray
    recv: np.ndarray
    by_expert: np.ndarray

    def expert_rows(self, data_free: bool = False) -> list[Any]:
        """For each local expert, its rows of the received buffer (source by source); for a
        data-free step, index arrays of their sizes alone."""
        if data_free:
            return [meta.MetaArray((int(n),), np.int64) for n in self.by_expert.sum(axis=0)]
        starts = np.concatenate([[0], np.cumsum(self.recv)[:-1]])
        offsets = np.cumsum(self.by_expert, axis=1) - self.by_expert  # within each source
        return [
            np.concatenate(
                [
                    np.arange(n, dtype=np.int64) + start + offset
                    for start, offset, n in zip(
                        starts, offsets[:, e], self.by_expert[:, e], strict=True
                    )
                ]
            )
            for e in range(self.by_expert.shape[1])
        ]


class ExpertShard:
    """This rank's part of expert parallelism over `group` (the ep group).

    `store` creates the experts' parameters (ZeRO-3 shards them over the edp group);
    `token_groups[scope]` are the groups whose ranks' token counts are pooled for the
    load-balancing loss of that scope (`AUX_LOSS_SCOPES`); `aux_scale` (1/tp under sequence
    parallelism) keeps the sum of the tp ranks' terms one term, since their gradients are
    summed. `names` collects the expert parameters this rank holds as layers create them."""

    def __init__(
        self,
        group: Group,
        store: ParameterStore = WHOLE,
        token_groups: dict[str, tuple[Group, ...]] | None = None,
        aux_scale: float = 1.0,
    ) -> None:
        self.group = group
        self.store = store
        self.token_groups = token_groups or {scope: () for scope in AUX_LOSS_SCOPES}
        self.aux_scale = aux_scale
        self.names: set[str] = set()
        # A data-free step's routing assumption: this rank's experts get `imbalance` times the
        # mean of the slots (the cost model's option; 1: balanced).
        self.imbalance = 1.0

    def local_experts(self, experts: int) -> range:
        """The experts this rank holds: E/ep consecutive ones."""
        per_rank = experts // self.group.size
        return range(self.group.rank * per_rank, (self.group.rank + 1) * per_rank)

    def dispatch(self, rows: Tensor, kept: np.ndarray) -> tuple[Tensor, Exchange]:
        """Send `rows` (kept slots grouped by expert, experts in order; `kept[e]` of expert e)
        to their experts' ranks; returns the rows this rank's experts take and the counts."""
        per_rank = kept.reshape(self.group.size, -1)  # (ep, E/ep): rows for each rank's experts
        by_expert = self.group.exchange_counts(per_rank)
        exchange = Exchange(per_rank.sum(axis=1), by_expert.sum(axis=1), by_expert)
        return all_to_all_rows(rows, self.group, exchange.send, exchange.recv), exchange

    def combine(self, rows: Tensor, exchange: Exchange) -> Tensor:
        """The experts' outputs (in the received order) back to the ranks the tokens came from,
        in the order `dispatch` took them."""
        return all_to_all_rows(rows, self.group, exchange.recv, exchange.send)

    def pooled_counts(self, counts: np.ndarray, scope: str) -> np.ndarray:
        """Slot counts summed over the ranks whose tokens `scope` pools."""
        for group in self.token_groups[scope]:
            counts = group.all_reduce(counts)
        return counts
