"""``c2seg infer``: run an exported model over a city's scenes, score predictions, check COGs."""

from __future__ import annotations

import argparse
import functools
import logging
import warnings
from pathlib import Path

from c2seg.errors import C2SegError
from c2seg.cli import add_spec_args, spec_from_args
from c2seg.spec import SPLITS

log = logging.getLogger("c2seg.infer")

RUN_HELP = """\
Sliding-window inference of an exported model (c2seg train export) over every scene of a city.
Windows are blended (gaussian or cosine weights) and accumulated per output block in a Zarr store
(DIR/<city>/<scene>.zarr); finished blocks are marked, so a killed run resumes where it stopped.
Launch several ranks with torchrun or srun (RANK / WORLD_SIZE): they split the blocks, rank 0 writes
the outputs. SLURM array tasks split the scenes (SLURM_ARRAY_TASK_ID or --task-index/--num-tasks).

Outputs under DIR/<city>/: <scene>.tif (uint8 class-map COG with colour table and class names,
nodata: the spec's ignore_id), <scene>.png (quicklook), <scene>.probs.tif (--save-probs) and, for
tile-folder cities, submission/N.tif (one per input tile, the challenge format).

example: c2seg infer run --model model.pt --spec configs/datasets/c2seg_ab.yaml --city berlin \\
           --out preds --window 128 --overlap 0.5 --tta flips"""

EVAL_HELP = """\
Score a prediction against labels: confusion matrix over labelled pixels (classes 1..K), per-class IoU
and F1, mIoU, OA, macro-F1, Cohen's kappa. Writes a JSON file and a confusion-matrix PNG next to it,
and logs both to an MLflow run when --mlflow-run is given. Predictions pair with the labels by scene: one
label scene and one prediction raster whatever their names, else by name (a labelled scene without a
prediction stops it, naming the scenes that did not pair). A missing, empty or truncated raster, a
prediction that is not one band of integer class ids, values outside the spec's classes, or a prediction
grid (size, CRS, transform) unlike the labels' stops it with one line naming the file (exit 2).

example: c2seg infer evaluate --pred preds/berlin --spec configs/datasets/c2seg_ab.yaml --city berlin"""


def register(stages: argparse._SubParsersAction) -> None:
    group = stages.add_parser("infer", help="inference over whole scenes, mosaics, submission, scoring",
                              description="Inference: run (sliding windows -> COG mosaics / submission), "
                                          "evaluate (scores), check-cog (COG validation).")
    sub = group.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="predict every scene of a city", description=RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True, type=Path, help="exported model file (c2seg train export)")
    add_spec_args(run)
    run.add_argument("--city", required=True, help="city of the spec to predict")
    add_split_arg(run, "predict")
    run.add_argument("--out", required=True, type=Path, help="output folder (DIR/<city>/ is written)")
    run.add_argument("--config", type=Path, help="settings YAML (configs/infer/default.yaml); flags override it")
    run.add_argument("--window", type=int, help="window size in px (default: the tile size the model "
                     "was trained on, recorded in the exported model)")
    run.add_argument("--overlap", type=float, help="overlap fraction of neighbouring windows, 0 <= f < 1 (default 0.5)")
    run.add_argument("--blend", choices=["gaussian", "cosine"], help="blend weights (default gaussian)")
    run.add_argument("--tta", choices=["none", "flips", "d4"], help="test-time augmentation (default none)")
    run.add_argument("--batch-size", type=int, help="windows per forward pass (default 8)")
    run.add_argument("--block", type=int, help="output block / zarr chunk size, the unit split across ranks "
                                                "(default 2048; memory grows with its square)")
    run.add_argument("--save-probs", action="store_true", default=None,
                     help="keep blended per-class probabilities and write <scene>.probs.tif")
    run.add_argument("--no-quicklook", dest="quicklook", action="store_false", default=None,
                     help="skip the quicklook PNG")
    run.add_argument("--predict-absent", action="store_true", default=None,
                     help="also predict the classes partial adaptation found absent from the model's target city "
                     "(by default a model that records them never predicts them)")
    run.add_argument("--device", help="auto (GPU if present), cpu, cuda, cuda:N (default auto)")
    run.add_argument("--modalities", help="comma-separated subset of the model's modalities to use "
                                          "(the model must have been trained with modality dropout)")
    run.add_argument("--task-index", type=int, help="this array task's index (default SLURM_ARRAY_TASK_ID)")
    run.add_argument("--num-tasks", type=int, help="number of array tasks (default SLURM_ARRAY_TASK_COUNT)")
    run.add_argument("--overwrite", action="store_true",
                     help="discard earlier work stores of these scenes instead of resuming (one rank only)")
    run.set_defaults(func=_run)

    ev = sub.add_parser("evaluate", help="score predictions against labels", description=EVAL_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--pred", required=True, type=Path,
                    help="prediction raster, or folder with <scene>.tif / N.tif (c2seg infer run's DIR/<city>)")
    add_spec_args(ev)
    truth = ev.add_mutually_exclusive_group(required=True)
    truth.add_argument("--city", help="score against this city's labels (read through the spec)")
    truth.add_argument("--truth", type=Path, help="score against a label raster or a folder of label tiles")
    add_split_arg(ev, "score")
    ev.add_argument("--out", type=Path, help="metrics JSON (default PRED/metrics.json, or next to PRED)")
    ev.add_argument("--mlflow-run", help="MLflow run id to log the scores and files to")
    ev.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    ev.set_defaults(func=_gdal_quiet(_evaluate))

    cog = sub.add_parser("check-cog", help="validate Cloud-Optimized GeoTIFFs",
                         description="rio-cogeo's cog_validate (GDAL's COG checks: IFD and data order, "
                                     "overviews, ghost header), internal tiles, LAYOUT=COG, then a full read "
                                     "of every band of the image and its overviews, so a truncated or damaged "
                                     "file fails. One line per file; exit 1 when any is not a valid COG.")
    cog.add_argument("files", nargs="+", type=Path, help="GeoTIFF files")
    cog.set_defaults(func=_gdal_quiet(_check_cog))


def add_split_arg(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--split", choices=SPLITS, help=f"{verb} only the city's scenes given this split (a "
                        "filelist city's split files; every scene of a test city is test); default: every scene")


def _gdal_quiet(handler):
    """``handler`` with GDAL's own messages about a damaged file held back (rasterio's log lines below ERROR,
    the no-georeference warning): they repeat the one line that names the file; ``c2seg -v`` shows them."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        if args.verbose:
            return handler(args)
        rasterio_log = logging.getLogger("rasterio")
        level = rasterio_log.level
        rasterio_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Dataset has no geotransform")
                return handler(args)
        finally:
            rasterio_log.setLevel(level)
    return run


def _config(args: argparse.Namespace):
    from dataclasses import asdict

    from c2seg.config import from_dict, load_yaml
    from c2seg.inference.config import InferConfig

    data = load_yaml(args.config) if args.config else {}
    flags = {"window": args.window, "overlap": args.overlap, "blend": args.blend, "tta": args.tta,
             "batch_size": args.batch_size, "block": args.block, "save_probs": args.save_probs,
             "quicklook": args.quicklook, "device": args.device, "predict_absent": args.predict_absent}
    data.update({k: v for k, v in flags.items() if v is not None})
    cfg = from_dict(InferConfig, data, source=str(args.config or "command line"))
    log.debug("settings: %s", asdict(cfg))
    return cfg


def _run(args: argparse.Namespace) -> int:
    from c2seg.inference.runner import infer_city

    if (args.task_index is None) != (args.num_tasks is None):
        raise C2SegError("give --task-index and --num-tasks together")
    modalities = [m.strip() for m in args.modalities.split(",")] if args.modalities else None
    results = infer_city(args.model, spec_from_args(args), args.city, args.out, _config(args), modalities,
                         args.task_index, args.num_tasks, args.overwrite, args.split)
    for r in results:
        print(r.class_map)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from c2seg.inference.evaluate import evaluate, log_to_mlflow, plot_confusion, truth_from_city, truth_from_rasters, \
        write_result

    spec = spec_from_args(args)
    if args.split and not args.city:
        raise C2SegError("--split picks scenes of --city; it does not apply to --truth")
    truths = list(truth_from_city(spec, args.city, args.split) if args.city else truth_from_rasters(args.truth))
    result = evaluate(spec, args.pred, truths)
    out = args.out or (args.pred / "metrics.json" if args.pred.is_dir() else args.pred.with_suffix(".metrics.json"))
    write_result(result, out)
    plot = plot_confusion(result, spec, out.with_name(out.stem + "_confusion.png"))
    if args.mlflow_run:  # a tracking server that is down warns; the scores are written already
        from c2seg.train.tracking import TrackingCall

        with TrackingCall(f"scores not logged to run {args.mlflow_run}", log):
            log_to_mlflow(result, args.mlflow_run, f"eval/{args.city or args.truth.stem}", [out, plot],
                          args.tracking_uri)
    print(f"mIoU {100 * result['miou']:.2f}%  OA {100 * result['oa']:.2f}%  macro-F1 {100 * result['macro_f1']:.2f}%"
          f"  kappa {result['kappa']:.4f}  -> {out}")
    return 0


def _check_cog(args: argparse.Namespace) -> int:
    from c2seg.inference.cog import validate_cog

    bad = 0
    for path in args.files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
        errors, cautions = validate_cog(path)
        for w in cautions:
            print(f"{path}: warning: {w}")
        print(f"{path}: NOT a valid COG: {'; '.join(errors)}" if errors else f"{path}: valid COG")
        bad += bool(errors)
    return 1 if bad else 0
