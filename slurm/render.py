"""Render the job scripts of a submission from ``slurm/templates/*.sbatch``.

Templates hold ``{{name}}`` placeholders; every one must be filled, so a template and this module cannot
drift apart silently. Every job calls its stage's command line from :mod:`c2seg.pipeline` (the one ``c2seg demo``
runs), for the stages of a :class:`~slurm.config.SubmitConfig`:
prep (array) -> prep_finalize -> pretrain -> source_only -> adapted -> export -> infer (array) -> evaluate.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from c2seg.pipeline import (SCORED_RUN, STAGE_NAMES, STAGES, RunLayout, Stage, StageInputs, command_line,
                            set_flags)
from c2seg.spec import DatasetSpec, load_spec
from c2seg.slurm.config import Resources, SubmitConfig

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPO_ROOT = Path(__file__).resolve().parent.parent
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class Job:
    """One sbatch job of the chain."""

    name: str  # the stage's name, or prep_finalize
    stage: str  # the stage of the config it belongs to
    script: Path
    array_tasks: int = 0  # 0: not an array job
    job_id: str | None = None
    after: tuple[str, ...] = ()  # names of the jobs it waits for (afterok)

    def log_path(self, run_dir: Path, task: int | None = None) -> Path:
        """The job's (or array task's) SLURM output file, once the job id is known."""
        if self.array_tasks:
            return run_dir / "logs" / f"{self.name}-{self.job_id}_{0 if task is None else task}.log"
        return run_dir / "logs" / f"{self.name}-{self.job_id}.log"


def fill(template: str, values: dict[str, str], name: str) -> str:
    """Replace every ``{{key}}``; a placeholder without a value is an error naming the template."""
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise ValueError(f"template {name}: no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def sbatch_header(job: str, run_dir: Path, res: Resources, array_tasks: int = 0, distributed: bool = False) -> str:
    """The #SBATCH lines of a job."""
    log = run_dir / "logs" / (f"{job}-%A_%a.log" if array_tasks else f"{job}-%j.log")
    lines = [f"--job-name=c2seg-{job}", f"--output={log}", "--open-mode=append"]
    for key, value in (("partition", res.partition), ("account", res.account), ("time", res.time),
                       ("constraint", res.constraint), ("qos", res.qos), ("mem", res.mem)):
        if value:
            lines.append(f"--{key}={value}")
    if distributed:
        per_node = res.gpus_per_node or res.tasks_per_node
        lines += [f"--nodes={res.nodes}", f"--ntasks-per-node={per_node}", f"--cpus-per-task={res.cpus_per_task}",
                  f"--signal=B:USR1@{res.signal_seconds}", "--requeue"]
        if res.gpus_per_node:
            lines.append(f"--gpus-per-node={res.gpus_per_node}")
    else:
        lines += ["--nodes=1", "--ntasks=1", f"--cpus-per-task={res.cpus_per_task}"]
        if res.gpus_per_node:
            lines.append(f"--gpus-per-node={min(res.gpus_per_node, 1)}")
    if array_tasks:
        lines.append(f"--array=0-{array_tasks - 1}")
    lines += list(res.extra_sbatch or ())
    return "#!/bin/bash\n" + "\n".join(f"#SBATCH {line}" for line in lines)


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def _sets(items: tuple[str, ...]) -> str:
    return shlex.join(set_flags(list(items)))


def default_city(cfg: SubmitConfig, spec: DatasetSpec) -> str:
    """The city to predict: the config's, else the spec's scored city (a labelled test city, else a target)."""
    if cfg.city:
        spec.city(cfg.city)  # raises naming the known cities
        return cfg.city
    return spec.scored_city().name


def workdir_of(cfg: SubmitConfig) -> Path:
    """The jobs' working directory, which relative paths of the config are taken from."""
    return Path(cfg.workdir or REPO_ROOT).resolve()


def stage_inputs(cfg: SubmitConfig, run_dir: Path) -> StageInputs:
    """What the stage commands of the chain are given: absolute paths, as the compute nodes see them."""
    workdir = workdir_of(cfg)
    spec_path = (workdir / cfg.spec).resolve()
    data_root = workdir / cfg.data_root if cfg.data_root else None
    spec = load_spec(spec_path, data_root=data_root)
    layout = RunLayout(run_dir)
    model = (workdir / cfg.model).resolve() if cfg.model else layout.model(SCORED_RUN)
    configs = {name: str(workdir / cfg.stage(name).config) for name in STAGE_NAMES if cfg.stage(name).config}
    spec_args = ("--spec", str(spec_path), *(("--data-root", str(data_root)) if data_root else ()))
    return StageInputs(layout, spec_args, default_city(cfg, spec), model, configs, frozenset(cfg.stages))


class _ChainWriter:
    """Writes the job scripts of one chain into ``run_dir/scripts``, in submission order."""

    def __init__(self, cfg: SubmitConfig, run_dir: Path, exports: dict[str, str]) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.inputs = stage_inputs(cfg, run_dir)
        self.jobs: list[Job] = []
        self.common = {
            "run_dir": _q(run_dir), "workdir": _q(workdir_of(cfg)), "python": _q(cfg.python or sys.executable),
            "setup": "\n".join(cfg.setup), "exports": "\n".join(f"export {k}={_q(v)}" for k, v in exports.items()),
        }

    def add(self, name: str, stage: Stage, template: str, after: tuple[str, ...], array_tasks: int = 0,
            distributed: bool = False, **values: str) -> Job:
        """Render ``template`` as job ``name`` of ``stage``, held until the jobs ``after`` complete."""
        sc = self.cfg.stage(stage.name)
        filled = {**self.common, "stage": name, "cli": shlex.join(command_line(stage, self.inputs)),
                  "args": shlex.join(sc.args), **values}
        filled["preamble"] = fill((TEMPLATES / "_preamble.sh").read_text(), filled, "_preamble.sh")
        filled["sbatch_header"] = sbatch_header(name, self.run_dir, self.cfg.resources_for(stage.name),
                                                array_tasks, distributed)
        script = self.run_dir / "scripts" / f"{len(self.jobs):02d}-{name}.sbatch"
        script.write_text(fill((TEMPLATES / template).read_text(), filled, template))
        script.chmod(0o755)
        self.jobs.append(Job(name, stage.name, script, array_tasks, after=after))
        return self.jobs[-1]

    def stage_jobs(self, stage: Stage, after: tuple[str, ...]) -> Job:
        """The job(s) of ``stage``; returns the last, the one the stages needing it wait for."""
        sc = self.cfg.stage(stage.name)
        if stage.name == "prep":
            prep = self.add("prep", stage, "prep.sbatch", after, array_tasks=sc.array_tasks, set_args=_sets(sc.set))
            return self.add("prep_finalize", stage, "prep_finalize.sbatch", (prep.name,),
                            prep_dir=_q(self.inputs.layout.prep))
        if stage.trains:
            res = self.cfg.resources_for(stage.name)
            per_node = res.gpus_per_node or res.tasks_per_node
            return self.add(stage.name, stage, "train.sbatch", after, distributed=True,
                            ntasks=str(res.nodes * per_node), tasks_per_node=str(per_node),
                            signal_seconds=str(res.signal_seconds), set_args=_sets(sc.set))
        if stage.name == "infer":
            return self.add("infer", stage, "infer.sbatch", after, array_tasks=sc.array_tasks)
        if stage.name == "export":
            return self.add("export", stage, "export.sbatch", after, model=_q(self.inputs.model))
        return self.add("evaluate", stage, "evaluate.sbatch", after)


def render_chain(cfg: SubmitConfig, run_dir: Path, exports: dict[str, str] | None = None) -> list[Job]:
    """Write the scripts of the chain into ``run_dir/scripts``; returns the jobs in submission order, each
    naming the jobs it waits for: the last job of every stage it needs (:data:`c2seg.pipeline.STAGES`) that
    this chain runs."""
    run_dir = Path(run_dir).resolve()
    for sub in ("scripts", "logs", "status"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    writer = _ChainWriter(cfg, run_dir, {**cfg.env, **(exports or {})})
    last_job: dict[str, str] = {}  # stage -> the name of its last job
    for stage in STAGES:
        if stage.name in cfg.stages:
            after = tuple(last_job[need] for need in stage.needs if need in last_job)
            last_job[stage.name] = writer.stage_jobs(stage, after).name
    return writer.jobs
