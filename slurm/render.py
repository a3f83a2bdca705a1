"""Render the job scripts of a submission from ``slurm/templates/*.sbatch``.

Templates hold ``{{name}}`` placeholders; every one must be filled, so a template and this module cannot
drift apart silently. The chain of jobs for the stages of a :class:`~slurm.config.SubmitConfig`:
prep (array) -> prep_finalize -> pretrain -> finetune (+ export) -> infer (array) -> evaluate.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from c2seg.spec import DatasetSpec, load_spec
from slurm.config import Resources, SubmitConfig

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPO_ROOT = Path(__file__).resolve().parent.parent
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class Job:
    """One sbatch job of the chain."""

    name: str  # prep, prep_finalize, pretrain, finetune, infer, evaluate
    stage: str  # the stage of the config it belongs to
    script: Path
    array_tasks: int = 0  # 0: not an array job
    job_id: str | None = None

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


def _sets(items: list[str]) -> str:
    return " ".join(f"--set {_q(s)}" for s in items)


def default_city(cfg: SubmitConfig, spec: DatasetSpec) -> str:
    """The city to predict: the config's, else the spec's first target city."""
    if cfg.city:
        spec.city(cfg.city)  # raises naming the known cities
        return cfg.city
    targets = spec.cities_with_role("target")
    if not targets:
        raise ValueError(f"spec {cfg.spec} has no target city; set `city` in the slurm config")
    return targets[0].name


def render_chain(cfg: SubmitConfig, run_dir: Path, exports: dict[str, str] | None = None) -> list[Job]:
    """Write the scripts of the chain into ``run_dir/scripts``; returns the jobs in submission order."""
    run_dir = Path(run_dir).resolve()
    for sub in ("scripts", "logs", "status"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    workdir = Path(cfg.workdir or REPO_ROOT).resolve()
    spec_path = (workdir / cfg.spec).resolve()
    spec = load_spec(spec_path, data_root=(workdir / cfg.data_root) if cfg.data_root else None)
    city = default_city(cfg, spec)
    model = (workdir / cfg.model).resolve() if cfg.model else run_dir / "models" / "model.pt"
    env = {**cfg.env, **(exports or {})}
    common = {
        "run_dir": _q(run_dir), "workdir": _q(workdir), "python": _q(cfg.python or sys.executable),
        "spec": _q(spec_path), "city": city, "model": _q(model),
        "data_root_args": f"--data-root {_q(workdir / cfg.data_root)}" if cfg.data_root else "",
        "setup": "\n".join(cfg.setup),
        "exports": "\n".join(f"export {k}={_q(v)}" for k, v in env.items()),
    }

    def config_args(stage: str) -> str:
        path = cfg.stage(stage).config
        return f"--config {_q(workdir / path)}" if path else ""

    jobs: list[Job] = []

    def add(name: str, stage: str, template: str, array_tasks: int = 0, distributed: bool = False,
            **values: str) -> None:
        res = cfg.resources_for(stage)
        sc = cfg.stage(stage)
        filled = {**common, "stage": name, "args": " ".join(_q(a) for a in sc.args), "after": "",
                  "config_args": config_args(stage), "set_args": _sets(list(sc.set)), **values}
        filled["preamble"] = fill((TEMPLATES / "_preamble.sh").read_text(), filled, "_preamble.sh")
        filled["sbatch_header"] = sbatch_header(name, run_dir, res, array_tasks, distributed)
        text = fill((TEMPLATES / template).read_text(), filled, template)
        script = run_dir / "scripts" / f"{len(jobs):02d}-{name}.sbatch"
        script.write_text(text)
        script.chmod(0o755)
        jobs.append(Job(name, stage, script, array_tasks))

    prep_dir = run_dir / "prep"
    if "prep" in cfg.stages:
        add("prep", "prep", "prep.sbatch", array_tasks=cfg.prep.array_tasks)
        add("prep_finalize", "prep", "prep_finalize.sbatch")
    for stage in ("pretrain", "finetune"):
        if stage not in cfg.stages:
            continue
        res = cfg.resources_for(stage)
        per_node = res.gpus_per_node or res.tasks_per_node
        sets = [f"output_dir={run_dir / 'train' / stage}"]
        if "prep" in cfg.stages:
            sets.append(f"data.prep_dir={prep_dir}")
        if stage == "finetune" and "pretrain" in cfg.stages:
            sets.append(f"init_from={run_dir / 'train' / 'pretrain'}")
        after = ""
        if stage == "finetune":
            after = (f"$C2SEG train export --run-dir {_q(run_dir / 'train' / 'finetune')} --out {_q(model)}\n"
                     f"echo \"[c2seg-slurm] exported {model}\"")
        add(stage, stage, "train.sbatch", distributed=True, command=stage,
            config=_q(workdir / cfg.stage(stage).config), ntasks=str(res.nodes * per_node),
            tasks_per_node=str(per_node), signal_seconds=str(res.signal_seconds),
            set_args=_sets(sets + list(cfg.stage(stage).set)), after=after)
    if "infer" in cfg.stages:
        add("infer", "infer", "infer.sbatch", array_tasks=cfg.infer.array_tasks)
    if "evaluate" in cfg.stages:
        add("evaluate", "evaluate", "evaluate.sbatch",
            after=f"echo 0 > \"$STATUS_FILE\"  # scored: close the chain's MLflow runs with this outcome\n"
                  f"{common['python']} -m slurm.tracking close {_q(run_dir)}")
    return jobs
