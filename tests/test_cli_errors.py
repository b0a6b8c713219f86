"""Every mistake a user can make on `civetta train` is one line on stderr and exit code 2.

A table of bad configs and arguments runs through `launch.cli.main` in this process (fast), and a
few run as a real `python -m launch train ...` to prove what the user sees: exit code 2, exactly
one line on stderr, no traceback. Each case asserts the exact message, so a changed message is a
deliberate change to this file.

Some tests state the behaviour the CLI should have and fail until it has it; their docstrings
say so ("Currently: ...").
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch import cli, launcher
from launch.config import ConfigError, load
from parallel.comm import launched_by_mpi

REPO = Path(__file__).resolve().parent.parent

# A valid config that trains in well under a second, so a case that is wrongly accepted
# fails fast instead of training the quickstart model.
TINY_YAML = """\
model: {n_layer: 1, n_head: 4, n_embd: 16, block_size: 8}
data: {source: synthetic}
train: {steps: 10, batch_size: 8, eval_batches: 1}
"""


@dataclass(frozen=True)
class Bad:
    label: str
    message: str  # may use {config} (the config's path) and {dir} (a scratch directory)
    overrides: tuple[str, ...] = ()
    yaml: str | bytes = TINY_YAML
    args: tuple[str, ...] = ()  # replaces ("{config}",) when given
    command: str = "train"


# ---- the table --------------------------------------------------------------------------------
FILE_CASES = [
    Bad(
        "missing-config-file",
        "error: config file '{dir}/nope.yaml' does not exist",
        args=("{dir}/nope.yaml",),
    ),
    Bad(
        "invalid-yaml",
        "error: {config} at line 3, column 1: expected ',' or ']', but got '<stream end>'",
        yaml="model:\n  n_layer: [1, 2\n",
    ),
    Bad(
        "yaml-tab-indent",
        "error: {config} at line 2, column 1: found character '\\t' that cannot start any token",
        yaml="model:\n\tn_layer: 2\n",
    ),
    Bad("not-utf8", "error: {config} is not UTF-8 text", yaml=b"model:\n  kind: \xff\xfe\n"),
    Bad(
        "top-level-list",
        "error: {config} expected a mapping of sections, got [1, 2] (list)",
        yaml="- 1\n- 2\n",
    ),
    Bad(
        "top-level-scalar",
        "error: {config} expected a mapping of sections, got 42 (int)",
        yaml="42\n",
    ),
    Bad(
        "unknown-section-did-you-mean",
        "error: unknown section 'modle' in {config} (did you mean 'model'?)",
        yaml="modle:\n  n_layer: 2\n",
    ),
    Bad(
        "unknown-section",
        "error: unknown section 'optimizer' in {config}",
        yaml="optimizer:\n  lr: 0.1\n",
    ),
    Bad("section-not-a-mapping", "error: train expected a mapping, got 5 (int)", yaml="train: 5\n"),
]

KEY_AND_TYPE_CASES = [
    # Currently: "(did you mean 'steps'?)" — the hint drops the section the user typed.
    Bad(
        "unknown-key-did-you-mean",
        "error: unknown key 'train.step' (did you mean 'train.steps'?)",
        ("train.step=10",),
    ),
    Bad("unknown-key", "error: unknown key 'model.dropout'", ("model.dropout=0.1",)),
    Bad("int-given-str", "error: train.steps expected int, got 'ten' (str)", ("train.steps=ten",)),
    Bad(
        "int-given-float", "error: train.steps expected int, got 1.5 (float)", ("train.steps=1.5",)
    ),
    Bad("int-given-null", "error: train.batch_size expected int, got null", ("train.batch_size=",)),
    Bad(
        "bool-given-int",
        "error: parallel.sequence_parallel expected bool, got 3 (int)",
        ("parallel.sequence_parallel=3",),
    ),
    Bad("float-given-bool", "error: train.lr expected float, got True (bool)", ("train.lr=true",)),
    Bad(
        "str-given-int",
        "error: parallel.order expected str, got 3 (int)",
        ("parallel.order=3",),
    ),
]

CHOICE_CASES = [
    Bad(
        "optimizer-choice",
        "error: train.optimizer expected one of adamw | sgd, got 'adam'",
        ("train.optimizer=adam",),
    ),
    Bad(
        "schedule-choice",
        "error: parallel.schedule expected one of gpipe | 1f1b | interleaved-1f1b | zb-h1 | "
        "zb-h2 | zb-v | dualpipev | a schedule file (.yaml, .yml, .csv), got 'foo'",
        ("parallel.schedule=foo",),
    ),
    Bad(
        "dtype-choice",
        "error: train.dtype expected one of float32 | float64 | bf16 | fp16, got 'float16'",
        ("train.dtype=float16",),
    ),
    Bad(
        "kind-choice",
        "error: model.kind expected one of gpt | llama, got 'mamba'",
        ("model.kind=mamba",),
    ),
    Bad(
        "foreign-model-key",
        "error: model.n_kv_head is not a key of model.kind=gpt (it is one of llama)",
        ("model.n_kv_head=2",),
    ),
    Bad(
        "kv-heads-divide-heads",
        "error: model.n_kv_head=3 does not divide model.n_head=4",
        ("model.kind=llama", "model.n_kv_head=3"),
    ),
    Bad(
        "lr-schedule-choice",
        "error: train.lr_schedule expected one of constant | cosine, got 'linear'",
        ("train.lr_schedule=linear",),
    ),
    Bad(
        "on-nonfinite-choice",
        "error: train.on_nonfinite expected one of stop | skip, got 'ignore'",
        ("train.on_nonfinite=ignore",),
    ),
    Bad(
        "recompute-choice",
        "error: parallel.recompute expected one of none | full | selective, got 'partial'",
        ("parallel.recompute=partial",),
    ),
    # DESIGN.md names the stages 0–3.
    Bad(
        "zero-out-of-range",
        "error: parallel.zero expected one of 0 | 1 | 2 | 3, got 7",
        ("parallel.zero=7",),
    ),
    Bad(
        "zero-negative",
        "error: parallel.zero expected one of 0 | 1 | 2 | 3, got -1",
        ("parallel.zero=-1",),
    ),
]

RANGE_CASES = [
    Bad("steps-zero", "error: train.steps expected a positive number, got 0", ("train.steps=0",)),
    Bad("lr-negative", "error: train.lr expected a positive number, got -0.5", ("train.lr=-0.5",)),
    Bad(
        "layers-negative",
        "error: model.n_layer expected a positive number, got -2",
        ("model.n_layer=-2",),
    ),
    Bad(
        "bucket-zero",
        "error: parallel.bucket_mb expected a positive number, got 0.0",
        ("parallel.bucket_mb=0",),
    ),
    Bad(
        "grad-clip-negative",
        "error: train.grad_clip expected a number >= 0, got -1.0",
        ("train.grad_clip=-1",),
    ),
    Bad("data-seed-negative", "error: data.seed expected a number >= 0, got -1", ("data.seed=-1",)),
]

CONSISTENCY_CASES = [
    Bad("tp-vs-heads", "error: parallel.tp=3 does not divide model.n_head=4", ("parallel.tp=3",)),
    Bad(
        "heads-vs-width",
        "error: model.n_head=3 does not divide model.n_embd=16",
        ("model.n_head=3",),
    ),
    Bad(
        "tp-vs-vocab",
        "error: parallel.tp=4 does not divide model.vocab_size=250",
        ("model.vocab_size=250", "parallel.tp=4"),
    ),
    Bad(
        "sequence-parallel-vs-block",
        "error: parallel.tp=2 does not divide model.block_size=7 "
        "(sequence parallel splits the sequence)",
        ("parallel.tp=2", "parallel.sequence_parallel=true", "model.block_size=7"),
    ),
    Bad(
        "dp-vs-batch",
        "error: parallel.dp=3 does not divide train.batch_size=8",
        ("parallel.dp=3",),
    ),
    Bad(
        "microbatch-vs-batch",
        "error: parallel.dp·train.microbatch_size=3 does not divide train.batch_size=8",
        ("train.microbatch_size=3",),
    ),
    Bad(
        "dp-times-microbatch-vs-batch",
        "error: parallel.dp·train.microbatch_size=6 does not divide train.batch_size=8",
        ("parallel.dp=2", "train.microbatch_size=3"),
    ),
    Bad(
        "order-missing-axis",
        "error: parallel.order expected the axes dp, tp, pp (and optionally cp) joined by '-', "
        "got 'tp-dp'",
        ("parallel.order=tp-dp",),
    ),
    Bad(
        "order-repeated-axis",
        "error: parallel.order expected the axes dp, tp, pp (and optionally cp) joined by '-', "
        "got 'tp-tp-pp'",
        ("parallel.order=tp-tp-pp",),
    ),
    Bad(
        "warmup-beyond-steps",
        "error: train.warmup_steps=11 exceeds train.steps=10",
        ("train.warmup_steps=11",),
    ),
]

NOT_YET_CASES = [
    Bad(
        "pipeline-stages-exceed-layers",
        "error: the pipeline has 2 stages, more than model.n_layer=1 (set "
        "parallel.pipeline_layout to leave a stage without layers)",
        ("parallel.pp=2",),
    ),
    Bad(
        "interleaving-needs-its-schedule",
        "error: parallel.virtual_stages=2 needs parallel.schedule=interleaved-1f1b, got 1f1b",
        ("model.n_layer=4", "parallel.pp=2", "parallel.virtual_stages=2"),
    ),
    Bad(
        "interleaving-needs-microbatches-multiple-of-pp",
        "error: parallel.schedule=interleaved-1f1b needs the microbatches per step (1) to be "
        "a multiple of parallel.pp=2",
        ("model.n_layer=4", "parallel.pp=2", "parallel.schedule=interleaved-1f1b"),
    ),
    Bad(
        "virtual-stages-need-pp",
        "error: parallel.virtual_stages > 1 needs parallel.pp > 1",
        ("model.n_layer=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved-1f1b"),
    ),
    Bad(
        "loss-scale-positive",
        "error: train.loss_scale expected a positive number, got 0.0",
        ("train.dtype=fp16", "train.loss_scale=0"),
    ),
    Bad(
        "recompute-choice",
        "error: parallel.recompute expected one of none | full | selective, got 'some'",
        ("parallel.recompute=some",),
    ),
]

SET_CASES = [
    Bad(
        "set-without-equals", "error: --set expected key=value, got 'train.steps'", ("train.steps",)
    ),
    Bad(
        "set-three-part-key",
        "error: --set expected a key like section.name, got 'a.b.c'",
        ("a.b.c=1",),
    ),
    Bad(
        "set-no-section", "error: --set expected a key like section.name, got 'steps'", ("steps=1",)
    ),
    Bad(
        "set-empty-name",
        "error: --set expected a key like section.name, got 'train.'",
        ("train.=1",),
    ),
]

DATA_CASES = [
    Bad(
        "data-missing-file",
        "error: text corpus {dir}/missing.txt: no such file",
        ("data.source={dir}/missing.txt",),
    ),
    Bad(
        "data-directory",
        "error: text corpus {dir}: is a directory, not a text file",
        ("data.source={dir}",),
    ),
    Bad(
        "data-too-short",
        "error: text corpus {dir}/short.txt: 5 bytes, too short for one block of 8 "
        "(needs at least 9)",
        ("data.source={dir}/short.txt",),
    ),
    Bad(
        "data-val-split-too-short",
        "error: text corpus {dir}/twelve.txt: the val split has 1 tokens, too few for "
        "block_size 8 (needs at least 9)",
        ("data.source={dir}/twelve.txt",),
    ),
]

INCLUDE_CASES = [
    Bad(
        "include-missing",
        "error: {config}: included file '{dir}/base.yaml' does not exist",
        yaml="include: base.yaml\n" + TINY_YAML,
    ),
    Bad(
        "include-self",
        "error: include cycle: {dir}/config.yaml -> {dir}/config.yaml",
        yaml="include: config.yaml\n",
    ),
    Bad(
        "include-cycle",
        "error: include cycle: {dir}/config.yaml -> {dir}/loop.yaml -> {dir}/config.yaml",
        yaml="include: [loop.yaml]\n",
    ),
    Bad(
        "include-not-a-name",
        "error: {config}: include expected a file name or a list of file names, got 5 (int)",
        yaml="include: 5\n",
    ),
    Bad(
        "include-unknown-section-names-the-included-file",
        "error: unknown section 'modle' in {dir}/typo.yaml (did you mean 'model'?)",
        yaml="include: typo.yaml\n",
    ),
    Bad(
        "include-checks-the-merged-config",
        "error: parallel.tp=3 does not divide model.n_head=4",
        yaml="include: tiny.yaml\nparallel: {tp: 3}\n",
    ),
    Bad(
        "unknown-top-level-key-did-you-mean-sweep",
        "error: unknown section 'sweeps' in {config} (did you mean 'sweep'?)",
        yaml=TINY_YAML + "sweeps: []\n",
    ),
]


def _sweep(text: str) -> str:
    return TINY_YAML + text


# `civetta compare` validates the whole sweep before any run starts.
SWEEP_CASES = [
    Bad(
        "sweep-not-a-list-or-grid",
        "error: sweep expected a list of layouts or a mapping with 'grid', got 'dp' (str)",
        yaml=_sweep("sweep: dp\n"),
    ),
    Bad(
        "sweep-empty",
        "error: sweep expected at least one layout, got an empty list",
        yaml=_sweep("sweep: []\n"),
    ),
    Bad(
        "sweep-mapping-without-grid",
        "error: unknown key 'sweep.gird' (did you mean 'sweep.grid'?)",
        yaml=_sweep("sweep: {gird: {parallel.dp: [1, 2]}}\n"),
    ),
    Bad(
        "sweep-grid-not-a-mapping",
        "error: sweep.grid expected a mapping of section.name: [values], got [1, 2] (list)",
        yaml=_sweep("sweep: {grid: [1, 2]}\n"),
    ),
    Bad(
        "sweep-grid-values-not-a-list",
        "error: sweep.grid.parallel.dp expected a non-empty list of values, got 2 (int)",
        yaml=_sweep("sweep: {grid: {parallel.dp: 2}}\n"),
    ),
    Bad(
        "sweep-entry-breaks-a-rule-names-its-index",
        "error: sweep[2]: parallel.tp=3 does not divide model.n_head=4",
        yaml=_sweep("sweep:\n  - {parallel.dp: 2}\n  - {parallel.tp: 2}\n  - {parallel.tp: 3}\n"),
    ),
    Bad(
        "sweep-grid-entry-names-its-combination",
        "error: sweep[1] (parallel.dp=1, parallel.tp=3): parallel.tp=3 does not divide "
        "model.n_head=4",
        yaml=_sweep("sweep:\n  grid:\n    parallel.dp: [1, 2]\n    parallel: {tp: [2, 3]}\n"),
    ),
    Bad(
        "sweep-entry-unknown-key-did-you-mean",
        "error: sweep[1]: unknown key 'parallel.sequence_paralel' "
        "(did you mean 'parallel.sequence_parallel'?)",
        yaml=_sweep("sweep:\n  - {parallel.dp: 2}\n  - {parallel.sequence_paralel: true}\n"),
    ),
    Bad(
        "sweep-entry-unknown-nested-key",
        "error: sweep[0]: unknown key 'parallel.schedul' (did you mean 'parallel.schedule'?)",
        yaml=_sweep("sweep:\n  - parallel: {pp: 1, schedul: gpipe}\n"),
    ),
    Bad(
        "sweep-entry-unknown-section",
        "error: sweep[0]: unknown section 'paralel' (did you mean 'parallel'?)",
        yaml=_sweep("sweep:\n  - {paralel.dp: 2}\n"),
    ),
    Bad(
        "sweep-entry-bare-key",
        "error: sweep[0]: expected 'section.name: value' or a section mapping, got 'dp' "
        "(did you mean 'parallel.dp'?)",
        yaml=_sweep("sweep:\n  - {dp: 2}\n"),
    ),
    Bad(
        "sweep-entry-not-a-mapping",
        "error: sweep[0] expected a mapping of overrides such as {{parallel.dp: 2}}, got 2 (int)",
        yaml=_sweep("sweep: [2]\n"),
    ),
    Bad(
        "sweep-entry-bad-type",
        "error: sweep[0]: parallel.dp expected int, got 'two' (str)",
        yaml=_sweep("sweep:\n  - {parallel.dp: two}\n"),
    ),
    Bad(
        "sweep-entry-duplicate-name",
        "error: sweep[1].name 'a' is already used by sweep[0]",
        yaml=_sweep("sweep:\n  - {name: a, parallel.dp: 2}\n  - {name: a, parallel.tp: 2}\n"),
    ),
    Bad(
        "sweep-entry-name-not-a-directory-name",
        "error: sweep[0].name expected letters, digits and . _ + - (a directory name), "
        "got 'a/b' (str)",
        yaml=_sweep("sweep:\n  - {name: a/b, parallel.dp: 2}\n"),
    ),
    Bad(
        "sweep-set-breaks-the-base",
        "error: parallel.tp=3 does not divide model.n_head=4",
        ("parallel.tp=3",),
        yaml=_sweep("sweep:\n  - {parallel.dp: 2}\n"),
    ),
    Bad(
        "sweep-entry-bad-data-source",
        "error: text corpus no-such-corpus.txt: no such file",
        yaml=_sweep("sweep:\n  - {data.source: no-such-corpus.txt}\n"),
    ),
    Bad(
        "compare-missing-config-file",
        "error: config file '{dir}/nope.yaml' does not exist",
        args=("{dir}/nope.yaml",),
    ),
    Bad(
        "compare-mpiexec-missing",
        "error: --mpiexec '{dir}/no-such-mpiexec' is not an executable",
        yaml=_sweep("sweep:\n  - {parallel.dp: 2}\n"),
        args=("{config}", "--mpiexec", "{dir}/no-such-mpiexec"),
    ),
    Bad(
        "compare-timeout-not-positive",
        "error: --timeout expected a positive number, got 0",
        args=("{config}", "--timeout", "0"),
    ),
]
SWEEP_CASES = [dataclasses.replace(case, command="compare") for case in SWEEP_CASES]

CONFIG_CASES = (
    FILE_CASES
    + KEY_AND_TYPE_CASES
    + CHOICE_CASES
    + RANGE_CASES
    + CONSISTENCY_CASES
    + NOT_YET_CASES
    + SET_CASES
    + INCLUDE_CASES
    + SWEEP_CASES
)


def _argv(case: Bad, config: Path, scratch: Path) -> list[str]:
    args = [a.format(dir=scratch, config=config) for a in case.args] or [str(config)]
    sets = [item for o in case.overrides for item in ("--set", o.format(dir=scratch))]
    return [case.command, *args, *sets, "--out", str(scratch / "out")]


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    (tmp_path / "short.txt").write_bytes(b"hello")
    (tmp_path / "twelve.txt").write_bytes(b"twelve bytes")
    (tmp_path / "loop.yaml").write_text("include: config.yaml\n", encoding="utf-8")
    (tmp_path / "typo.yaml").write_text("modle: {n_layer: 2}\n", encoding="utf-8")
    (tmp_path / "tiny.yaml").write_text(TINY_YAML, encoding="utf-8")
    return tmp_path


def _run_in_process(
    case: Bad, scratch: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    config = scratch / "config.yaml"
    if isinstance(case.yaml, bytes):
        config.write_bytes(case.yaml)
    else:
        config.write_text(case.yaml, encoding="utf-8")
    code = cli.main(_argv(case, config, scratch))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.label)
def test_bad_config_is_one_line_and_exit_2(
    case: Bad, scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run_in_process(case, scratch, capsys)
    expected = case.message.format(config=scratch / "config.yaml", dir=scratch)
    assert (code, err) == (2, expected + "\n")
    assert out == ""
    assert not (scratch / "out").exists()


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.label)
def test_bad_data_source_is_one_line_and_exit_2(
    case: Bad, scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if launched_by_mpi():
        # worker.train aborts the MPI job on any exception: that would kill pytest itself.
        pytest.skip("mpi4py.MPI is loaded in this process")
    code, out, err = _run_in_process(case, scratch, capsys)
    assert (code, err) == (2, case.message.format(dir=scratch) + "\n")
    assert out == ""


def test_set_into_unknown_section_names_the_section(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the start is pinned: the message currently says the section is "in" the config
    file, although it came from --set."""
    code, _, err = _run_in_process(Bad("set-unknown-section", "", ("foo.bar=1",)), scratch, capsys)
    assert code == 2
    assert err.startswith("error: unknown section 'foo'") and err.count("\n") == 1


def test_config_error_is_a_value_error_with_the_message() -> None:
    with pytest.raises(ConfigError, match=r"^train\.steps expected int, got 'x' \(str\)$"):
        load(None, ["train.steps=x"])
    assert issubclass(ConfigError, ValueError)


def test_scientific_notation_is_a_float(scratch: Path) -> None:
    """`lr: 1e-3` is how everyone writes a learning rate.

    Currently: PyYAML reads YAML 1.1, where a float needs a dot ("1.0e-3"), so "1e-3" is the
    string '1e-3' and the config is refused with "train.lr expected float, got '1e-3' (str)".
    """
    assert load(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)
    config = scratch / "sci.yaml"
    config.write_text("train:\n  lr: 3e-4\n", encoding="utf-8")
    assert load(config).train.lr == pytest.approx(3e-4)


# ---- argparse's own errors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train"], "error: the following arguments are required: config"),
        (["train", "x.yaml", "--frobnicate"], "error: unrecognized arguments: --frobnicate"),
        (["frobnicate"], "error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
    ids=["no-config", "unknown-option", "unknown-command"],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse prints its usage line before the error, so these are two lines, not one."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1]
    assert "Traceback" not in err


def test_out_that_is_a_file_is_refused_before_training(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Currently: the run trains to the end, then `mkdir` raises FileExistsError with a
    traceback and exit code 1 (launch/worker.py write_json_atomically)."""
    config = scratch / "config.yaml"
    config.write_text(TINY_YAML, encoding="utf-8")
    taken = scratch / "taken"
    taken.write_text("not a directory\n", encoding="utf-8")
    code = cli.main(["train", str(config), "--out", str(taken)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and str(taken) in captured.err
    assert captured.err.count("\n") == 1
    assert "train" not in captured.out  # refused before the first step


def test_relaunch_forwards_the_arguments_given_to_main(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cmd_train relaunches with the argv given to main(), not sys.argv (pytest's own
    arguments here)."""
    recorded: list[list[str]] = []

    def fake_relaunch(n: int, argv: list[str], mpiexec: str | None = None) -> launcher.JobResult:
        recorded.append([str(n), *argv])
        return launcher.JobResult(0)

    monkeypatch.setattr(launcher, "relaunch", fake_relaunch)
    monkeypatch.setattr(launcher, "inside_mpi_job", lambda: False)
    config = scratch / "config.yaml"
    config.write_text(TINY_YAML, encoding="utf-8")
    argv = ["train", str(config), "--set", "parallel.dp=2", "--out", str(scratch / "out")]
    assert cli.main(argv) == 0
    assert recorded == [["2", *argv]]


# ---- what the user sees: real processes ---------------------------------------------------------
def _civetta(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "MPI_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "launch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _assert_one_line_exit_2(completed: subprocess.CompletedProcess[str], message: str) -> None:
    assert "Traceback" not in completed.stderr, completed.stderr
    assert completed.stderr.splitlines() == [message], completed.stderr
    assert completed.returncode == 2


SUBPROCESS_CASES = [
    FILE_CASES[0],  # missing config file
    KEY_AND_TYPE_CASES[2],  # train.steps=ten
    SET_CASES[0],  # --set without '='
    DATA_CASES[0],  # data.source is not a file
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=lambda c: c.label)
def test_subprocess_prints_one_line_and_exits_2(case: Bad, scratch: Path) -> None:
    config = scratch / "config.yaml"
    config.write_text(TINY_YAML, encoding="utf-8")
    completed = _civetta(_argv(case, config, scratch), scratch)
    _assert_one_line_exit_2(completed, case.message.format(config=config, dir=scratch))


def test_data_error_under_mpi_is_one_line_and_exit_2(scratch: Path) -> None:
    """A bad data.source with dp=2 must fail like it does with one rank.

    Currently: every rank prints a traceback, then "error: rank N failed: DataError: ...", and
    MPI_Abort gives exit code 1 (launch/worker.py train catches every exception the same way).
    """
    config = scratch / "config.yaml"
    config.write_text(TINY_YAML, encoding="utf-8")
    case = DATA_CASES[0]
    argv = [*_argv(case, config, scratch), "--set", "parallel.dp=2"]
    _assert_one_line_exit_2(_civetta(argv, scratch), case.message.format(dir=scratch))


def test_explicit_mpiexec_that_does_not_exist_is_refused(scratch: Path) -> None:
    """Currently: find_mpiexec (launch/launcher.py) falls through to the next candidate when the
    explicit --mpiexec does not exist, so the job silently runs with another launcher."""
    config = scratch / "config.yaml"
    config.write_text(TINY_YAML, encoding="utf-8")
    missing = scratch / "no-such-mpiexec"
    argv = ["train", str(config), "--set", "parallel.dp=2", "--set", "train.steps=1"]
    argv += ["--out", str(scratch / "out"), "--mpiexec", str(missing)]
    completed = _civetta(argv, scratch)
    _assert_one_line_exit_2(completed, f"error: --mpiexec {str(missing)!r} is not an executable")


def test_a_wrapped_cost_model_error_has_one_prefix(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A profile without the peak of train.dtype: the cost model words it, launch wraps it in a
    ConfigError, and the CLI adds "error: " once, from simulate and tune alike."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "hardware" / "a100-dgx.yaml").read_text())
    raw["device"]["peak_tflops"] = {"bf16": 312}
    profile = scratch / "bf16-only.yaml"
    profile.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = scratch / "config.yaml"
    config.write_text(TINY_YAML, encoding="utf-8")
    common = [str(config), "--hardware", str(profile), "--set", "train.dtype=float32"]
    expected = "error: device A100-SXM4-80GB has no peak for dtype 'float32' (has bf16)\n"
    for argv in (["simulate", *common], ["tune", *common, "--gpus", "8"]):
        code = cli.main(argv)
        assert (code, capsys.readouterr().err) == (2, expected)
