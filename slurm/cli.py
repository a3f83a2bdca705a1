"""``c2seg slurm``: submit the pipeline to a SLURM cluster, follow it, run a local one-node cluster."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from c2seg.errors import C2SegError

SUBMIT_HELP = """\
Render one job script per stage of the config into RUN_DIR/scripts, submit them with sbatch, each held
with --dependency=afterok until the stages it needs completed (the stages of c2seg.pipeline, which
`c2seg demo` runs): prep (array) -> prep_finalize -> pretrain -> source_only -> adapted (training:
multi-node, one task per GPU through srun, requeued with --resume auto on USR1 / time limit) -> export
-> infer (array over scenes) -> evaluate. Prints the job ids, writes RUN_DIR/chain.json, and creates one
MLflow parent run with a child run per stage (jobs get C2SEG_MLFLOW_PARENT_RUN_ID and C2SEG_MLFLOW_RUN_ID).

examples:
  c2seg slurm submit --config configs/slurm/demo.yaml --wait    # the README's chain, on the demo cities
  c2seg slurm submit --config configs/slurm/local.yaml --wait
  c2seg slurm submit --config configs/slurm/cluster_example.yaml --dry-run
  c2seg slurm submit --config configs/slurm/local.yaml --set stages='[infer, evaluate]' --set model=m.pt"""


def register(stages: argparse._SubParsersAction) -> None:
    group = stages.add_parser("slurm", help="submit the pipeline to SLURM, follow it, run a local cluster",
                              description="Chain the stages on a SLURM cluster (see docs/slurm.md).")
    sub = group.add_subparsers(dest="slurm_command", metavar="COMMAND", required=True)

    submit = sub.add_parser("submit", help="render, submit and chain the stage jobs", description=SUBMIT_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("--config", type=Path, required=True, help="slurm config YAML (configs/slurm/*.yaml)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set resources.partition=gpu (repeatable; YAML values)")
    submit.add_argument("--dry-run", action="store_true", help="render the scripts only; submit nothing")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the chain to finish; exit 1 naming the failed stage and its log")
    submit.add_argument("--timeout", type=float, default=6 * 3600, help="seconds --wait waits (default 6 h)")
    submit.set_defaults(func=_submit)

    status = sub.add_parser("status", help="state of every job of a submitted chain",
                            description="Job states of RUN_DIR/chain.json from the queue and the jobs' exit "
                            "files; names the failed stage and its log. Exit 0 when all completed, 1 when a "
                            "job failed, 3 while jobs are pending or running.")
    status.add_argument("run_dir", type=Path, help="the chain's run directory (run_dir of the slurm config)")
    status.add_argument("--wait", action="store_true", help="wait until the chain completes or fails")
    status.add_argument("--timeout", type=float, default=6 * 3600, help="seconds --wait waits (default 6 h)")
    status.set_defaults(func=_status)

    cluster = sub.add_parser("cluster", help="start / stop / show a local SLURM cluster (one node, or several)",
                             description="Without --nodes: slurm/local_cluster.sh, munge + slurmctld + slurmd on "
                             "localhost (installs slurm-wlm with apt-get when missing and run as root); state under "
                             "$C2SEG_SLURM_DIR (default /tmp/c2seg-slurm). With --nodes N (root): "
                             "slurm/multinode_cluster.sh, N compute nodes node1..nodeN, each in a network namespace "
                             "of its own on a bridge, for jobs that really span nodes; state under "
                             "$C2SEG_SLURM_NODES_DIR (default /tmp/c2seg-slurm-nodes); kill-node / start-node "
                             "take a node down as a power loss would and bring it back. The two clusters can run "
                             "side by side; point SLURM_CONF at the one to use (`up` prints it).")
    cluster.add_argument("action", choices=("up", "down", "status", "kill-node", "start-node"))
    cluster.add_argument("node", nargs="?", help="kill-node / start-node: the node (node1, node2, ...)")
    cluster.add_argument("--nodes", type=int, default=None,
                         help="the multi-node cluster with this many compute nodes (up); any value selects it "
                         "for down / status / kill-node / start-node")
    cluster.set_defaults(func=_cluster)


def _submit(args: argparse.Namespace) -> int:
    from c2seg.config import parse_override
    from c2seg.slurm.cluster import SlurmError
    from c2seg.slurm.config import load_submit_config
    from c2seg.slurm.submit import run_dir_of, submit_chain

    cfg = load_submit_config(args.config, dict(parse_override(s) for s in args.set))
    try:
        jobs = submit_chain(cfg, dry_run=args.dry_run, config_path=str(args.config))
    except SlurmError as exc:
        print(f"c2seg slurm submit: error: {exc}", file=sys.stderr)
        return 1
    run_dir = run_dir_of(cfg)
    for job in jobs:
        ident = job.job_id or "(not submitted)"
        array = f" array 0-{job.array_tasks - 1}" if job.array_tasks else ""
        print(f"{job.name:<14} {ident:<16} {job.script}{array}")
    if args.dry_run:
        print(f"dry run: scripts in {run_dir / 'scripts'}; nothing submitted")
        return 0
    print(f"chain: {run_dir / 'chain.json'}   follow: c2seg slurm status {run_dir} --wait")
    if not args.wait:
        return 0
    return _wait(run_dir, args.timeout)


def _wait(run_dir: Path, timeout: float) -> int:
    """Wait for the chain; close its MLflow runs with the outcome either way."""
    from c2seg.slurm.cluster import SlurmError
    from c2seg.slurm.status import wait_chain
    from c2seg.slurm.tracking import close_chain

    try:
        wait_chain(run_dir, timeout, progress=lambda s: print(f"[slurm] {s}", flush=True))
    except SlurmError as exc:
        close_chain(run_dir)
        print(f"c2seg slurm: chain failed: {exc}", file=sys.stderr)
        return 1
    close_chain(run_dir)
    print(f"chain completed: {run_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from c2seg.slurm.status import chain_status, failure_message, first_failure
    from c2seg.slurm.tracking import close_chain

    if args.wait:
        return _wait(args.run_dir, args.timeout)
    states = chain_status(args.run_dir)
    for st in states:
        print(f"{st.job.name:<14} {st.job.job_id:<10} {st.state:<10} {st.detail}")
    failed = first_failure(states)
    if failed is not None:
        print(failure_message(failed), file=sys.stderr)
    completed = all(s.state == "COMPLETED" for s in states)
    if failed is not None or completed:
        close_chain(args.run_dir)
    return 1 if failed is not None else 0 if completed else 3


def _cluster(args: argparse.Namespace) -> int:
    from c2seg.slurm.cluster import LOCAL_CLUSTER_SCRIPT, MULTINODE_CLUSTER_SCRIPT

    multinode = args.nodes is not None or args.action in ("kill-node", "start-node")
    if args.action in ("kill-node", "start-node") and not args.node:
        raise C2SegError(f"slurm cluster {args.action} needs the node's name, e.g. node2")
    cmd = ["bash", str(MULTINODE_CLUSTER_SCRIPT if multinode else LOCAL_CLUSTER_SCRIPT), args.action]
    if args.action == "up" and multinode:
        cmd += ["--nodes", str(args.nodes)]
    if args.node:
        cmd.append(args.node)
    return subprocess.run(cmd).returncode
