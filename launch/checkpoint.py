"""Checkpoints: one `.npz` per rank (no pickle), loadable under any other layout.

    OUT/checkpoints/step000012/rank0.npz ... rankN.npz
    OUT/checkpoints/latest          the name of the newest complete checkpoint

A rank's file holds its parameter shards (`param/<name>`), optimizer state (`optim/<key>`),
float32 master weights under mixed precision (`master/<name>`) and a JSON `meta` entry: the
step, the layout, this rank's coordinates and how each tensor-parallel parameter was cut
(`parallel.sharding`). Under ZeRO (`parallel.zero`) the state is gathered over the dp group
before it is written, so the arrays are whole parameters as without ZeRO and only the files of
dp rank 0 hold them (the others hold `meta` alone). `meta` also holds a sha256 per array (of
its dtype, shape and bytes), checked whenever the file is read.

Files are written under a `.partial` directory that is renamed once every rank has written, and
each rank file, the directories and the `latest` pointer are fsynced around the renames, so a
crash mid-write (or a full disk) leaves the previous checkpoint as it was and never a
half-written one that looks complete. On resume, a checkpoint with a truncated, corrupt or
missing rank file is skipped for the newest intact one before it (`find`).

Loading reassembles each full tensor from the shards of any one data-parallel replica and cuts
the part this rank holds in the new layout: dp2·tp2 can resume as pp2, or as one process.
The data position is the step itself: batches are a pure function of (seed, step).

Hugging Face checkpoints (`launch.hf`) are another format beside these, never a replacement:
`export_hf` writes a checkpoint's full weights as one (`civetta export RUN --format hf`), and
`init_from_hf` starts a run's weights from one (`train.init_from`), cut for the layout by the
same machinery as `load`, with a fresh optimizer at step 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from launch import hf
from launch.config import ExperimentConfig, ModelConfig, model_description
from launch.faults import maybe_fail
from parallel.sharding import join_shards, take_shard
from parallel.tensor_parallel import TensorParallelSharding

FORMAT = 2  # 2: meta holds a checksum per array
READABLE_FORMATS = (1, 2)
STEP_DIR = re.compile(r"step(\d+)")
RANK_FILE = re.compile(r"rank(\d+)\.npz")
META_KEYS = {"format", "step", "rank", "layout", "coords", "placements", "model"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit; one line for the user."""


class DamagedCheckpointError(CheckpointError):
    """A rank file that is missing, cannot be read, or whose arrays fail their checksums."""

    def __init__(self, file: Path, step: int | None, reason: str) -> None:
        self.file, self.step, self.reason = file, step, reason
        at = "" if step is None else f" (checkpoint of step {step})"
        super().__init__(f"{str(file)!r}{at} is damaged: {reason}")


def checksum(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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

    # Whole over dp × cp (gathered under ZeRO), the same on every replica (context-parallel
    # ranks hold the same parameters too): the first of them writes it. Experts differ over
    # ep: the first rank of each expert-data-parallel group writes its experts.
    params, optim, masters = trainer.update.whole_state()
    experts = runtime.expert_names
    writes = {False: runtime.dp_group.rank == 0, True: runtime.edp_group.rank == 0}

    def mine(name: str | None) -> bool:
        return writes[name in experts]

    arrays: dict[str, np.ndarray] = {}
    arrays.update({f"param/{n}": a for n, a in params.items() if mine(n)})
    arrays.update({f"optim/{k}": v for k, v in optim.items() if mine(_param_of(f"optim/{k}"))})
    arrays.update({f"master/{n}": a for n, a in masters.items() if mine(n)})
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
    meta["checksums"] = {key: checksum(a) for key, a in arrays.items()}
    arrays["meta"] = np.array(json.dumps(meta))
    final = staging / f"rank{runtime.rank}.npz"
    tmp = staging / f"rank{runtime.rank}.tmp.npz"
    try:
        with open(tmp, "wb") as file:
            # Keys are param/, optim/, master/ names and meta, never savez's own allow_pickle.
            np.savez(file, **arrays)  # pyright: ignore[reportArgumentType]
            maybe_fail(runtime.rank, step, at="checkpoint")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, final)
        _fsync_dir(staging)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # give the space back; the .partial directory never counts
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {str(final)!r}: {e.strerror or e}"
        ) from e
    world.barrier()
    if runtime.rank == 0:
        try:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            _fsync_dir(root)
            _write_text_durably(root / "latest", target.name + "\n")
        except OSError as e:
            raise CheckpointError(
                f"could not complete the checkpoint of step {step} in {str(root)!r}: "
                f"{e.strerror or e}"
            ) from e
    world.barrier()
    return target


def step_of(directory: Path) -> int | None:
    """The step a `stepNNNNNN` directory is named for."""
    match = STEP_DIR.fullmatch(Path(directory).name)
    return int(match.group(1)) if match else None


def read_rank_file(file: Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One rank file's (meta, arrays), every array checked against its checksum. Anything that
    cannot be read, or does not match, is a DamagedCheckpointError naming the file."""
    try:
        with np.load(file, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {key: data[key] for key in data.files if key != "meta"}
    except FileNotFoundError:
        raise DamagedCheckpointError(file, step, "the file is missing") from None
    except Exception as e:  # damaged bytes fail anywhere in zipfile, numpy's header parser, json
        reason = f"it cannot be read (truncated or corrupt: {type(e).__name__}: {e})"
        raise DamagedCheckpointError(file, step, reason) from None
    if not isinstance(meta, dict) or not set(meta) >= META_KEYS:
        raise DamagedCheckpointError(file, step, "its meta entry is not a checkpoint's")
    if meta["format"] not in READABLE_FORMATS:
        reason = f"its format {meta['format']!r} is not one this version reads"
        raise DamagedCheckpointError(file, step, reason)
    if step is not None and meta.get("step") != step:
        raise DamagedCheckpointError(file, step, f"its meta says step {meta.get('step')}")
    if meta["format"] >= 2:
        sums = meta.get("checksums")
        if not isinstance(sums, dict) or set(sums) != set(arrays):
            raise DamagedCheckpointError(file, step, "its arrays differ from those its meta lists")
        for key, array in arrays.items():
            if checksum(array) != sums[key]:
                raise DamagedCheckpointError(file, step, f"{key!r} does not match its checksum")
    return meta, arrays


def _rank_files(directory: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(meta, arrays) of every rank file in turn, after checking that none is missing."""
    step = step_of(directory)
    ranks = sorted(
        int(m.group(1)) for p in directory.iterdir() if (m := RANK_FILE.fullmatch(p.name))
    )
    meta, arrays = read_rank_file(directory / "rank0.npz", step)
    layout = meta["layout"]
    world_size = layout.get("world_size", layout["dp"] * layout["tp"] * layout["pp"])
    missing = sorted(set(range(world_size)) - set(ranks))
    if missing:
        raise DamagedCheckpointError(
            directory / f"rank{missing[0]}.npz", step, "the file is missing"
        )
    yield meta, arrays
    for rank in range(1, world_size):
        file = directory / f"rank{rank}.npz"
        meta, arrays = read_rank_file(file, step)
        if meta.get("rank") != rank:
            raise DamagedCheckpointError(file, step, f"its meta says rank {meta.get('rank')}")
        yield meta, arrays


def verify(directory: Path) -> int:
    """Read every rank file of a checkpoint and check it; returns its step."""
    step = None
    for meta, _ in _rank_files(directory):
        step = int(meta["step"])
    assert step is not None
    return step


def _candidates(root: Path) -> list[Path]:
    """The checkpoints under `root`, newest first, none newer than `latest` when it names one
    (a newer directory is left from an earlier run into the same directory)."""
    found = sorted(
        (p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
        key=lambda p: step_of(p) or 0,
        reverse=True,
    )
    latest = root / "latest"
    name = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
    names = [p.name for p in found]
    return found[names.index(name) :] if name in names else found


def find(path: Path, warn: Callable[[str], None] | None = None, flag: str = "--resume") -> Path:
    """The intact checkpoint directory `path` names: a checkpoint itself (which must be intact),
    a run's output directory or its `checkpoints/` directory (the newest intact checkpoint:
    `warn` hears one line for each damaged one skipped). Each is verified (`verify`)."""
    path = Path(path)
    named = f"{flag} {str(path)!r}" if flag else repr(str(path))
    if (path / "rank0.npz").is_file() or (path.is_dir() and step_of(path) is not None):
        verify(path)
        return path
    candidates = []
    for root in (path / "checkpoints", path):
        if root.is_dir() and (candidates := _candidates(root)):
            break
    if not candidates:
        raise CheckpointError(f"{named} holds no complete checkpoint")
    damaged: list[DamagedCheckpointError] = []
    for directory in candidates:
        try:
            step = verify(directory)
        except DamagedCheckpointError as e:
            damaged.append(e)
            continue
        for i, e in enumerate(damaged):
            last = i == len(damaged) - 1
            chosen = f"using {str(directory)!r} (step {step}), the newest intact checkpoint"
            if warn is not None:
                warn(f"{e}; {chosen if last else 'skipping it'}")
        return directory
    more = f" (and {len(damaged) - 1} older ones are damaged too)" if len(damaged) > 1 else ""
    raise CheckpointError(f"{named} holds no intact checkpoint: {damaged[0]}{more}")


def read_meta(directory: Path) -> dict[str, Any]:
    return read_rank_file(directory / "rank0.npz", step_of(directory))[0]


def check_resumable(directory: Path, config: Any) -> int:
    """The checkpoint's step, after checking that `config` can continue from it."""
    meta = read_meta(directory)
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
    """The unsharded state of a checkpoint, every file verified: (meta of rank 0, full arrays
    by key)."""
    if not (directory / "rank0.npz").is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no rank files")
    pieces: dict[str, dict[int, np.ndarray]] = {}
    metas = []
    for meta, arrays in _rank_files(directory):
        metas.append(meta)
        # Only one replica of each array was written (the first dp × cp rank's, or for an
        # expert the first of its expert-data-parallel group's).
        for key, array in arrays.items():
            pieces.setdefault(key, {})[meta["coords"]["tp"]] = array
    first = metas[0]
    placements = {n: tuple(p) for m in metas for n, p in m["placements"].items()}
    full: dict[str, np.ndarray] = {}
    for key, by_tp in pieces.items():
        name = _param_of(key)
        if name in placements and len(by_tp) > 1:
            full[key] = join_shards([by_tp[r] for r in sorted(by_tp)], placements[name])
        else:
            full[key] = by_tp[min(by_tp)]  # replicated over tp
    return first, full


def _tp_part(trainer: Any) -> Callable[[str | None, np.ndarray], np.ndarray]:
    """(parameter name, full array) → the part this rank holds over tp (the whole array for a
    parameter that tensor parallelism does not cut)."""
    placements = _placements(trainer)
    tp = trainer.runtime.mesh.group("tp")

    def cut(name: str | None, full: np.ndarray) -> np.ndarray:
        if name in placements:
            axis, blocks = placements[name]
            return take_shard(full, (axis, blocks), tp.rank, tp.size)
        return full

    return cut


def load(trainer: Any, directory: Path) -> int:
    """Fill this rank's state from the checkpoint in `directory`; returns its step."""
    meta, full = read_full_state(directory)
    cut = _tp_part(trainer)

    def local(key: str) -> np.ndarray:
        if key not in full:
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {key!r}")
        return cut(_param_of(key), full[key])

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


def export(directory: Path, out: Path, warn: Callable[[str], None] | None = None) -> int:
    """Write the full, unsharded weights with the model's own names (nanoGPT's for the GPT,
    Hugging Face's for a Llama) to one `.npz`; returns the count. The checkpoint is found and
    verified as `--resume` finds it."""
    _, full = read_full_state(find(directory, warn, flag=""))
    weights = {key.removeprefix("param/"): a for key, a in full.items() if key.startswith("param/")}
    for table in ("transformer.wte.weight", "model.embed_tokens.weight"):  # GPT, Llama
        if "lm_head.weight" not in weights and table in weights:
            weights["lm_head.weight"] = weights[table]  # tied, as PyTorch saves
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    with open(tmp, "wb") as file:
        # Keys are parameter names, never savez's own allow_pickle.
        np.savez(file, **weights)  # pyright: ignore[reportArgumentType]
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, out)
    return len(weights)


# ---- Hugging Face checkpoints (`launch.hf`): export, and train.init_from -------------------------
def model_of(meta: dict[str, Any]) -> Any:
    """The model description a checkpoint's meta records (its `model` section)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    section = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    return model_description(ExperimentConfig(model=section))


def export_hf(directory: Path, out: Path, warn: Callable[[str], None] | None = None) -> int:
    """Write the checkpoint's full weights as a Hugging Face checkpoint (config.json and
    model.safetensors) into the directory `out`, in the checkpoint's parameter dtype; returns
    the count of tensors written. The checkpoint is found and verified as `--resume` finds it."""
    found = find(directory, warn, flag="")
    description = model_of(read_meta(found))
    try:
        hf.check_expressible(description)  # before reading every rank file
        _, full = read_full_state(found)
        weights = {k.removeprefix("param/"): a for k, a in full.items() if k.startswith("param/")}
        config, tensors = hf.to_hf(description, weights)
    except hf.HFError as e:
        raise CheckpointError(f"--format hf: {e}") from None
    try:
        hf.write(out, config, tensors)
    except hf.HFError as e:
        raise CheckpointError(f"--out {e}") from None
    return len(tensors)


def check_init_from(directory: Path, config: ExperimentConfig) -> Any:
    """The model of the Hugging Face checkpoint in `directory` after checking that it is the
    config's model and that its weights file holds every tensor in shape (header only)."""
    try:
        description, _ = hf.read(directory, load=False)
    except hf.HFError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    _check_same_model(directory, model_description(config), description)
    return description


def _check_same_model(directory: Path, ours: Any, theirs: Any) -> None:
    differing = hf.differences(ours, theirs)
    if differing is not None:
        key, mine, given = differing
        raise CheckpointError(
            f"train.init_from: model.{key} is {_shown(given)} in {str(directory)!r}, "
            f"the config says {_shown(mine)}"
        )


def _shown(value: Any) -> str:
    """A value as the YAML of a config would write it (a section as a flow mapping)."""
    if isinstance(value, bool):
        return str(value).lower()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ", ".join(f"{k}: {_shown(v)}" for k, v in dataclasses.asdict(value).items())
        return "{" + items + "}"
    return "null" if value is None else str(value)


def init_from_hf(trainer: Any, directory: Path) -> None:
    """Fill this rank's parameters from the Hugging Face checkpoint in `directory`, in any
    layout: its tensor-parallel part of the parameters its pipeline stages hold, cut further by
    ZeRO; float32 masters under mixed precision. The optimizer state stays fresh (step 0)."""
    try:
        description, weights = hf.read(directory)
    except hf.HFError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    _check_same_model(directory, trainer.model.config, description)
    cut = _tp_part(trainer)
    params = {name: cut(name, weights[name]) for name in trainer.model.params}
    update = trainer.update
    # The fresh state in the whole shapes load_whole_state takes, of the keys this rank owns.
    _, whole, _ = update.whole_state()
    state = {key: whole[key] for key in update.optimizer.state_dict()}
    try:
        update.load_whole_state(params, state)  # the masters are the weights themselves
    except ValueError as e:
        raise CheckpointError(f"train.init_from: tensor {e}") from None
