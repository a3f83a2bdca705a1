"""Typed configs of the train stage: the model (configs/models/*.yaml) and a training run
(configs/train/*.yaml). Both are strict: an unknown key, or a number outside its bounds (``bounded``), is an
error naming the file and the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from c2seg.errors import C2SegError
from c2seg.config import ConfigError, bounded, check_bounds, from_dict, load_config

Precision = Literal["fp32", "bf16", "fp16"]
Fusion = Literal["joint", "cross"]


@dataclass(frozen=True)
class ModelConfig:
    """The fusion segmenter: per-modality patch embeddings -> shared transformer -> conv decoder."""

    name: str
    embed_dim: int = bounded(ge=4)
    depth: int = bounded(ge=1)
    num_heads: int = bounded(ge=1)
    patch_size: int = 8
    mlp_ratio: float = bounded(4.0, gt=0)
    max_bands_per_token: int = bounded(64, ge=1)  # modalities with more bands are cut into spectral groups
    spectral_embedding: Literal["wavelength", "conv"] = "wavelength"  # DOFA-style weights from wavelengths
    wavelength_hidden: int = bounded(128, ge=1)
    decoder_dim: int = bounded(64, ge=1)
    # light: the transformer's features upsampled alone; skip: plus a convolutional stem's full-resolution
    # features at every scale (U-Net-like skips; train/models/stem.py), stem_dim channels at full resolution
    decoder: Literal["light", "skip"] = "light"
    stem_dim: int = bounded(32, ge=1)
    # + a per-pixel linear classifier of the input bands, added to the logits (zero at the start): the
    # per-pixel model hyperspectral users compare against, inside the segmenter (train/models/segmenter.py)
    pixel_head: bool = False
    # sides (odd, px) of the windows whose band means the per-pixel head also reads beside each pixel's own
    # bands, e.g. [3, 7]: a linear classifier of spatial-spectral features, as classical HSI pipelines use
    pixel_head_means: tuple[int, ...] = ()
    qkv_bias: bool = True
    # fine-tuning: chance of dropping one modality from a batch (a model that must also serve cities missing a
    # modality). Off: it cost the source-only model 12 points of whole-city mIoU on the shift suite's haze pair
    # and 7 on gain (README, the peer benchmark)
    modality_dropout: float = bounded(0.0, ge=0, lt=1)
    activation_checkpointing: bool = False
    # joint: all G*N modality / spectral-group tokens attend jointly in `depth` blocks, then are averaged per
    # location. cross: the G tokens of each location attend among themselves and are averaged into one token
    # per location, then `depth` blocks of self-attention over the N fused tokens + cross-attention to all G*N
    # tokens (attention cost ~G x lower). Masked pretraining supports joint only.
    fusion: Fusion = "joint"

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.embed_dim % self.num_heads:
            raise C2SegError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 2 or self.embed_dim % 4:
            raise C2SegError("embed_dim must be a multiple of 4 and the head size even")
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            raise C2SegError(f"patch_size must be a power of two, got {self.patch_size}")
        if any(k < 3 or k % 2 == 0 for k in self.pixel_head_means):
            raise C2SegError(f"pixel_head_means must be odd window sides >= 3, got {list(self.pixel_head_means)}")
        if self.pixel_head_means and not self.pixel_head:
            raise C2SegError("pixel_head_means needs pixel_head: true")


@dataclass(frozen=True)
class RadiometricConfig:
    """Radiometric augmentation of training tiles (:mod:`train.augment`): each tile, with chance ``prob``,
    gets an illumination gain and spectral tilt, a haze offset (in the modality's units at 450 nm) on its
    optical modalities, and a calibration offset on its dB modalities; with ``band_gain`` / ``band_offset`` each
    optical band also gets its own calibration gain in 1 +- band_gain and offset in +- band_offset (modality
    units), as another sensor or processing baseline would. ``prob`` 0 turns it off."""

    prob: float = bounded(0.0, ge=0, le=1)
    gain: tuple[float, float] = (0.75, 1.1)
    tilt_per_1000nm: float = bounded(0.2, ge=0)
    haze_450nm: float = bounded(500.0, ge=0)
    db_offset: float = bounded(3.0, ge=0)
    band_gain: float = bounded(0.0, ge=0, lt=1)
    band_offset: float = bounded(0.0, ge=0)

    def __post_init__(self) -> None:
        check_bounds(self)
        if not 0 < self.gain[0] <= self.gain[1]:
            raise C2SegError("data.radiometric.gain must be [low, high] with 0 < low <= high")


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared tiles are (``c2seg data prep`` output) and how batches are drawn."""

    prep_dir: str
    batch_size: int = bounded(8, ge=1)  # per rank, per micro-step
    num_workers: int = bounded(0, ge=0)
    augment: bool = True
    batches_per_epoch: int = bounded(50, ge=1)  # per rank; an epoch is a fixed number of batches (equal on every rank)
    spec: str | None = None  # dataset spec YAML; default: the spec stored in the prep manifest
    # the cities trained on (labels) and adapted to; a test city is refused (train.data.select_cities)
    source_cities: tuple[str, ...] | None = None  # default: the spec's cities with role source
    target_cities: tuple[str, ...] | None = None  # default: the spec's cities with role target
    # the cities whose labelled val split finetune scores; default: the labelled target cities, else (no target
    # city has labels) the source cities whose val split holds tiles (source_val_fraction or a val split file)
    val_cities: tuple[str, ...] | None = None
    # pooled: every tile standardised with the statistics of all cities; per_city: with its own city's
    # statistics (removes per-city gain / offset shifts; the model then needs the statistics of any city it
    # is run on, which exported models carry for the prepared cities)
    normalization: Literal["pooled", "per_city"] = "pooled"
    radiometric: RadiometricConfig = field(default_factory=RadiometricConfig)  # training tiles only

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (torch implementation) with linear warmup then cosine decay."""

    lr: float = bounded(3e-4, ge=0)  # 0 is allowed: a run that only evaluates or checks what it loaded
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    warmup_steps: int = bounded(10, ge=0)
    min_lr_ratio: float = bounded(0.05, ge=0, le=1)
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The DeepSpeed engine. ``extra`` is merged last into the generated DeepSpeed JSON."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    precision: Precision = "fp32"
    gradient_accumulation_steps: int = bounded(1, ge=1)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.offload_params and self.zero_stage != 3:
            raise C2SegError("deepspeed.offload_params needs zero_stage 3")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow on rank 0. The URI comes from MLFLOW_TRACKING_URI (default: the local sqlite store)."""

    enabled: bool = True
    experiment: str = "c2seg"
    run_name: str | None = None
    log_every: int = bounded(1, ge=1)  # steps between MLflow metric logs
    progress_every: int = bounded(25, ge=1)  # steps between progress log lines when there is no terminal for a bar
    previews: int = bounded(4, ge=0)  # target prediction previews logged at each validation

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class PretrainConfig:
    """Masked multimodal reconstruction."""

    mask_ratio: float = bounded(0.75, gt=0, lt=1)
    full_modality_mask_prob: float = bounded(0.5, ge=0, le=1)  # chance that one whole modality is hidden
    decoder_dim: int = bounded(128, ge=1)
    decoder_depth: int = bounded(2, ge=1)
    decoder_heads: int = bounded(4, ge=1)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised loss on source labels plus mean-teacher adaptation on target train tiles."""

    dice_weight: float = bounded(0.0, ge=0)
    class_weights: dict[int, float] | None = None  # class id -> CE weight (others 1)
    adapt: bool = True
    ema_decay: float = bounded(0.99, ge=0, lt=1)
    pseudo_threshold: float | None = bounded(0.9, ge=0, le=1)  # None: pseudo_class_keep alone decides
    # mask: pixels that are not confident are ignored; fraction (DAFormer): every pixel keeps its
    # pseudo-label and the target loss of a tile is weighted by its fraction of confident pixels
    pseudo_weighting: Literal["mask", "fraction"] = "mask"
    # class-balanced selection (CBST): in each batch, the most confident pseudo_class_keep share of the pixels
    # predicted as each class also counts as confident, whatever pseudo_threshold says, so an uncalibrated early
    # teacher still teaches and no class is left out; None: pseudo_threshold alone decides
    pseudo_class_keep: float | None = bounded(None, gt=0, le=1)
    # class-balanced target loss: each pixel of the mixed target batch weighs (share of its label's class in the
    # batch) ** -pseudo_class_balance, normalised to a mean of 1, so the classes the teacher predicts most cannot
    # take over self-training while the rare ones fade (0: off; 1: every class weighs the same in total)
    pseudo_class_balance: float = bounded(0.0, ge=0, le=1)
    # partial domain adaptation: the classes the teacher predicts, at the first adaptation step (after an init_from
    # source model: that model's predictions), on less than this share of the target city's train pixels count as
    # absent from the target city; while adapting, their source pixels are ignored (so ClassMix never pastes them)
    # and the teacher never pseudo-labels them, so the student unlearns them instead of scattering them over the
    # target (None: every class is kept)
    target_class_min_share: float | None = bounded(None, ge=0, lt=1)
    adapt_weight: float = bounded(1.0, ge=0)
    # output-space adversarial alignment (train/models/critic.py): a critic learns to tell the student's source
    # softmax maps from its target ones (Adam at critic_lr, gradients averaged over ranks), and the student is
    # trained to fool it on target tiles with this weight (0: off; AdaptSegNet uses 0.001)
    adversarial_weight: float = bounded(0.0, ge=0)
    critic_lr: float = bounded(1e-4, gt=0)
    # masked image consistency (MIC): the student also sees the target tiles with mask_ratio of their
    # mask_block x mask_block px squares blanked and learns the teacher's pseudo-labels of the whole tiles there,
    # with this weight (0: off), so that it reads a pixel from its context as well as from its own spectrum
    masked_consistency: float = bounded(0.0, ge=0)
    mask_ratio: float = bounded(0.7, ge=0, lt=1)
    mask_block: int = bounded(8, ge=1)
    adapt_warmup_steps: int = bounded(0, ge=0)  # no target loss before this step
    # the model's per-pixel head (ModelConfig.pixel_head) at the start of a fresh run: zero, or fitted as a
    # logistic regression of (a uniform sample of at most pixel_fit_pixels of) the source cities' labelled
    # train pixels, so that training learns the context as a correction of it (train/pixel_fit.py)
    pixel_head_init: Literal["zero", "fit"] = "zero"
    pixel_fit_pixels: int = bounded(100_000, ge=1)
    mix: Literal["classmix", "none"] = "classmix"
    eval_every: int = bounded(50, ge=1)
    eval_batches: int | None = bounded(None, ge=1)  # per rank; None: the whole val split
    # keep the weights of the best val mIoU, the start of the run (step 0) included, in OUTPUT/best/ (early
    # stopping on val: on a small labelled set the context can overfit until the model is worse than its
    # fitted per-pixel head alone); `train export` then exports them
    keep_best: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.pseudo_threshold is None and self.pseudo_class_keep is None:
            raise C2SegError("finetune: set pseudo_threshold, pseudo_class_keep or both (which target pixels "
                             "get pseudo-labels)")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (pretrain or finetune)."""

    model: str  # configs/models/NAME.yaml
    data: DataConfig
    output_dir: str
    steps: int = bounded(ge=1)
    seed: int = 0
    init_from: str | None = None  # a run dir or weights file: a pretrain run's backbone, a finetune run's whole model
    checkpoint_every: int = bounded(50, ge=1)
    keep_checkpoints: int = bounded(2, ge=1)
    # seconds a rank waits in a collective (and at the rendezvous) for the others: a peer that hangs silently
    # (a frozen node, a partitioned network) fails the job after this instead of holding it until its time
    # limit; a peer that dies fails it at once (connection reset). Longer than the slowest step and checkpoint.
    collective_timeout_s: float = bounded(600.0, gt=0)
    # torch.compile the model's forward (in place: weight names stay the same). On an H100, `large` in bf16
    # trains about 20 % faster (benchmarks/bench_gpu.py); the first steps are slower while it compiles.
    compile: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        check_bounds(self)


def load_model_config(path: str | Path) -> ModelConfig:
    """Read configs/models/NAME.yaml."""
    return load_config(ModelConfig, path)


def model_config_from_dict(data: dict, source: str = "<model config>") -> ModelConfig:
    return from_dict(ModelConfig, data, source=source)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read configs/train/NAME.yaml with ``--set key=value`` overrides; the model file must exist."""
    cfg = load_config(TrainConfig, path, overrides)
    if not Path(cfg.model).is_file():
        raise ConfigError(f"{path}: model config '{cfg.model}' not found")
    return cfg


__all__ = ["ModelConfig", "RadiometricConfig", "DataConfig", "OptimConfig", "DeepSpeedConfig", "TrackingConfig",
           "PretrainConfig", "FinetuneConfig", "TrainConfig", "load_model_config", "load_train_config",
           "model_config_from_dict"]
