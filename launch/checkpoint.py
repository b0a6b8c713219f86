"""Checkpoints: one `.npz` per rank (no pickle), loadable under any other layout.

    OUT/checkpoints/step000012/rank0.npz ... rankN.npz
    OUT/checkpoints/latest          the name of the newest complete checkpoint

A rank's file holds its parameter shards (`param/<name>`), optimizer state (`optim/<key>`),
float32 master weights under mixed precision (`master/<name>`) and a JSON `meta` entry: the
step, the layout, this rank's coordinates and how each tensor-parallel parameter was cut
(`parallel.sharding`). Under ZeRO (`parallel.zero`) the state is gathered over the dp group
before it is written, so the arrays are whole parameters as without ZeRO and only the files of
dp rank 0 hold them (the others hold `meta` alone). Files are written under a `.partial`
directory that is renamed once every rank has written, so a crash mid-write leaves the previous
checkpoint as it was.

Loading reassembles each full tensor from the shards of any one data-parallel replica and cuts
the part this rank holds in the new layout: dp2·tp2 can resume as pp2, or as one process.
The data position is the step itself: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from parallel.sharding import join_shards, take_shard
from parallel.tensor_parallel import TensorParallelSharding

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit; one line for the user."""


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def _placements(trainer: Any) -> dict[str, list[int]]:
    sharding = trainer.runtime.sharding
    if isinstance(sharding, TensorParallelSharding):
        return {name: list(p) for name, p in sharding.placements.items()}
    return {}


def _param_of(key: str) -> str | None:
    """The parameter an array belongs to: `param/x` and `master/x` → x; `optim/exp_avg.x` → x."""
    kind, _, rest = key.partition("/")
    if kind in ("param", "master"):
        return rest
    if kind == "optim" and "." in rest:
        return rest.partition(".")[2]
    return None


def save(trainer: Any, out_dir: Path, step: int) -> Path:
    """Write this rank's shard of the state after `step`; collective over the world."""
    runtime, world = trainer.runtime, trainer.runtime.mesh.world
    root = checkpoint_root(out_dir)
    target = root / f"step{step:06d}"
    staging = root / f"step{step:06d}.partial"
    if runtime.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    world.barrier()

    # Whole over dp (gathered under ZeRO), the same on every dp replica: dp rank 0 writes it.
    params, optim, masters = trainer.update.whole_state()
    arrays: dict[str, np.ndarray] = {}
    if runtime.mesh.coords["dp"] == 0:
        arrays.update({f"param/{n}": a for n, a in params.items()})
        arrays.update({f"optim/{k}": v for k, v in optim.items()})
        arrays.update({f"master/{n}": a for n, a in masters.items()})
    mesh = runtime.mesh
    scaler = trainer.loss_scaler
    meta = {
        "format": FORMAT,
        "step": step,
        "rank": runtime.rank,
        "layout": runtime.layout.as_dict(),
        "coords": mesh.coords,
        "placements": _placements(trainer),
        "dtype": trainer.config.train.dtype,
        "zero": runtime.layout.zero,  # the arrays are whole over dp all the same
        "model": dataclasses.asdict(trainer.config.model),
        "data_position": step + 1,  # batches are a pure function of (seed, step)
        "loss_scaler": None
        if scaler is None
        else [scaler.scale, scaler.good_steps, scaler.skipped],
    }
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = staging / f"rank{runtime.rank}.tmp.npz"
    # Keys are param/, optim/, master/ names and meta, never savez's own allow_pickle.
    np.savez(tmp, **arrays)  # pyright: ignore[reportArgumentType]
    os.replace(tmp, staging / f"rank{runtime.rank}.npz")
    world.barrier()
    if runtime.rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(target.name + "\n", encoding="utf-8")
        os.replace(latest_tmp, root / "latest")
    world.barrier()
    return target


def find(path: Path) -> Path:
    """The checkpoint directory `path` names: a checkpoint itself, a run's output directory
    (its latest checkpoint), or a run's `checkpoints/` directory."""
    path = Path(path)
    if (path / "rank0.npz").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            found = root / latest.read_text(encoding="utf-8").strip()
            if (found / "rank0.npz").is_file():
                return found
    raise CheckpointError(f"--resume {str(path)!r} holds no complete checkpoint")


def read_meta(directory: Path) -> dict[str, Any]:
    with np.load(directory / "rank0.npz", allow_pickle=False) as data:
        return json.loads(str(data["meta"]))


def check_resumable(directory: Path, config: Any) -> int:
    """The checkpoint's step, after checking that `config` can continue from it."""
    meta = read_meta(directory)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(directory)!r} has an unknown format")
    model = dataclasses.asdict(config.model)
    for key, value in meta["model"].items():
        if model.get(key) != value:
            raise CheckpointError(
                f"model.{key}={model.get(key)} differs from the checkpoint's {value}"
            )
    if meta["step"] + 1 >= config.train.steps:
        raise CheckpointError(
            f"the checkpoint is at step {meta['step']}: train.steps={config.train.steps} "
            "leaves nothing to run (raise train.steps to continue)"
        )
    return int(meta["step"])


def read_full_state(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The unsharded state of a checkpoint: (meta of rank 0, full arrays by key)."""
    files = sorted(directory.glob("rank*.npz"))
    if not files:
        raise CheckpointError(f"checkpoint {str(directory)!r} has no rank files")
    pieces: dict[str, dict[int, np.ndarray]] = {}
    metas = []
    for file in files:
        with np.load(file, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            metas.append(meta)
            if meta["coords"]["dp"] != 0:
                continue  # every dp replica holds the same state
            for key in data.files:
                if key != "meta":
                    pieces.setdefault(key, {})[meta["coords"]["tp"]] = data[key]
    first = min(metas, key=lambda m: m["rank"])
    if len(metas) != first["layout"]["dp"] * first["layout"]["tp"] * first["layout"]["pp"]:
        raise CheckpointError(f"checkpoint {str(directory)!r} is missing rank files")
    placements = {n: tuple(p) for m in metas for n, p in m["placements"].items()}
    full: dict[str, np.ndarray] = {}
    for key, by_tp in pieces.items():
        name = _param_of(key)
        if name in placements and len(by_tp) > 1:
            full[key] = join_shards([by_tp[r] for r in sorted(by_tp)], placements[name])
        else:
            full[key] = by_tp[min(by_tp)]  # replicated over tp
    return first, full


def load(trainer: Any, directory: Path) -> int:
    """Fill this rank's state from the checkpoint in `directory`; returns its step."""
    meta, full = read_full_state(directory)
    placements = _placements(trainer)
    tp = trainer.runtime.mesh.group("tp")

    def local(key: str) -> np.ndarray:
        if key not in full:
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {key!r}")
        name = _param_of(key)
        if name in placements:
            axis, blocks = placements[name]
            return take_shard(full[key], (axis, blocks), tp.rank, tp.size)
        return full[key]

    update = trainer.update
    state = {k: local(f"optim/{k}") for k in update.optimizer.state_dict()}

    def master(name: str) -> np.ndarray:  # a checkpoint without masters: the weights
        key = f"master/{name}"
        return local(key) if key in full else local(f"param/{name}")

    # Each rank keeps what it owns: everything, or under ZeRO its chunk (stage 3) or piece.
    params = {name: local(f"param/{name}") for name in trainer.model.params}
    masters = {name: master(name) for name in params} if update.masters else None
    try:
        update.load_whole_state(params, state, masters)
    except ValueError as e:
        raise CheckpointError(f"checkpoint tensor {e}") from None
    if trainer.loss_scaler is not None and meta["loss_scaler"]:
        scaler = trainer.loss_scaler
        scaler.scale, scaler.good_steps, scaler.skipped = meta["loss_scaler"]
    return int(meta["step"])


def export(directory: Path, out: Path) -> int:
    """Write the full, unsharded weights with nanoGPT's names to one `.npz`; returns the count."""
    _, full = read_full_state(find(directory))
    weights = {key.removeprefix("param/"): a for key, a in full.items() if key.startswith("param/")}
    if "lm_head.weight" not in weights and "transformer.wte.weight" in weights:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]  # tied, as PyTorch saves
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    # Keys are parameter names, never savez's own allow_pickle.
    np.savez(tmp, **weights)  # pyright: ignore[reportArgumentType]
    os.replace(tmp, out)
    return len(weights)
