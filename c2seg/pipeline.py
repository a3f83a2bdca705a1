"""The pipeline, declared once: its stages in order, the CLI each calls and with which arguments, what each
needs and which file marks it done.

    prep -> pretrain -> source_only -> adapted -> export -> infer -> evaluate

``c2seg demo`` runs these stages one after another on this machine (skipping those whose done marker
exists); ``c2seg slurm submit`` renders one job per stage (prep: an array and a finalize job) calling the
same command line, each held with ``afterok`` until the stages it needs have completed. Both lay their
outputs out with :class:`RunLayout`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from c2seg.errors import C2SegError

StageName = Literal["prep", "pretrain", "source_only", "adapted", "export", "infer", "evaluate"]


@dataclass(frozen=True)
class Stage:
    """One stage: the ``c2seg`` command it runs, the stages whose outputs it reads, and its done marker."""

    name: StageName
    command: tuple[str, ...]  # the c2seg CLI command, e.g. ("train", "finetune")
    needs: tuple[StageName, ...] = ()  # stages whose outputs it reads: it runs after them
    from_run: StageName | None = None  # training: the run it starts from (init_from); export: the run it exports
    done: str | None = None  # file, relative to the run directory, that marks it done; None: always runs
    takes_config: bool = False  # the command reads a --config file
    takes_set: bool = False  # the command takes --set key=value overrides of that config

    @property
    def trains(self) -> bool:
        return self.command in (("train", "pretrain"), ("train", "finetune"))


SCORED_RUN: StageName = "adapted"  # the training run the chain exports, predicts with and scores


def scoring_stages(run: StageName) -> tuple[Stage, Stage, Stage]:
    """export -> infer -> evaluate of the model of training run ``run``."""
    return (Stage("export", ("train", "export"), needs=(run,), from_run=run, done=f"models/{run}.pt"),
            Stage("infer", ("infer", "run"), needs=("export",), takes_config=True),
            Stage("evaluate", ("infer", "evaluate"), needs=("infer",)))


def _training(name: StageName, command: str, from_run: StageName | None) -> Stage:
    needs: tuple[StageName, ...] = ("prep", from_run) if from_run else ("prep",)
    return Stage(name, ("train", command), needs=needs, from_run=from_run, done=f"train/{name}/COMPLETED",
                 takes_config=True, takes_set=True)


TRAINING_STAGES: tuple[Stage, ...] = (
    _training("pretrain", "pretrain", None),  # masked multimodal reconstruction on every city
    _training("source_only", "finetune", "pretrain"),  # segmentation on the source city's labels
    _training("adapted", "finetune", "source_only"),  # that model adapted to the target city (mean teacher)
)
PREP = Stage("prep", ("data", "prep"), done="prep/manifest.json", takes_config=True, takes_set=True)
STAGES: tuple[Stage, ...] = (PREP, *TRAINING_STAGES, *scoring_stages(SCORED_RUN))
STAGE_NAMES: tuple[StageName, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name`` (ValueError naming the stages otherwise)."""
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise C2SegError(f"no stage '{name}'; the stages are {', '.join(STAGE_NAMES)}")


@dataclass(frozen=True)
class RunLayout:
    """Where the stages of one run (a demo's ``out``, a SLURM chain's ``run_dir``) read and write."""

    root: Path

    @property
    def prep(self) -> Path:
        return self.root / "prep"

    def train(self, run: str) -> Path:
        return self.root / "train" / run

    def model(self, run: str) -> Path:
        return self.root / "models" / f"{run}.pt"

    def predictions(self, model: Path, city: str) -> Path:
        """The class maps (and metrics) of ``city`` predicted with ``model``, named after the model file."""
        return self.root / "predictions" / model.stem / city

    def done(self, stage: Stage) -> Path | None:
        return self.root / stage.done if stage.done else None


@dataclass(frozen=True)
class StageInputs:
    """What the stage commands of one run are given."""

    layout: RunLayout
    spec_args: tuple[str, ...]  # --spec SPEC [--data-root ROOT]
    city: str  # the city infer predicts and evaluate scores
    model: Path  # the model export writes and infer predicts with
    configs: Mapping[str, str]  # stage name -> its config file (prep, training, infer; optional for prep, infer)
    present: frozenset[str]  # the stages of this run: training reads only their outputs


def command_line(stage: Stage, inputs: StageInputs) -> list[str]:
    """The ``c2seg`` arguments of ``stage`` (callers add their own flags: workers, windows, MLflow run)."""
    layout = inputs.layout
    config = inputs.configs.get(stage.name)
    config_args = ["--config", config] if config and stage.takes_config else []
    if stage.trains:
        return [*stage.command, *config_args, "--resume", "auto", *set_flags(_training_overrides(stage, inputs))]
    if stage.name == "prep":
        return [*stage.command, *inputs.spec_args, "--out", str(layout.prep), *config_args]
    if stage.name == "export":
        assert stage.from_run is not None, "an export stage names the run it exports"
        return [*stage.command, "--run-dir", str(layout.train(stage.from_run)), "--out", str(inputs.model)]
    predictions = layout.predictions(inputs.model, inputs.city)
    if stage.name == "infer":
        return [*stage.command, "--model", str(inputs.model), *inputs.spec_args, "--city", inputs.city,
                "--out", str(predictions.parent), *config_args]
    return [*stage.command, "--pred", str(predictions), *inputs.spec_args, "--city", inputs.city,
            "--out", str(predictions / "metrics.json")]


def _training_overrides(stage: Stage, inputs: StageInputs) -> list[str]:
    """A training stage's run dir and MLflow run name, and the outputs it reads from the stages of this run."""
    layout = inputs.layout
    sets = [f"data.prep_dir={layout.prep}"] if "prep" in inputs.present else []
    sets += [f"output_dir={layout.train(stage.name)}", f"tracking.run_name={stage.name}"]
    if stage.from_run in inputs.present:
        sets.append(f"init_from={layout.train(stage.from_run)}")
    return sets


def set_flags(overrides: list[str]) -> list[str]:
    """``--set`` flags for ``key=value`` overrides."""
    return [arg for item in overrides for arg in ("--set", item)]
