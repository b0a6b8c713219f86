"""Train a tiny GPT for a few steps and print the metrics.json a `civetta train` run would write,
without the evaluation that follows training.

    cost_worker.py [key=value ...]

The trainer, the runtime and `launch.worker.build_metrics` are the ones `civetta train` uses;
only `Trainer.evaluate` is left out, because its forward passes would add collectives to the
ledger's "forward" rows that no training step issues (tests/test_cost_vs_run.py compares the
ledger with the cost model's bytes per training step). Rank 0 prints the metrics as one JSON
line. Run without MPI it is the single-process run.
"""

from __future__ import annotations

import json

from civetta.allocator import keep_freed_memory
from launch.config import load
from launch.trainer import RunResult, Trainer
from launch.worker import build_metrics, gather_json, pipeline_summary
from parallel.runtime import Runtime


def main() -> None:
    import sys

    config = load(None, sys.argv[1:])
    keep_freed_memory()  # as `civetta train` does
    runtime = Runtime(config.layout)
    mesh = runtime.mesh
    trainer = Trainer(config, runtime)
    tokens = config.train.batch_size * config.model.block_size
    result = RunResult(
        tokens_per_step=tokens, model_flops_per_step=trainer.model.config.flops_per_token() * tokens
    )
    for step in range(config.train.steps):
        result.steps.append(trainer.step(step))
    result.memory = trainer.memory()
    per_rank = gather_json(
        mesh.comm,
        {
            "rank": mesh.rank,
            "memory": result.memory,
            "ops": runtime.ledger.as_list(),
            "pipeline": pipeline_summary(trainer.timelines),
            "flops_per_step": result.steps[-1].flops,
        },
    )
    if mesh.rank == 0:
        assert per_rank is not None
        print(json.dumps(build_metrics(config, result, per_rank)), flush=True)


if __name__ == "__main__":
    main()
