"""``c2seg data inspect``: open every city of a spec, check it window by window, summarise it and draw
a quicklook per city (RGB beside the label map in the spec's class colours).

Reading every window runs every reader check (band counts, grid alignment, label values, non-finite
values, damaged blocks), so a city that inspects cleanly is ready for ``c2seg data prep``. Values outside the
plausible bounds of a modality's unit (``Modality.value_bounds``: corrupt pixel data, wrong unit) are counted
and reported as problems (:func:`city_problems`), as are pixel sizes and band centres that do not match the
spec (:mod:`data_prep.scene_checks`). Bands that hold one value everywhere (nodata, like EnMAP's water-vapour
bands) and bands the files' ``bbl`` flags bad are listed, and :func:`spec_block` writes each modality's
spec entry from what the files say (band count, dtype, nodata, wavelengths, widths, bands to exclude).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from c2seg.config import to_dict
from c2seg.spec import DatasetSpec, Modality
from c2seg.data_prep.readers import Scene, iter_windows, open_city
from c2seg.data_prep.readers.sensor import BandMeta
from c2seg.data_prep.scene_checks import scene_problems
from c2seg.data_prep.stats import count_out_of_bounds

log = logging.getLogger("c2seg.inspect")

QUICKLOOK_PX = 768  # longest side of a full-scene quicklook
QUICKLOOK_TILES = 16  # tiles shown (4 x 4) for tile cities
MAX_SCENE_PROBLEMS = 5  # grid / band-centre problems listed per city (tile cities repeat them per tile)


@dataclass
class ModalityStats:
    """Value statistics of one modality over a whole city (all bands together; ``constant``: the 0-based
    bands, after ``exclude_bands``, that hold one value everywhere)."""

    bands: int
    mean: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    nonfinite: int = 0
    out_of_bounds: int = 0
    out_of_bounds_file: str = ""  # the first file holding such values
    constant: list[int] = field(default_factory=list)
    _sum: float = field(default=0.0, repr=False)
    _count: int = field(default=0, repr=False)
    _band_min: np.ndarray | None = field(default=None, repr=False)
    _band_max: np.ndarray | None = field(default=None, repr=False)

    def add(self, values: np.ndarray) -> None:
        self._sum += float(values.sum(dtype=np.float64))
        self._count += values.size
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        self.mean = self._sum / max(self._count, 1)
        low, high = values.min(axis=(1, 2)), values.max(axis=(1, 2))
        if self._band_min is not None:
            low, high = np.minimum(low, self._band_min), np.maximum(high, self._band_max)
        self._band_min, self._band_max = low, high
        self.constant = np.flatnonzero(low == high).tolist()

    def add_out_of_bounds(self, count: int, path: Path) -> None:
        if count and not self.out_of_bounds:
            self.out_of_bounds_file = str(path)
        self.out_of_bounds += count


@dataclass
class CitySummary:
    """What ``inspect`` found in one city."""

    city: str
    role: str
    format: str
    scenes: int
    height: int
    width: int
    modalities: dict[str, ModalityStats]
    class_pixels: dict[int, int]  # class id -> pixels (empty when unlabelled)
    band_meta: dict[str, BandMeta] = field(default_factory=dict)  # what the first scene's files say of their bands
    problems: list[str] = field(default_factory=list)  # pixel sizes and band centres that do not match the spec

    def to_dict(self) -> dict:
        data = asdict(self)
        for stats in data["modalities"].values():
            for key in [k for k in stats if k.startswith("_")]:
                stats.pop(key)
        return data


def _stretch(rgb: np.ndarray) -> np.ndarray:
    """(3, h, w) -> (h, w, 3) in [0, 1] with a 2-98 percentile stretch per channel."""
    out = np.empty(rgb.shape[1:] + (3,), np.float32)
    for i, band in enumerate(rgb):
        lo, hi = np.percentile(band, [2, 98])
        out[..., i] = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
    return out


class _Quicklook:
    """Collects a subsampled RGB and label view of a city while its windows are read."""

    def __init__(self, spec: DatasetSpec, scenes: list[Scene]) -> None:
        self.modality, self.bands = spec.rgb_bands()
        self.tiled = len(scenes) > 1
        self.scenes = scenes[:QUICKLOOK_TILES] if self.tiled else scenes
        first = scenes[0]
        self.step = 1 if self.tiled else max(1, math.ceil(max(first.height, first.width) / QUICKLOOK_PX))
        side = math.ceil(math.sqrt(len(self.scenes)))
        h, w = (math.ceil(s / self.step) for s in (first.height, first.width))
        self.cell = (h, w)
        self.rgb = np.zeros((3, h * math.ceil(len(self.scenes) / side), w * side), np.float32)
        self.label = np.zeros(self.rgb.shape[1:], np.uint8)
        self.slot = {id(s): divmod(i, side) for i, s in enumerate(self.scenes)}

    def add(self, scene: Scene, window, rgb: np.ndarray, label: np.ndarray | None) -> None:
        if id(scene) not in self.slot:
            return
        k = self.step
        r_off, c_off = (-window.row) % k, (-window.col) % k
        rgb, r0, c0 = rgb[:, r_off::k, c_off::k], (window.row + r_off) // k, (window.col + c_off) // k
        gi, gj = self.slot[id(scene)]
        r0, c0 = r0 + gi * self.cell[0], c0 + gj * self.cell[1]
        self.rgb[:, r0:r0 + rgb.shape[1], c0:c0 + rgb.shape[2]] = rgb
        if label is not None:
            lab = label[r_off::k, c_off::k]
            self.label[r0:r0 + lab.shape[0], c0:c0 + lab.shape[1]] = lab

    def save(self, spec: DatasetSpec, summary: CitySummary, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        labelled = bool(summary.class_pixels)
        fig, axes = plt.subplots(1, 2 if labelled else 1, figsize=(12 if labelled else 6.5, 6), squeeze=False)
        axes[0, 0].imshow(_stretch(self.rgb), interpolation="nearest")
        axes[0, 0].set_title(f"{self.modality} bands {[b + 1 for b in self.bands]} (2-98 % stretch)")
        if labelled:
            axes[0, 1].imshow(spec.class_lut()[self.label], interpolation="nearest")
            axes[0, 1].set_title("label")
            handles = [Patch(color=np.array(c.rgb) / 255, label=f"{c.id} {c.name}") for c in spec.classes
                       if summary.class_pixels.get(c.id)]
            axes[0, 1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        for ax in axes.ravel():
            ax.set_axis_off()
        tiles = f", first {len(self.scenes)} of {summary.scenes} tiles" if self.tiled else ""
        fig.suptitle(f"{spec.name} / {summary.city} ({summary.role}, {summary.format}, {summary.height} x "
                     f"{summary.width} px{tiles})")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)


def inspect_city(spec: DatasetSpec, city_name: str, out: Path | None = None, block: int = 512) -> CitySummary:
    """Read every window of every scene of a city (all checks run), return its summary and, with
    ``out``, write ``out/<city>.png``."""
    city = spec.city(city_name)
    scenes = open_city(spec, city_name)
    try:
        stats = {m.name: ModalityStats(m.channels) for m in spec.modalities}
        hist = np.zeros(256, np.int64)
        look = _Quicklook(spec, scenes)
        work = [(s, w) for s in scenes for w in iter_windows(s.height, s.width, block)]
        for scene, window in tqdm(work, desc=f"inspect {city_name}", unit="window"):
            for name, st in stats.items():
                values = scene.read(name, window)
                st.add(values)
                st.add_out_of_bounds(count_out_of_bounds(values, spec.modality(name)), scene.file_of(name))
                if name == look.modality:
                    rgb = values[look.bands]
            label = scene.read_label(window) if scene.has_label else None
            if label is not None:
                hist += np.bincount(label.ravel(), minlength=256)
            look.add(scene, window, rgb, label)
        for scene in scenes:
            for name, count in scene.nonfinite_counts.items():
                stats[name].nonfinite += count
        summary = CitySummary(
            city=city.name, role=city.role, format=city.format, scenes=len(scenes),
            height=scenes[0].height, width=scenes[0].width, modalities=stats,
            class_pixels={int(i): int(n) for i, n in enumerate(hist) if n}, band_meta=scenes[0].band_meta,
            problems=[p for s in scenes for p in scene_problems(spec, s)])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            look.save(spec, summary, out / f"{city.name}.png")
            log.info("%s: quicklook written to %s", city.name, out / f"{city.name}.png")
        return summary
    finally:
        for s in scenes:
            s.close()


def format_summary(spec: DatasetSpec, summaries: list[CitySummary]) -> str:
    """The summary table printed by ``c2seg data inspect``."""
    lines = [f"dataset {spec.name}: {len(summaries)} cities, grid {spec.grid_resolution_m} m",
             f"{'city':<16}{'role':<8}{'format':<9}{'scenes':>7}  {'size (px)':<13}modalities x bands"]
    for s in summaries:
        mods = ", ".join(f"{n} x {st.bands}" for n, st in s.modalities.items())
        lines.append(f"{s.city:<16}{s.role:<8}{s.format:<9}{s.scenes:>7}  {f'{s.height} x {s.width}':<13}{mods}")
        for name, st in s.modalities.items():
            lines.append(f"    {name:<6} mean {st.mean:>10.2f}  min {st.min:>10.2f}  max {st.max:>10.2f}  "
                         f"non-finite {st.nonfinite}  out of bounds {st.out_of_bounds}")
            notes = _band_notes(spec.modality(name), st, s.band_meta.get(name))
            lines += [f"    {name:<6} {note}" for note in notes]
        total = sum(n for i, n in s.class_pixels.items() if i != spec.ignore_id)
        if not s.class_pixels:
            lines.append("    classes: no label")
        else:
            parts = [f"{i} {spec.class_name(i)} {100 * n / max(total, 1):.1f}%" for i, n in sorted(s.class_pixels.items())
                     if i != spec.ignore_id]
            ignored = s.class_pixels.get(spec.ignore_id, 0)
            lines.append(f"    classes ({total} labelled px, {ignored} ignored): " + ", ".join(parts))
    return "\n".join(lines)


def _band_notes(m: Modality, stats: ModalityStats, meta: BandMeta | None) -> list[str]:
    """Lines naming the bands (1-based, in the files) that hold one value everywhere and those flagged bad."""
    notes = []
    if stats.constant:
        bands = [m.kept_bands[c] + 1 for c in stats.constant]
        notes.append(f"one value everywhere (nodata or constant): bands {bands}")
    if meta is not None and meta.bad_bands:
        notes.append(f"flagged bad (bbl = 0): bands {[b + 1 for b in meta.bad_bands]}")
    return notes


def _modality_block(m: Modality, summaries: list[CitySummary]) -> dict:
    """The spec entry of ``m`` with what the files say: dtype, nodata, centres and widths (those of the first city
    whose files carry metadata) and ``exclude_bands``: the spec's, the bands flagged bad and those that hold one
    value everywhere in every city inspected."""
    entry = {k: v for k, v in to_dict(m).items() if v not in (None, "", []) and k != "exclude_bands"}
    excluded = {i + 1 for i in range(m.bands) if i not in m.kept_bands}
    constant = set.intersection(*(set(s.modalities[m.name].constant) for s in summaries))
    excluded |= {m.kept_bands[c] + 1 for c in constant}
    metas = [s.band_meta[m.name] for s in summaries if m.name in s.band_meta]
    for meta in metas:
        excluded |= {b + 1 for b in meta.bad_bands}
    if metas:
        meta = metas[0]
        entry["dtype"] = meta.dtype
        if meta.nodata is not None and math.isfinite(meta.nodata):  # NaN is nodata without a declaration
            entry["nodata"] = meta.nodata
        if meta.wavelengths_nm is not None:
            entry["wavelengths_nm"] = list(meta.wavelengths_nm)
            entry.pop("bandwidths_nm", None)
        if meta.fwhm_nm is not None:
            entry["bandwidths_nm"] = list(meta.fwhm_nm)
    if excluded:
        entry["exclude_bands"] = sorted(excluded)
    return entry


def spec_block(spec: DatasetSpec, summaries: list[CitySummary]) -> str:
    """The ``modalities:`` block of the spec as the files describe it, YAML to paste into the spec file."""
    import yaml

    block = {"modalities": [_modality_block(m, summaries) for m in spec.modalities]}
    return yaml.safe_dump(block, sort_keys=False, default_flow_style=None, width=110)


def city_problems(spec: DatasetSpec, summary: CitySummary) -> list[str]:
    """The first :data:`MAX_SCENE_PROBLEMS` pixel-size and band-centre problems of the city's scenes, then one
    line per modality holding values outside its unit's bounds, naming the file."""
    problems = summary.problems[:MAX_SCENE_PROBLEMS]
    if len(summary.problems) > MAX_SCENE_PROBLEMS:
        problems.append(f"city '{summary.city}': {len(summary.problems) - MAX_SCENE_PROBLEMS} more problem(s) of "
                        "its scenes like the ones above")
    for name, st in summary.modalities.items():
        if st.out_of_bounds:
            m = spec.modality(name)
            lo, hi = m.value_bounds
            problems.append(f"{st.out_of_bounds_file}: city '{summary.city}', modality '{name}' holds "
                            f"{st.out_of_bounds} value(s) outside [{lo:g}, {hi:g}] for unit '{m.unit}' (min "
                            f"{st.min:.6g}, max {st.max:.6g}): corrupt pixel data or a wrong unit in the spec")
    return problems


def inspect_dataset(spec: DatasetSpec, out: Path | None = None, block: int = 512,
                    cities: list[str] | None = None) -> list[CitySummary]:
    """Inspect every city (or ``cities``); with ``out`` also write ``out/summary.json`` and a quicklook
    per city."""
    summaries = [inspect_city(spec, name, out, block) for name in cities or [c.name for c in spec.cities]]
    if out is not None:
        (out / "summary.json").write_text(json.dumps([s.to_dict() for s in summaries], indent=1))
    return summaries
