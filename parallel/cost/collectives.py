"""Alpha-beta times of collectives over the link a group actually crosses.

A group (the tp, dp or pp ranks of one world rank) that stays inside one node talks over the
intra-node link (NVLink); a group that spans nodes is bound by the network. When a spanning
group has k members on each node, each with its own network adapter, the collective library
splits the data over k channels, so the group sees k × the per-GPU network bandwidth (never more
than the intra-node link). Ranks fill nodes consecutively, as `MeshLayout.crosses_node` assumes.

For a group of n ranks, S bytes, per-hop latency α and bandwidth β:

    ring all-reduce      2(n-1)·α + 2(n-1)/n · S/β
    tree all-reduce      2⌈log2 n⌉·α + 2·S/β          (the faster of the two is used)
    all-gather, reduce-scatter   (n-1)·α + (n-1)/n · S/β   (S = the full, gathered size)
    point-to-point       α + S/β
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

from parallel.cost.hardware import HardwareProfile, LinkSpec
from parallel.mesh import MeshLayout


@dataclass(frozen=True)
class GroupLink:
    """What one group of `size` ranks talks over."""

    axis: str
    size: int
    crosses_node: bool
    members_per_node: int  # on the least populated node: the bottleneck
    link_name: str
    latency_s: float
    bytes_per_s: float

    def describe(self) -> str:
        if self.size == 1:
            return "none (1 rank)"
        where = "across nodes" if self.crosses_node else "within a node"
        return f"{self.link_name} ({where}, {self.bytes_per_s / 1e9:.0f} GB/s)"


def group_link(
    layout: MeshLayout, axis: str | tuple[str, ...], profile: HardwareProfile
) -> GroupLink:
    """The link of the slowest group along `axis` (every group of an axis runs at once), or
    along several axes together (dp × cp: the ranks that average gradients)."""
    key = axis if isinstance(axis, str) else tuple(axis)
    return _group_link(layout, key, profile.gpus_per_node, profile.intra_node, profile.inter_node)


# The tuner projects thousands of layouts over a few dozen meshes: each mesh's links are found
# once (walking a 1024-rank world's groups took 70 ms a joint group).
@functools.lru_cache(maxsize=1024)
def _group_link(
    layout: MeshLayout,
    axis: str | tuple[str, ...],
    gpn: int,
    intra: LinkSpec,
    inter: LinkSpec,
) -> GroupLink:
    if not isinstance(axis, str):
        return _joint_link(layout, axis, gpn, intra, inter)
    size = layout.size(axis)
    # Walk each group once, from its first member (axis coordinate 0): the members are
    # `stride` apart. Count, per group, its members on each node; a group on one node talks over
    # the intra-node link, and among groups that span nodes the one with the fewest members on
    # some node has the fewest network channels: it is the bottleneck.
    stride = layout.stride(axis)
    crosses, fewest = False, size
    for first in range(layout.world_size):
        if (first // stride) % size:
            continue
        per_node = Counter((first + i * stride) // gpn for i in range(size))
        if len(per_node) > 1:
            crosses = True
            fewest = min(fewest, min(per_node.values()))
    if not crosses:
        return GroupLink(axis, size, False, size, intra.name, intra.latency_s, intra.bytes_per_s)
    bandwidth = min(intra.bytes_per_s, fewest * inter.bytes_per_s)
    return GroupLink(axis, size, True, fewest, inter.name, inter.latency_s, bandwidth)


def _joint_link(
    layout: MeshLayout, axes: tuple[str, ...], gpn: int, intra: LinkSpec, inter: LinkSpec
) -> GroupLink:
    name = axes[0]  # booked under its first axis (dp), as the mesh's group is
    crosses, fewest, size = False, 0, 1
    seen: set[int] = set()
    for rank in range(layout.world_size):
        if rank in seen:
            continue  # each group once, from its first member
        members = layout.group_ranks(axes, rank)
        seen.update(members)
        size = len(members)
        per_node = Counter(r // gpn for r in members)
        if len(per_node) > 1:
            least = min(per_node.values())
            fewest = least if not crosses else min(fewest, least)
            crosses = True
    if not crosses:
        return GroupLink(name, size, False, size, intra.name, intra.latency_s, intra.bytes_per_s)
    bandwidth = min(intra.bytes_per_s, fewest * inter.bytes_per_s)
    return GroupLink(name, size, True, fewest, inter.name, inter.latency_s, bandwidth)


def all_reduce_time(nbytes: float, link: GroupLink) -> float:
    n = link.size
    if n == 1 or nbytes == 0:
        return 0.0
    ring = 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * nbytes / link.bytes_per_s
    tree = 2 * math.ceil(math.log2(n)) * link.latency_s + 2 * nbytes / link.bytes_per_s
    return min(ring, tree)


def all_gather_time(full_bytes: float, link: GroupLink) -> float:
    """All-gather whose gathered result is `full_bytes` (each rank contributes 1/n of it)."""
    n = link.size
    if n == 1 or full_bytes == 0:
        return 0.0
    return (n - 1) * link.latency_s + (n - 1) / n * full_bytes / link.bytes_per_s


reduce_scatter_time = all_gather_time  # the same ring, run the other way


def p2p_time(nbytes: float, latency_s: float, bytes_per_s: float) -> float:
    if nbytes == 0:
        return 0.0
    return latency_s + nbytes / bytes_per_s
