"""Fuzz pass over the readers and the config / spec / model loaders (issue 18, "Trust nothing on disk").

Valid seed files are made here (the dataset spec, train, prep and model configs, a generated GeoTIFF city,
a MATLAB v5 city and a v7.3 city, an exported model), then mutated by a seeded loop: bytes flipped, a run
overwritten, the file truncated, bytes inserted and, for YAML, a token replaced by another token or type,
a line deleted, a key duplicated. Every mutated file goes to the project's real loader, which must either
return or raise an error the CLI prints as one line (a ValueError, e.g. ConfigError / SceneError /
CheckpointError, or FileNotFoundError) that names the file. Anything else is a failure: another exception
type, a multi-line message, a message without the file, or a silent success where the corruption is
detectable (a duplicated YAML key; model tensors other than the saved ones). All failures are collected
and printed with what reproduces them (kind, mutation, seed).

Input i of kind k is drawn from ``numpy.random.default_rng([C2SEG_FUZZ_SEED, k, i])``, so a failure
replays alone. Every kind gets the same fixed number of inputs (C2SEG_FUZZ_INPUTS, 250 by default), so a
run covers the same inputs on any machine, however loaded (a time budget would not).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from c2seg.spec import load_spec
from c2seg.data_prep.prep_config import load_prep_config
from c2seg.data_prep.readers import open_city
from c2seg.data_prep.synth import generate_dataset
from c2seg.train.config import load_model_config, load_train_config

REPO = Path(__file__).resolve().parent.parent
INPUTS_PER_KIND = int(os.environ.get("C2SEG_FUZZ_INPUTS", "250"))
BASE_SEED = int(os.environ.get("C2SEG_FUZZ_SEED", "0"))
SCENE_SIZE = (32, 32)

# ---- mutations ---------------------------------------------------------------------------------------------

TOKEN = re.compile(rb"[A-Za-z_][\w.]*|[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\S")
KEY_LINE = re.compile(rb"^\s*[A-Za-z_]\w*\s*:")  # a mapping key on its own line (not a list item "- key:")
# replacement tokens that change a value's type or the YAML structure
TYPED_TOKENS = [b"null", b"~", b"true", b"false", b"0", b"-1", b"1", b"3", b"1e308", b"-1e308", b".nan", b".inf",
                b"-.inf", b"[]", b"{}", b"[1, 2]", b"{a: 1}", b"''", b"'x'", b'"\\u00e9"', b"&a", b"*a", b"!!binary",
                b"!!python/object:os.system", b"!!set", b"?", b":", b"-", b"#", b"|", b">", b"\t", b"%YAML",
                b"---", b"...", b"2024-01-01", b"0x1F", b"0o17", b"1_000", b"\xff\xfe", b"\x00"]


def _position(rng: np.random.Generator, n: int) -> int:
    """An offset in ``[0, n)``, biased to headers (the first 512 bytes) and trailers (the last 512)."""
    if n <= 1:
        return 0
    where = rng.random()
    if where < 0.4:
        return int(rng.integers(0, min(n, 512)))
    if where < 0.6:
        return int(rng.integers(max(0, n - 512), n))
    return int(rng.integers(0, n))


def flip_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        if out:
            out[_position(rng, len(out))] ^= int(rng.integers(1, 256))
    return bytes(out)


def overwrite_run(rng: np.random.Generator, data: bytes) -> bytes:
    start = _position(rng, len(data))
    run = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    return data[:start] + run + data[start + len(run):]


def truncate(rng: np.random.Generator, data: bytes) -> bytes:
    return data[:_position(rng, len(data))]


def insert_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    at = _position(rng, len(data) + 1)
    return data[:at] + rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes() + data[at:]


def replace_token(rng: np.random.Generator, data: bytes, pool: list[bytes]) -> bytes:
    tokens = list(TOKEN.finditer(data))
    if not tokens:
        return data
    tok = tokens[int(rng.integers(len(tokens)))]
    choices = TYPED_TOKENS + pool + [t.group() for t in tokens]
    new = choices[int(rng.integers(len(choices)))]
    return data[:tok.start()] + new + data[tok.end():]


def delete_line(rng: np.random.Generator, data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    if not lines:
        return data
    del lines[int(rng.integers(len(lines)))]
    return b"".join(lines)


def duplicate_key(rng: np.random.Generator, data: bytes) -> bytes:
    """A key line repeated right below itself: the same key twice in one mapping."""
    lines = data.splitlines(keepends=True)
    keys = [i for i, line in enumerate(lines) if KEY_LINE.match(line)]
    if not keys:
        return data
    i = keys[int(rng.integers(len(keys)))]
    line = lines[i] if lines[i].endswith(b"\n") else lines[i] + b"\n"
    if i + 1 < len(lines) and lines[i + 1].startswith(line[:len(line) - len(line.lstrip())] + b" ") \
            and line.rstrip().endswith(b":"):
        line = line.rstrip() + b" null\n"  # a key opening a nested block: the duplicate is a plain key
    return b"".join(lines[:i + 1] + [line] + lines[i + 1:])


BYTE_MUTATIONS: dict[str, Callable] = {"flip": flip_bytes, "overwrite": overwrite_run, "truncate": truncate,
                                       "insert": insert_bytes}
YAML_MUTATIONS = ["token", "delete_line", "dup_key"]


def mutate(rng: np.random.Generator, data: bytes, text: bool, pool: list[bytes]) -> tuple[bytes, list[str]]:
    """``data`` with 1-3 mutations (YAML files also get the token / line / key ones); their names."""
    names = [*BYTE_MUTATIONS, *YAML_MUTATIONS] if text else list(BYTE_MUTATIONS)
    applied = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        name = names[int(rng.integers(len(names)))]
        if name == "token":
            data = replace_token(rng, data, pool)
        elif name == "delete_line":
            data = delete_line(rng, data)
        elif name == "dup_key":
            data = duplicate_key(rng, data)
        else:
            data = BYTE_MUTATIONS[name](rng, data)
        applied.append(name)
    return data, applied


# ---- kinds of input ----------------------------------------------------------------------------------------

@dataclass
class Kind:
    """Files of one input kind and the loader that must survive them. ``check`` judges a normal return of
    ``load`` (a problem string, or None when the result is acceptable)."""

    name: str
    files: list[Path]
    load: Callable[[], object]
    text: bool = False
    check: Callable[[object], str | None] | None = None
    also_named: tuple[str, ...] = ()  # other file names an error may give instead of the mutated file's
    tried: int = 0
    loaded: int = 0
    refused: int = 0
    pristine: dict[Path, bytes] = field(default_factory=dict)


def read_city(spec, city: str) -> None:
    """open_city, then the label and every modality over the full window."""
    for scene in open_city(spec, city):
        with scene:
            if scene.has_label:
                scene.read_label()
            for m in scene.modalities:
                scene.read(m, scene.full_window())


def _copy(src: Path, dst: Path, replace: dict[str, str] | None = None) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    text = src.read_text()
    for old, new in (replace or {}).items():
        assert old in text, (src, old)
        text = text.replace(old, new)
    dst.write_text(text)
    return dst


def make_kinds(tmp: Path) -> list[Kind]:
    """The seed files under ``tmp`` and their loaders; every seed loads cleanly."""
    import torch

    from c2seg.config import to_dict
    from c2seg.data_prep.synth import with_format
    from c2seg.train.checkpoint import load_weights
    from c2seg.train.export import load_exported, save_exported
    from c2seg.train.models import FusionSegmenter

    cfg_dir = tmp / "configs"
    base = _copy(REPO / "configs/datasets/c2seg_ab.yaml", cfg_dir / "c2seg_ab.yaml")
    spec_file = _copy(REPO / "configs/datasets/demo_tiny.yaml", cfg_dir / "demo_tiny.yaml")
    model_file = _copy(REPO / "configs/models/tiny.yaml", cfg_dir / "tiny.yaml")
    train_file = _copy(REPO / "configs/train/finetune_tiny.yaml", cfg_dir / "finetune_tiny.yaml",
                       {"model: configs/models/tiny.yaml": f"model: {model_file}"})
    prep_file = _copy(REPO / "tests/configs/prep_tiny.yaml", cfg_dir / "prep_tiny.yaml")

    spec = load_spec(spec_file, data_root=tmp / "geotiff")
    geotiff = generate_dataset(spec, *SCENE_SIZE, seed=0)
    mat5 = generate_dataset(spec.with_data_root(tmp / "mat_v5"), *SCENE_SIZE, seed=0, fmt="mat_v5")
    mat73 = generate_dataset(spec.with_data_root(tmp / "mat_v73"), *SCENE_SIZE, seed=0, fmt="mat_v73")
    assert with_format(spec, "mat_v5").cities[0].files == mat5.cities[0].files
    city = "synth_source"

    cfg = load_model_config(model_file)
    torch.manual_seed(0)
    state = FusionSegmenter(spec, cfg).state_dict()
    exported = tmp / "model" / "tiny.pt"
    save_exported(exported, to_dict(cfg), spec.to_dict(), state,
                  {m.name: {"mean": [0.0] * m.bands, "std": [1.0] * m.bands} for m in spec.modalities},
                  list(spec.modality_names), SCENE_SIZE[0], step=6)

    def load_model() -> dict:
        data = load_weights(exported, spec)
        load_exported(exported)
        return data

    def same_tensors(data: dict) -> str | None:
        loaded = data.state_dict
        if sorted(loaded) != sorted(state) or not all(torch.equal(loaded[k], state[k]) for k in state):
            return "loaded tensors differ from the saved ones (the tensor checksum should have refused them)"
        return None

    kinds = [
        Kind("spec", [spec_file], lambda: load_spec(spec_file, data_root=tmp / "geotiff"), text=True),
        # the base's keys are merged into the spec that extends it, whose name their errors give
        Kind("spec_base", [base], lambda: load_spec(spec_file, data_root=tmp / "geotiff"), text=True,
             also_named=(spec_file.name,)),
        Kind("train_config", [train_file], lambda: load_train_config(train_file), text=True),
        Kind("prep_config", [prep_file], lambda: load_prep_config(prep_file), text=True),
        Kind("model_config", [model_file], lambda: load_model_config(model_file), text=True),
        Kind("geotiff_city", [geotiff.resolve(geotiff.city(city), k) for k in ("hsi", "msi", "sar", "label")],
             lambda: read_city(geotiff, city)),
        Kind("mat_v5_city", [mat5.resolve(mat5.city(city), "scene")], lambda: read_city(mat5, city)),
        Kind("mat_v73_city", [mat73.resolve(mat73.city(city), k) for k in ("scene", "label")],
             lambda: read_city(mat73, city)),
        Kind("model_file", [exported], load_model, check=same_tensors),
    ]
    for kind in kinds:
        result = kind.load()
        assert kind.check is None or kind.check(result) is None, kind.name
        kind.pristine = {f: f.read_bytes() for f in kind.files}
    return kinds


# ---- the loop ----------------------------------------------------------------------------------------------

def judge(kind: Kind, target: Path, applied: list[str]) -> str | None:
    """Run the loader on the mutated ``target``; None when the outcome is allowed, else what went wrong."""
    try:
        result = kind.load()
    except (ValueError, FileNotFoundError) as exc:  # what c2seg/cli.py prints as one line
        kind.refused += 1
        msg = str(exc)
        if isinstance(exc, UnicodeError):
            return f"raw {type(exc).__name__}: {exc!r}"[:600]
        if "\n" in msg.strip() or not msg.strip():
            return f"{type(exc).__name__} message is not one line: {msg!r}"
        if not any(name in msg for name in (target.name, *kind.also_named)):
            return f"{type(exc).__name__} message does not name {target.name}: {msg!r}"
        return None
    except Exception as exc:  # noqa: BLE001 - every other type is the failure this test looks for
        kind.refused += 1
        return f"leaked {type(exc).__name__}: {exc!r}"[:600]
    kind.loaded += 1
    if kind.text and applied == ["dup_key"]:
        return "loaded silently although a key appears twice in one mapping"
    return kind.check(result) if kind.check else None


@pytest.mark.slow
def test_fuzz_loaders(tmp_path):
    kinds = make_kinds(tmp_path)
    yaml_files = [f for k in kinds if k.text for f in k.files]
    pool = [f.name.encode() for f in yaml_files] + [f.stem.encode() for f in yaml_files]  # a file naming another
    failures: list[str] = []
    started = time.monotonic()
    for index, kind in enumerate(kinds):
        draw = 0
        while kind.tried < INPUTS_PER_KIND:
            seed = [BASE_SEED, index, draw]
            draw += 1
            rng = np.random.default_rng(seed)
            target = kind.files[int(rng.integers(len(kind.files)))]
            data, applied = mutate(rng, kind.pristine[target], kind.text, pool)
            if data == kind.pristine[target]:  # not an input: the mutation changed nothing
                continue
            target.write_bytes(data)
            try:
                problem = judge(kind, target, applied)
            finally:
                target.write_bytes(kind.pristine[target])
            if problem:
                failures.append(f"{kind.name} {target.name} mutation={'+'.join(applied)} seed={seed}: {problem}")
            kind.tried += 1
    elapsed = time.monotonic() - started
    total = sum(k.tried for k in kinds)
    print(f"\nfuzz: {total} inputs in {elapsed:.1f} s ({INPUTS_PER_KIND} per kind, seed {BASE_SEED})")
    for k in kinds:
        print(f"  {k.name:13s} {k.tried:6d} tried  {k.loaded:6d} loaded  {k.refused:6d} refused")
    if failures:
        print(f"{len(failures)} failure(s):")
        print("\n".join(f"  {f}" for f in failures))
    assert not failures, f"{len(failures)} fuzz failure(s), first: {failures[0]}"
