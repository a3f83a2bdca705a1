"""The dataset contract: modalities, bands, classes and cities, loaded from one YAML file.

Every stage imports this module and nothing else to learn what a dataset holds. A user brings a new
dataset by writing a spec under ``configs/datasets/``; see ``docs/dataset-spec.md``.

Array conventions used by every stage: images are channel-first ``(C, H, W)``; labels are ``(H, W)``
uint8 holding class ids after any remapping; ``ignore_id`` marks unlabelled pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from c2seg.errors import C2SegError
from c2seg.config import ConfigError, from_dict, load_yaml, to_dict
from c2seg.io import file_problem

SceneFormat = Literal["geotiff", "mat_v5", "mat_v73", "tiles", "filelist"]
CityRole = Literal["source", "target", "test"]
SPLITS = ("train", "val", "test")  # the splits prep stores; training reads train and val, never test
CHIP = "{chip}"  # the chip id in the file patterns of a filelist city
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# Values a modality may plausibly hold, by its declared ``unit`` (lower-cased): inspect flags values outside
# these bounds, prep refuses statistics outside them. They are generous on purpose: they must never reject a
# real sensor, only values no sensor makes (random bytes read as float32 reach 3e38, as in corrupt files).
# - reflectance x 1e4: surface reflectance lies in 0..1, but atmospheric correction undershoots below 0
#   (water, shadow) and overshoots above 1 (clouds, specular glint), and 16-bit products saturate at 65535:
#   -1e4..1e5 is reflectance -1..10. Plain "reflectance" gets the same bounds / 1e4.
# - dB: SAR backscatter of real scenes lies within about -50 dB (noise floor) .. +40 dB (corner reflectors);
#   -100..100 dB leaves room for calibration offsets and uncalibrated products.
# A modality with another unit (or none) has no bounds.
UNIT_BOUNDS: dict[str, tuple[float, float]] = {
    "reflectance x 1e4": (-1e4, 1e5),
    "reflectance": (-1.0, 10.0),
    "db": (-100.0, 100.0),
}


@dataclass(frozen=True)
class Modality:
    """One co-registered input modality (e.g. HSI, MSI, SAR)."""

    name: str
    bands: int
    resolution_m: float
    dtype: str = "float32"
    unit: str = ""
    nodata: float | None = None
    wavelengths_nm: tuple[float, ...] | None = None
    bandwidths_nm: tuple[float, ...] | None = None
    band_names: tuple[str, ...] | None = None
    spectral_range_nm: tuple[float, float] | None = None  # shorthand: evenly spaced band centres
    mat_key: str | None = None  # key in the .mat release; default: name upper-cased
    tile_dir: str | None = None  # folder in the tile release; default: name
    exclude_bands: tuple[int | str, ...] = ()  # file bands left out by every reader: 1-based index or band name

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise C2SegError(f"modality name '{self.name}' must be lower-case letters, digits, _")
        if self.bands < 1:
            raise C2SegError(f"modalities.{self.name}.bands must be >= 1, got {self.bands}")
        if self.resolution_m <= 0:
            raise C2SegError(f"modalities.{self.name}.resolution_m must be > 0, got {self.resolution_m}")
        if self.nodata is not None and not math.isfinite(self.nodata):
            raise C2SegError(f"modalities.{self.name}.nodata must be a finite number (non-finite values are "
                             f"nodata anyway), got {self.nodata}")
        if self.spectral_range_nm is not None:
            if self.wavelengths_nm is not None:
                raise C2SegError(f"modalities.{self.name}: give wavelengths_nm or spectral_range_nm, not both")
            lo, hi = self.spectral_range_nm
            if not 0 < lo < hi:
                raise C2SegError(f"modalities.{self.name}.spectral_range_nm must be 0 < start < end")
            step = (hi - lo) / max(self.bands - 1, 1)
            object.__setattr__(self, "wavelengths_nm", tuple(round(lo + i * step, 2) for i in range(self.bands)))
            if self.bandwidths_nm is None:
                object.__setattr__(self, "bandwidths_nm", tuple([round(step, 2)] * self.bands))
            object.__setattr__(self, "spectral_range_nm", None)
        for key in ("wavelengths_nm", "bandwidths_nm", "band_names"):
            values = getattr(self, key)
            if values is not None and len(values) != self.bands:
                raise C2SegError(
                    f"modalities.{self.name}.{key} has {len(values)} entries for {self.bands} bands"
                )
        if self.band_names is not None:
            _unique(f"modalities.{self.name}.band_names", list(self.band_names))
        self._check_exclude_bands()
        if self.wavelengths_nm is not None and any(w <= 0 for w in self.wavelengths_nm):
            raise C2SegError(f"modalities.{self.name}.wavelengths_nm must be positive")
        if self.bandwidths_nm is not None and any(w <= 0 for w in self.bandwidths_nm):
            raise C2SegError(f"modalities.{self.name}.bandwidths_nm must be positive")
        try:
            import numpy as np

            np.dtype(self.dtype)
        except TypeError as exc:
            raise C2SegError(f"modalities.{self.name}.dtype '{self.dtype}' is not a numpy dtype") from exc

    def _check_exclude_bands(self) -> None:
        key = f"modalities.{self.name}.exclude_bands"
        for band in self.exclude_bands:
            if isinstance(band, str) and band not in (self.band_names or ()):
                raise C2SegError(f"{key}: '{band}' is not a band name (band_names: {list(self.band_names or [])})")
            if isinstance(band, int) and not 1 <= band <= self.bands:
                raise C2SegError(f"{key}: band {band} is not in 1..{self.bands} (1-based band numbers)")
        _unique(key, [self._band_index(b) + 1 for b in self.exclude_bands])
        if len(self.exclude_bands) == self.bands:
            raise C2SegError(f"{key} leaves none of the {self.bands} bands")

    def _band_index(self, band: int | str) -> int:
        """0-based file band of an ``exclude_bands`` entry (a 1-based number or a band name)."""
        if isinstance(band, int):
            return band - 1
        assert self.band_names is not None, "band names are checked in __post_init__ before any name is looked up"
        return self.band_names.index(band)

    @cached_property
    def kept_bands(self) -> tuple[int, ...]:
        """0-based file bands every reader returns: all but ``exclude_bands``, in file order."""
        excluded = {self._band_index(b) for b in self.exclude_bands}
        return tuple(i for i in range(self.bands) if i not in excluded)

    @property
    def channels(self) -> int:
        """Bands after ``exclude_bands``: what readers return, prep stores and the model sees (``bands`` is
        the count in the files)."""
        return len(self.kept_bands)

    @property
    def kept_wavelengths_nm(self) -> tuple[float, ...] | None:
        """The band centres of :attr:`kept_bands` (one per channel), None without ``wavelengths_nm``."""
        return None if self.wavelengths_nm is None else tuple(self.wavelengths_nm[i] for i in self.kept_bands)

    @property
    def value_bounds(self) -> tuple[float, float] | None:
        """``(low, high)`` plausible values for the modality's ``unit`` (:data:`UNIT_BOUNDS`), None if unknown."""
        return UNIT_BOUNDS.get(self.unit.strip().lower())

    def band_label(self, channel: int) -> str:
        """``band 3 (B4)``: a 0-based channel (band after ``exclude_bands``) as messages name it: its 1-based
        band number in the files, with its name if any."""
        return self.file_band_label(self.kept_bands[channel])

    def file_band_label(self, index: int) -> str:
        """``band 3 (B4)``: a 0-based band of the files (``exclude_bands`` counted) as messages name it."""
        name = f" ({self.band_names[index]})" if self.band_names else ""
        return f"band {index + 1}{name}"

    @property
    def key_in_mat(self) -> str:
        return self.mat_key or self.name.upper()

    @property
    def folder_in_tiles(self) -> str:
        return self.tile_dir or self.name


@dataclass(frozen=True)
class ClassDef:
    """One land-cover class: its id in label rasters, a name and a display colour."""

    id: int
    name: str
    colour: str

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 254:
            raise C2SegError(f"class '{self.name}': id {self.id} must be in 0..254 (uint8 labels)")
        if not _HEX.match(self.colour):
            raise C2SegError(f"class '{self.name}': colour '{self.colour}' must look like #rrggbb")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@dataclass(frozen=True)
class LabelRemap:
    """Raw label codes of a release and the class id each maps onto.

    A spec that has a ``label_remap`` declares that every label raster of every city stores raw codes:
    readers map ``codes`` onto class ids and ``nodata_codes`` onto the spec's ``ignore_id``, in every scene
    alike, and refuse a value that is neither. A spec without one declares that labels store class ids
    (an extending spec whose labels hold class ids sets ``label_remap: null``).
    """

    codes: dict[int, int]
    nodata_codes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        both = sorted(set(self.codes) & set(self.nodata_codes))
        if both:
            raise C2SegError(f"label_remap: raw code(s) {both} are in both codes and nodata_codes")


@dataclass(frozen=True)
class City:
    """A city (scene, tile collection or list of chips) of the dataset and its role in cross-city training.

    ``role``: ``source`` (labelled, trained on), ``target`` (adapted to; its labels only validate) or ``test``
    (only predicted and scored: never trained on, adapted to, pseudo-labelled, validated on, nor in the
    normalisation statistics).

    ``files`` says where its data lies, relative to the spec's data root; keys by format:
    geotiff: one key per modality plus optional ``label`` (one GeoTIFF each); mat_v5: ``scene``
    (one .mat with every modality and ``label``); mat_v73: ``scene`` and optional ``label``
    (HDF5-based .mat); tiles: ``root``, a folder with a sub-folder of ``N.tiff`` per modality and label;
    filelist: one path pattern per modality and label holding ``{chip}``, the chip id (one GeoTIFF chip each).

    ``splits`` (filelist only) maps a split (train, val, test) to a list file (csv or text, one chip a row) or a
    glob of the first modality's files; ``columns`` names the csv column of each ``files`` key (a header name, or
    a 0-based position in a csv without header; default: the first key in column 0).
    """

    name: str
    role: CityRole
    format: SceneFormat
    files: dict[str, str]
    labelled: bool = True
    crs: str | None = None  # for formats with no georeferencing (.mat): EPSG code like "EPSG:32632"
    origin: tuple[float, float] | None = None  # (x, y) of the upper-left corner in ``crs`` units
    splits: dict[str, str] | None = None
    columns: dict[str, int | str] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise C2SegError(f"city name '{self.name}' must be lower-case letters, digits, _")
        required = {"geotiff": set(), "mat_v5": {"scene"}, "mat_v73": {"scene"}, "tiles": {"root"},
                    "filelist": set()}[self.format]
        missing = required - set(self.files)
        if missing:
            raise C2SegError(f"cities.{self.name}.files needs key(s) {sorted(missing)} for format {self.format}")
        if self.format == "filelist":
            self._check_filelist()
        elif self.splits is not None or self.columns is not None:
            raise C2SegError(f"cities.{self.name}: splits and columns need format filelist (got {self.format})")

    def _check_filelist(self) -> None:
        key = f"cities.{self.name}"
        for name, pattern in self.files.items():
            if pattern.count(CHIP) != 1:
                raise C2SegError(f"{key}.files.{name}: pattern '{pattern}' must hold {CHIP} once (the chip id)")
        unknown = sorted(set(self.splits or {}) - set(SPLITS))
        if unknown:
            raise C2SegError(f"{key}.splits: unknown split(s) {unknown} (allowed: {', '.join(SPLITS)})")
        if self.role == "test" and set(self.splits or {}) - {"test"}:
            raise C2SegError(f"{key}: a test city's chips are all test; give only splits.test")
        if self.columns is None:
            return
        if self.splits is None:
            raise C2SegError(f"{key}.columns: needs splits (the csv files the columns are of)")
        unknown = sorted(set(self.columns) - set(self.files))
        if unknown:
            raise C2SegError(f"{key}.columns: {unknown} are not keys of files ({sorted(self.files)})")
        if len({type(c) for c in self.columns.values()}) > 1:
            raise C2SegError(f"{key}.columns: give every column by header name or every one by 0-based position")

    @property
    def split_columns(self) -> dict[str, int | str]:
        """The csv column of each ``files`` key the split files give (default: the first key, column 0)."""
        return self.columns or {next(iter(self.files)): 0}


@dataclass(frozen=True)
class TileDefaults:
    """Default tile size and stride for data preparation and sliding-window inference."""

    size: int = 128
    stride: int = 64

    def __post_init__(self) -> None:
        if self.size < 8 or self.stride < 1 or self.stride > self.size:
            raise C2SegError(f"tiling: need size >= 8 and 1 <= stride <= size, got {self.size}/{self.stride}")


@dataclass(frozen=True)
class DatasetSpec:
    """A whole dataset: modalities on one grid, classes, and the cities with their files."""

    name: str
    grid_resolution_m: float
    modalities: tuple[Modality, ...]
    classes: tuple[ClassDef, ...]
    cities: tuple[City, ...]
    description: str = ""
    ignore_id: int = 0
    label_remap: LabelRemap | None = None
    data_root: str = "."
    tiling: TileDefaults = field(default_factory=TileDefaults)
    source_file: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.modalities:
            raise C2SegError("modalities: at least one modality is needed")
        _unique("modalities", [m.name for m in self.modalities])
        _unique("classes (ids)", [c.id for c in self.classes])
        _unique("cities", [c.name for c in self.cities])
        if not 0 <= self.ignore_id <= 255:
            raise C2SegError(f"ignore_id {self.ignore_id} must be in 0..255 (uint8 labels)")
        if not [c for c in self.classes if c.id != self.ignore_id]:
            raise C2SegError("classes: at least one class besides ignore_id is needed")
        if not any(c.role == "source" for c in self.cities):
            raise C2SegError("cities: at least one city must have role 'source'")
        for city in self.cities:
            if city.format == "filelist":
                self._check_filelist_keys(city)
        if self.label_remap:
            bad = sorted(set(self.label_remap.codes.values()) - set(self.class_ids))
            if bad:
                raise C2SegError(f"label_remap.codes maps onto unknown class ids {bad}")

    def _check_filelist_keys(self, city: City) -> None:
        keys = set(self.modality_names) | ({"label"} if city.labelled else set())
        missing, unknown = sorted(keys - set(city.files)), sorted(set(city.files) - set(self.modality_names) - {"label"})
        if missing or unknown:
            problem = f"has no pattern for {missing}" if missing else f"has key(s) {unknown} that are no modality"
            raise C2SegError(f"cities.{city.name}.files {problem} (a filelist city gives one per modality"
                             f"{' and label' if city.labelled else ''})")

    # ---- derived views -------------------------------------------------------------------
    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.classes)

    @property
    def scored_class_ids(self) -> tuple[int, ...]:
        """Class ids that are trained and scored (every class but ``ignore_id``)."""
        return tuple(c.id for c in self.classes if c.id != self.ignore_id)

    @property
    def output_nodata(self) -> int:
        """The class-map value inference writes, and declares as nodata, where no modality has data: the
        ``ignore_id``, which is never predicted (so a real class 0 is never mistaken for nodata)."""
        return self.ignore_id

    @property
    def num_logits(self) -> int:
        """Number of model outputs: one per class id 0..max (the ignore id's logit is never used)."""
        return max(self.class_ids) + 1

    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise C2SegError(f"dataset '{self.name}' has no modality '{name}' (has {list(self.modality_names)})")

    def city(self, name: str) -> City:
        for c in self.cities:
            if c.name == name:
                return c
        raise C2SegError(f"dataset '{self.name}' has no city '{name}' (has {[c.name for c in self.cities]})")

    def cities_with_role(self, role: CityRole) -> tuple[City, ...]:
        return tuple(c for c in self.cities if c.role == role)

    def scored_city(self) -> City:
        """The city a whole chain (the demo, a SLURM submission) predicts and scores by default: the first
        labelled test city, else the first labelled target city, else the first target city."""
        order: tuple[tuple[CityRole, bool], ...] = (("test", True), ("target", True), ("target", False))
        for role, labelled in order:
            found = [c for c in self.cities_with_role(role) if c.labelled or not labelled]
            if found:
                return found[0]
        raise C2SegError(f"dataset '{self.name}' has no target or test city to predict")

    def training_cities(self, role: CityRole, names: tuple[str, ...] | list[str] | None = None,
                        setting: str = "") -> tuple[str, ...]:
        """The cities training reads in ``role``: ``names`` (given by a config's ``setting``) when not None, else
        the spec's cities of that role. A test city is never trained on, adapted to nor validated on: a
        ``names`` holding one fails, naming it and the setting."""
        if names is None:
            return tuple(c.name for c in self.cities_with_role(role))
        for name in names:
            if self.city(name).role == "test":
                raise C2SegError(f"{setting} names city '{name}', whose role is test in "
                                 f"{self.source_file or f'spec {self.name!r}'}: a test city is only predicted and "
                                 "scored, never trained on, adapted to nor validated on")
        return tuple(names)

    def class_name(self, class_id: int) -> str:
        for c in self.classes:
            if c.id == class_id:
                return c.name
        return f"class {class_id}"

    def class_lut(self) -> Any:
        """(256, 3) uint8 colour lookup table of the class ids (other ids black), for quicklooks and previews."""
        import numpy as np

        lut = np.zeros((256, 3), np.uint8)
        for c in self.classes:
            lut[c.id] = c.rgb
        return lut

    def rgb_bands(self) -> tuple[str, list[int]]:
        """Modality and three band indices for an RGB view: MSI red/green/blue by wavelength, else the first
        modality with wavelengths, else the first bands of the first modality (repeated if fewer than 3)."""
        m = sorted(self.modalities, key=lambda m: (m.name != "msi", m.wavelengths_nm is None))[0]
        wavelengths = m.kept_wavelengths_nm
        if wavelengths is not None and m.channels >= 3:
            return m.name, [min(range(m.channels), key=lambda i: abs(wavelengths[i] - target))
                            for target in (660, 560, 485)]
        return m.name, [min(i, m.channels - 1) for i in range(3)]

    def resolve(self, city: City, key: str) -> Path:
        """Absolute path of ``city.files[key]`` under the data root."""
        if key not in city.files:
            raise C2SegError(f"city '{city.name}' has no file entry '{key}' (has {sorted(city.files)})")
        return self.path(city.files[key])

    def path(self, relative: str) -> Path:
        """Absolute path of a path given relative to the data root."""
        return (Path(self.data_root) / relative).resolve()

    def with_data_root(self, root: str | Path) -> DatasetSpec:
        """The same spec reading its cities under another data root."""
        return replace(self, data_root=str(root))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, used for manifests and checkpoints (the data root is left out, and so are the
        filelist keys of cities that do not use them: specs written before they existed keep their hash)."""
        data: dict[str, Any] = to_dict(self)
        data.pop("source_file")
        data.pop("data_root")
        for city in data["cities"]:
            for key in ("splits", "columns"):
                if city[key] is None:
                    del city[key]
        return data

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what defines the data contract (modalities and classes), for compatibility checks."""
        core = {"modalities": [to_dict(m) for m in self.modalities], "classes": [to_dict(c) for c in self.classes],
                "ignore_id": self.ignore_id}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    @cached_property
    def spec_hash(self) -> str:
        """sha256 of the whole spec (cities included)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _unique(what: str, values: list[Any]) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise C2SegError(f"{what}: '{v}' appears twice")
        seen.add(v)


def spec_from_dict(data: dict[str, Any], source: str = "<spec>", data_root: str | Path | None = None) -> DatasetSpec:
    """Build a spec from plain data (a parsed YAML file or a checkpoint's copy)."""
    spec = from_dict(DatasetSpec, data, source=source)
    if data_root is not None:
        spec = spec.with_data_root(data_root)
    return spec


def read_spec_yaml(path: str | Path) -> dict[str, Any]:
    """A spec file's mapping with ``extends: other.yaml`` resolved (top-level keys override)."""
    path = Path(path)
    problem = file_problem(path, "a dataset spec YAML file")
    if problem:
        raise ConfigError(f"{path}: {problem}")
    data = load_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be a file name, got {base!r}")
    try:
        merged = read_spec_yaml(path.parent / base)
    except ConfigError as exc:  # named from the file the user gave, which names the base
        raise ConfigError(f"{path}: extends {base!r}: {exc}") from exc
    merged.update(data)
    return merged


def load_spec(path: str | Path, data_root: str | Path | None = None) -> DatasetSpec:
    """Load a dataset spec YAML. A relative ``data_root`` in the file is taken from the current
    directory; ``data_root`` here (e.g. from ``--data-root``) overrides it. A spec may start with
    ``extends: base.yaml`` to reuse another spec's modalities and classes."""
    path = Path(path)
    spec = spec_from_dict(read_spec_yaml(path), source=str(path), data_root=data_root)

    return replace(spec, source_file=str(path))


@dataclass(frozen=True)
class SpecMismatch:
    """One reason why data of one spec cannot feed a model trained on another: ``kind`` says which (a
    modality the data lacks, a band count, the class outputs), ``text`` says it in words."""

    kind: Literal["missing_modality", "band_count", "class_outputs"]
    text: str

    def __str__(self) -> str:
        return self.text


def spec_compatible(expected: DatasetSpec, actual: DatasetSpec) -> list[SpecMismatch]:
    """Why data of ``actual`` cannot feed a model trained on ``expected`` (empty if it can)."""
    problems = []
    for m in expected.modalities:
        if m.name not in actual.modality_names:
            problems.append(SpecMismatch("missing_modality", f"modality '{m.name}' is missing"))
            continue
        other = actual.modality(m.name)
        if other.channels != m.channels:
            problems.append(SpecMismatch("band_count", f"modality '{m.name}' has {other.channels} bands, the model "
                                                       f"expects {m.channels}"))
    if expected.num_logits != actual.num_logits:
        problems.append(SpecMismatch("class_outputs", f"{actual.num_logits} class outputs, the model has "
                                                      f"{expected.num_logits}"))
    return problems


__all__ = [
    "City", "ClassDef", "DatasetSpec", "LabelRemap", "Modality", "TileDefaults", "UNIT_BOUNDS",
    "load_spec", "read_spec_yaml", "spec_from_dict", "spec_compatible", "SpecMismatch", "SceneFormat", "CityRole", "SPLITS", "CHIP",
]
