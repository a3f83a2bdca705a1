"""Inference stage: sliding-window prediction of whole scenes with an exported model, blended in
Zarr-backed output blocks split across ranks, written as COG mosaics and challenge submissions,
and scored against labels. Needs no DeepSpeed.

Public entry points: :func:`inference.runner.infer_city` (exported model + spec + city) and
:func:`inference.runner.infer_scene` (any ``model(dict of (B, C, H, W)) -> logits`` on one Scene),
:func:`inference.evaluate.evaluate`, :func:`inference.cog.validate_cog`; the CLI is ``c2seg infer``.
"""
