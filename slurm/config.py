"""Typed config of a SLURM submission: cluster resources, per-stage overrides and the stage configs to run.

Loaded with :func:`load_submit_config` from ``configs/slurm/*.yaml``; unknown keys are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from c2seg.errors import C2SegError
from c2seg.config import ConfigError, from_dict, load_overridden
from c2seg.pipeline import STAGE_NAMES, StageName, stage

FINETUNE_SPLIT = (
    "the stage 'finetune' was split in two: source_only (fine-tuning on the source city's labels, from pretrain) "
    "and adapted (that model adapted to the target city, from source_only), followed by export; the stages are "
    f"{', '.join(STAGE_NAMES)}. Move the `finetune:` section to `adapted:`, add a `source_only:` one with its "
    "configs/train/*.yaml, and name both in `stages` (docs/slurm.md)")


@dataclass(frozen=True)
class Resources:
    """What a job asks SLURM for. In ``stages.<name>.resources`` every key left out (None) is inherited
    from the top-level ``resources``."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None  # SLURM time limit, e.g. "02:00:00" or "1-00:00:00"
    constraint: str | None = None
    qos: str | None = None
    nodes: int | None = None  # training stages only; array stages use one node per task
    gpus_per_node: int | None = None  # 0: CPU job, ``tasks_per_node`` tasks per node
    tasks_per_node: int | None = None  # CPU jobs only (with GPUs: one task per GPU)
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "64G"; None: the partition's default
    signal_seconds: int | None = None  # USR1 this many seconds before the time limit (training stages)
    extra_sbatch: tuple[str, ...] | None = None  # further #SBATCH lines, e.g. ["--exclusive", "--mail-type=END"]

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise C2SegError(f"resources.{name} must be >= 1, got {value}")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise C2SegError(f"resources.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.signal_seconds is not None and self.signal_seconds < 0:
            raise C2SegError(f"resources.signal_seconds must be >= 0, got {self.signal_seconds}")
        for line in self.extra_sbatch or ():
            if not line.startswith("--"):
                raise C2SegError(f"resources.extra_sbatch: '{line}' must be an sbatch option like --exclusive")

    def merged(self, override: Resources) -> Resources:
        """These resources with every value that ``override`` sets."""
        return replace(self, **{f.name: getattr(override, f.name) for f in fields(override)
                                if getattr(override, f.name) is not None})


DEFAULT_RESOURCES = Resources(time="01:00:00", nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1,
                              signal_seconds=120, extra_sbatch=())


@dataclass(frozen=True)
class StageConfig:
    """One stage of the chain: the stage's own config file, overrides of it and of the resources."""

    config: str | None = None  # prep: configs/prep/*.yaml; pretrain, source_only, adapted: configs/train/*.yaml;
    # infer: configs/infer/*.yaml; export, evaluate: none
    set: tuple[str, ...] = ()  # --set key=value overrides of that config (prep and train only)
    args: tuple[str, ...] = ()  # further command-line arguments of the stage command
    array_tasks: int = 1  # prep and infer: tasks of the array job
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.array_tasks < 1:
            raise C2SegError(f"array_tasks must be >= 1, got {self.array_tasks}")
        for item in self.set:
            if "=" not in item:
                raise C2SegError(f"set: '{item}' must look like key.path=value")


@dataclass(frozen=True)
class MlflowConfig:
    """Where the parent run (one per submission) and the stages' child runs go."""

    enabled: bool = True
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = "c2seg-slurm"


@dataclass(frozen=True)
class SubmitConfig:
    """A submission: which stages to chain, on which data, with which resources."""

    run_dir: str  # scripts, logs, chain.json and every stage's outputs go here
    spec: str  # dataset spec YAML
    stages: tuple[StageName, ...] = STAGE_NAMES
    data_root: str | None = None
    city: str | None = None  # city to predict and score; default: DatasetSpec.scored_city (test, else target)
    model: str | None = None  # model file export writes and infer predicts with; default RUN_DIR/models/adapted.pt
    python: str | None = None  # interpreter with c2seg installed, as seen from the compute nodes;
    # default: the one running `c2seg slurm submit`
    workdir: str | None = None  # jobs' working directory; default: the repository root
    setup: tuple[str, ...] = ()  # shell lines run first in every job (module load ..., source ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in every job (NCCL_SOCKET_IFNAME, ...)
    resources: Resources = field(default_factory=Resources)
    prep: StageConfig = field(default_factory=StageConfig)
    pretrain: StageConfig = field(default_factory=StageConfig)
    source_only: StageConfig = field(default_factory=StageConfig)
    adapted: StageConfig = field(default_factory=StageConfig)
    export: StageConfig = field(default_factory=StageConfig)
    infer: StageConfig = field(default_factory=StageConfig)
    evaluate: StageConfig = field(default_factory=StageConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise C2SegError("stages must name at least one stage")
        if len(set(self.stages)) != len(self.stages):
            raise C2SegError(f"stages lists a stage twice: {list(self.stages)}")
        order = [STAGE_NAMES.index(s) for s in self.stages]
        if order != sorted(order):
            raise C2SegError(f"stages must follow the pipeline order {list(STAGE_NAMES)}, got {list(self.stages)}")
        for name in STAGE_NAMES:
            _check_stage_config(name, self.stage(name), name in self.stages)

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)

    def resources_for(self, name: str) -> Resources:
        """Top-level resources (over the defaults) with the stage's overrides."""
        return DEFAULT_RESOURCES.merged(self.resources).merged(self.stage(name).resources)


def _check_stage_config(name: str, sc: StageConfig, runs: bool) -> None:
    """Refuse what the stage's command cannot take, rather than drop it, and a training stage without config."""
    st = stage(name)
    command = f"`c2seg {' '.join(st.command)}`"
    if st.trains and runs and not sc.config:
        raise C2SegError(f"{name}.config (a configs/train/*.yaml) is required when stage {name} runs")
    if sc.config and not st.takes_config:
        raise C2SegError(f"{name}.config is not supported ({command} has no config file); use {name}.args")
    if sc.set and not st.takes_set:
        where = f"{name}.config or {name}.args" if st.takes_config else f"{name}.args"
        raise C2SegError(f"{name}.set is not supported ({command} takes no --set): put the settings in {where}")


def load_submit_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SubmitConfig:
    """Load ``configs/slurm/*.yaml`` (``overrides``: dotted keys, applied first). A config of the old chain, with
    a ``finetune`` stage, is refused with :data:`FINETUNE_SPLIT` rather than mapped: its one run from pretrain
    is not what source_only -> adapted trains."""
    data = load_overridden(path, overrides)
    stages = data.get("stages")
    if "finetune" in data or (isinstance(stages, list) and "finetune" in stages):
        raise ConfigError(f"{path}: {FINETUNE_SPLIT}")
    return from_dict(SubmitConfig, data, source=str(path))
