"""Typed recipes: dataclasses loaded from YAML, with ``section.field=value`` overrides."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from .errors import PatchnetError
from .recipe_detector import DetectorConfig, detector_problem

VOC_CLASSES = (  # noqa: SIM905  (one line of names reads better than twenty of one each)
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person pottedplant "
    "sheep sofa train tvmonitor"
).split()
# The paper lists these nine values of lambda (its text says "eight scales").
PAPER_SCALES = [1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0]
Pooling = Literal["power", "max", "lse", "topk"]
Format = Literal["voc", "coco", "demo", "folder", "csv"]
Supervision = Literal["boxes", "images", "both"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
TrunkPrecision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
Compress = Literal["none", "int8", "pca", "pca_int8"]
POOLINGS = typing.get_args(Pooling)
PILLOW_LIMIT = 2 * 89_478_485  # Pillow refuses more (twice its MAX_IMAGE_PIXELS) as decompression bombs
MAX_PIXELS = 50_000_000  # default data.max_pixels: a 48 MP phone photo passes, a 100 MP panorama does not


class RecipeError(PatchnetError, ValueError):
    """A recipe file or override that cannot be used as given."""


@dataclass
class DataConfig:
    # voc | coco | demo | folder (root/<split>/<class>/*.jpg; split "." = root/<class>/) | csv (root/<split>.csv)
    format: Format = "voc"
    root: str = ""  # VOC: VOCdevkit/VOC20xx; COCO: folder with annotations/ and images
    train_split: str = "trainval"
    val_split: str = "test"  # reported after training, never used to choose a checkpoint; "" = none
    select_split: str = ""  # a split to choose best.pt on; "" = train.holdout of the training images
    # > 0: the data has no val split; val_split names this share of train_split's images, drawn by a hash
    # of each image id per class (the same images every run) and never trained on
    val_from_train: float = 0.0
    classes: list[str] = field(default_factory=lambda: list(VOC_CLASSES))  # coco, folder, csv: [] = all found
    boxes: bool = True  # false: read image-level labels only (VOC/COCO boxes are ignored)
    limit: int = 0  # use only the first N images of each split (0: all), for quick checks
    max_pixels: int = MAX_PIXELS  # larger images are skipped (counted) before decoding; at most Pillow's 178956970
    # coco: the annotation file, from data.root ({split} is replaced), e.g. {split}/_annotations.coco.json
    annotations: str = ""
    images: str = ""  # coco: the image folder, from data.root ({split} is replaced); "" = beside the annotation file


@dataclass
class PatchConfig:
    scales: list[float] = field(default_factory=lambda: list(PAPER_SCALES))
    step: float = 1 / 3  # grid step as a fraction of the patch side
    mode: Literal["exact", "shared", "whole"] = "shared"  # exact (the paper's crops) | shared (trunk passes) | whole
    levels: list[float] = field(default_factory=list)  # shared: pyramid levels; [] = one per scale
    max_side: int = 1600  # shared: cap on the long side of a rescaled image (memory bound)
    exact_up_to: float = 0.0  # shared: scales <= this are cropped and run alone, as in exact mode (0: none)


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | random (tests) | path to a state_dict file
    input_size: int = 0  # 0: the backbone's own
    layer: str = ""  # alexnet/vgg16: fc6 or fc7 (the default); others: the pooled penultimate feature
    channels_last: bool = True
    precision: TrunkPrecision = "auto"  # auto | fp32 | bf16 | fp16 | int8 (Lite trunks on CPUs)
    int8_images: int = 16  # int8: training images (all their pyramid levels) the activation ranges are calibrated on


@dataclass
class HeadConfig:
    hidden: int = 2048
    dropout: float = 0.5
    members: int = 1  # an ensemble of this many heads, each trained by its own loss; images get their mean softmax


@dataclass
class PoolConfig:
    """How patch scores become image scores (patchnet.head.pooling); every family's parameters live here."""

    name: Pooling = "power"  # power | max | lse | topk
    k: float = 5.0  # power: (1/M) sum y(c|P)^k over the softmax outputs
    r: float = 5.0  # lse: temperature of (1/r) log mean exp(r e) over the evidence
    top: float = 0.1  # topk: fraction of the highest-evidence patches averaged ...
    bottom: float = 0.1  # ... plus alpha times the mean of this fraction of the lowest
    alpha: float = 0.7


@dataclass
class TrainConfig:
    supervision: Supervision = "boxes"  # boxes (patch labels) | images (image labels) | both (the sum of the losses)
    image_weight: float = 1.0  # both: weight of the image loss against the patch loss
    image_batch: int = 8  # images / both: whole images per step (all their patches in one forward pass)
    image_patches: float = 1.0  # images / both: share of each image's patches (redrawn each epoch) the image loss pools
    multilabel: bool = False  # boxes / both: keep patches that match objects of several classes, with a sigmoid loss
    holdout: float = 0.1  # fraction of the training images held out (fixed by the seed) to choose best.pt on
    precision: Precision = "auto"  # the head's autocast: auto (bf16 on CUDA and CPUs with native bf16) | fp32 | ...
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["step", "plateau"] = "step"  # step | plateau
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.875])  # fractions of epochs
    plateau_patience: int = 2
    max_decays: int = 3
    bg_rate: float = 0.1  # fraction of background patches redrawn each epoch
    detector: Literal["none", "mil"] = "none"  # mil: also train a detection head (the detector section)
    unlock: int = 0  # also train the trunk's last N stages (EfficientNet-Lite; 1: its head conv); 0: the head alone
    unlock_lr: float = 0.1  # learning rate of the unlocked stages, as a fraction of train.lr
    seed: int = 0
    eval_every: int = 1


@dataclass
class InferConfig:
    pool: Literal["", "power", "max", "lse", "topk"] = ""  # "": the model's own pool.name, or one of POOLINGS
    map_prior: float = 0.0  # score maps: pseudo-patches of the image's mean value added to each pixel's mean
    fuse: bool = False  # add a max-pool linear SVM's decision to the pooled score (weight chosen on held-out images)
    fuse_weights: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0])  # the SVM weights tried
    # localize: auto (mil with a detection head, else map) | mil | map (score map) | patch (top patch) | whole
    box_method: Literal["auto", "mil", "map", "patch", "whole"] = "auto"
    # localize, map: a region is the map above this fraction of the way from its minimum to its peak (0.4
    # chosen among 0.2-0.8 by CorLoc on held-out devtrain images, for voc07_dev and voc07_weak alike)
    box_threshold: float = 0.4


@dataclass
class CacheConfig:
    chunk: int = 32  # images per chunk file: a killed run loses at most one chunk of work
    # how patch features are stored (patchnet.store.codec; README, Feature cache): none (fp16) | int8 (8-bit codes
    # per row) | pca (fp16 projections on pca_dim principal components of the training split) | pca_int8
    compress: Compress = "none"
    pca_dim: int = 256  # pca, pca_int8: components kept; the head then reads pca_dim values per patch
    pca_images: int = 200  # pca, pca_int8: training images (fixed draw) whose patches the projection is fitted on


@dataclass
class RuntimeConfig:
    """Where and how a run executes. None of it changes the results, so ``--resume`` ignores it."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trunk_batch: int = 0  # patches per trunk call in exact mode; 0: 16 on CPU (faster than 64 there), 128 on CUDA
    workers: int = 2  # image-decoding worker processes (on a CPU device, at most the cores torch leaves free)
    threads: int = 0  # torch's threads; 0: chosen from the cores this process may use (patchnet/threads.py)
    cache_dir: str = ".cache/features"
    output: str = "checkpoints"  # runs go to <output>/<name>/
    heatmaps: int = 4  # selection images drawn to TensorBoard at each evaluation


@dataclass
class AugConfig:
    views: int = 0  # extra augmented views per training image (cached like the original)
    hflip: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    rotate: float = 10.0
    color: float = 0.2


@dataclass
class Recipe:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def infer_pool(self) -> str:
        """The pooling that scores images: ``infer.pool``, else the model's own."""
        return self.infer.pool or self.pool.name

    @property
    def run_dir(self) -> Path:
        return Path(self.runtime.output) / self.name

    def check_run_dir(self) -> Path:
        """``run_dir``, refused unless it lies inside ``runtime.output`` (a name may hold sub-folders, not ``..``)."""
        from .files import OutputPathError, check_inside

        if not self.name.strip() or "\0" in self.name or Path(self.name).is_absolute():
            raise RecipeError(f"name {self.name!r} must name a folder inside runtime.output ({self.runtime.output})")
        try:
            return check_inside(self.runtime.output, self.run_dir)
        except OutputPathError:
            raise RecipeError(
                f"name {self.name!r} would put the run outside runtime.output ({self.runtime.output}); "
                "choose a name without '..'"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Recipe:
        """Check every field against the others and against the backbone registry; returns the recipe."""
        self._check_backbone()
        self._check_data()
        self._check_patches()
        self._check_training()
        return self

    def _check_backbone(self) -> None:
        from .backbones import BackboneError, backbone_spec, check_layer, check_patch_mode, unlock_split

        try:  # names, layers, the modes a backbone can run and its stages come from the backbone registry
            spec = backbone_spec(self.backbone.name)
            check_layer(spec, self.backbone.layer)
            check_patch_mode(spec, self.patches.mode, self.backbone.input_size)
            if self.train.unlock:
                unlock_split(spec, self.train.unlock)
        except BackboneError as e:
            raise RecipeError(f"backbone: {e}") from None
        if self.backbone.precision == "int8" and (spec.family != "lite" or self.train.unlock):
            raise RecipeError(
                f"backbone.precision=int8 quantises a frozen EfficientNet-Lite trunk; got backbone.name="
                f"{self.backbone.name} with train.unlock={self.train.unlock}; use backbone.precision=auto, or "
                "efficientnet_lite0/1/2 with train.unlock=0"
            )
        if self.backbone.int8_images < 1:
            raise RecipeError(f"backbone.int8_images must be at least 1, got {self.backbone.int8_images}")
        if self.train.unlock_lr <= 0:
            raise RecipeError(f"train.unlock_lr must be positive (a fraction of train.lr), got {self.train.unlock_lr}")
        if self.train.unlock and self.cache.compress != "none":
            raise RecipeError(
                f"train.unlock caches fp16 maps below the unlocked stages, not patch features, so "
                f"cache.compress={self.cache.compress} has nothing to compress; set cache.compress: none"
            )
        problem = detector_problem(self.detector, self.cache.compress, self.train.unlock)
        if self.train.detector == "mil" and problem:
            raise RecipeError(problem)
        if self.cache.pca_dim < 1 or self.cache.pca_images < 1:
            raise RecipeError(
                f"cache.pca_dim and cache.pca_images must be at least 1, got {self.cache.pca_dim} "
                f"and {self.cache.pca_images}"
            )

    def _check_data(self) -> None:
        d = self.data
        if not 0.0 <= d.val_from_train < 1.0:
            raise RecipeError(f"data.val_from_train must lie in [0, 1), got {d.val_from_train}")
        if d.val_from_train and (not d.val_split or d.val_split == d.train_split):
            raise RecipeError(
                f"data.val_from_train={d.val_from_train} holds out a val split from data.train_split, so "
                f"data.val_split must name it, other than the training split (e.g. val); got {d.val_split!r}"
            )

    def _check_patches(self) -> None:
        if not 0 < self.data.max_pixels <= PILLOW_LIMIT:
            raise RecipeError(
                f"data.max_pixels must lie in (0, {PILLOW_LIMIT}] (Pillow refuses larger images as "
                f"decompression bombs), got {self.data.max_pixels}"
            )
        if not self.patches.scales or min(self.patches.scales) < 1.0:
            raise RecipeError(f"patches.scales must be a non-empty list of values >= 1, got {self.patches.scales}")
        if not 0.0 < self.patches.step <= 0.5:
            raise RecipeError(
                f"patches.step must lie in (0, 0.5] so that neighbours overlap by at least 50%, got {self.patches.step}"
            )
        if self.patches.exact_up_to and (self.patches.exact_up_to < 1.0 or self.patches.mode != "shared"):
            raise RecipeError(
                f"patches.exact_up_to applies to shared mode and must be 0 (off) or a scale >= 1; "
                f"got {self.patches.exact_up_to} with patches.mode={self.patches.mode}"
            )
        p = self.pool
        if p.k <= 0 or p.r <= 0 or not 0 < p.top <= 1 or not 0 <= p.bottom <= 1:
            raise RecipeError(f"pool needs k > 0, r > 0, top in (0, 1] and bottom in [0, 1]; got {p}")
        if not self.infer.fuse_weights or min(self.infer.fuse_weights) < 0:
            raise RecipeError(f"infer.fuse_weights must list weights >= 0, got {self.infer.fuse_weights}")

    def _check_training(self) -> None:
        t = self.train
        if not 0.0 <= t.bg_rate <= 1.0:
            raise RecipeError(f"train.bg_rate must lie in [0, 1], got {t.bg_rate}")
        if not 0.0 < t.image_patches <= 1.0:
            raise RecipeError(
                f"train.image_patches must lie in (0, 1] (the share of each image's patches the image loss sees), "
                f"got {t.image_patches}"
            )
        if t.supervision != "boxes" and self.pool.name == "power":
            raise RecipeError(
                f"train.supervision={t.supervision} trains through the pooling, and pool.name=power "
                "scores images at inference only; set pool.name to max, lse or topk "
                "(and infer.pool=power to score with the power-k mean)"
            )
        if t.supervision != "images" and not self.data.boxes:
            raise RecipeError(
                f"train.supervision={t.supervision} needs boxes, but data.boxes is false; "
                "use train.supervision=images to learn from image labels alone"
            )
        if not 0.0 <= t.holdout < 1.0:
            raise RecipeError(f"train.holdout must lie in [0, 1), got {t.holdout}")
        if t.image_batch < 1 or t.image_weight < 0:
            raise RecipeError("train.image_batch must be at least 1 and train.image_weight non-negative")
        if not 0.0 <= self.head.dropout < 1.0:
            raise RecipeError(f"head.dropout must lie in [0, 1), got {self.head.dropout}")
        if self.head.members < 1 or self.head.hidden < 1:
            raise RecipeError(
                f"head.members and head.hidden must be at least 1, got {self.head.members} and {self.head.hidden}"
            )
        if self.head.members > 1 and t.unlock:
            raise RecipeError(
                f"head.members={self.head.members} with train.unlock={t.unlock}: the unlocked stages train with one "
                "head; set head.members=1 or train.unlock=0"
            )
        if t.epochs < 1 or t.batch_size < 1 or self.runtime.threads < 0:
            raise RecipeError("train.epochs and train.batch_size must be at least 1, runtime.threads at least 0")

    def underfit_warnings(self) -> list[str]:
        """Settings that are valid but known to underfit, each a sentence naming the fix."""
        t, out = self.train, []
        if t.supervision == "images" and not 0.002 <= t.lr <= 0.05:
            out.append(
                f"train.supervision=images at train.lr={t.lr:g}: the image loss (summed over classes) was measured "
                "at lr 0.01 (89.2 devval mAP) and underfits at 1/20 of it (72.6); recipes written when it was "
                "averaged used lr 0.3, 30 times too large now; use train.lr=0.01"
            )
        return out


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # a choice: the message lists the accepted values
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(
                f"{key} must be one of {', '.join(repr(a) if a == '' else str(a) for a in allowed)}; got {value!r}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, got {value!r}")
        return _build(cast(type, tp), value, key + ".")  # an annotation: a dataclass type, not an instance
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and value is None:
        return ""
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise RecipeError(f"{key} must be of type {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names), key=str)
    if unknown:
        raise _unknown_keys(prefix, unknown, names, values)
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _unknown_keys(prefix: str, unknown: list, names: list[str], values: dict[str, Any]) -> RecipeError:
    """Unknown keys of a section (a mapping: a section), each with the valid key closest to it if one is close."""
    one = len(unknown) == 1
    close = [(u, difflib.get_close_matches(str(u), names, n=1, cutoff=0.7)) for u in unknown]
    guess = ", ".join(f"{prefix}{m[0]}" + ("" if one else f" for {prefix}{u}") for u, m in close if m)
    what = "section" if one and isinstance(values[unknown[0]], dict) else "key" if one else "keys"
    return RecipeError(
        f"unknown recipe {what} {', '.join(prefix + str(u) for u in unknown)}"
        f"{f'; did you mean {guess}?' if guess else ';'} valid keys here: {', '.join(prefix + n for n in names)}"
    )


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like section.field=value, e.g. train.lr=0.001")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", "") or e).strip()
            raise RecipeError(
                f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); write lists as "
                "[1, 2], and quote strings that hold ':', '[' or '{', e.g. "
                f"{key.strip()}='\"text\"'"
            ) from None
    return values


# Keys of older recipes and where they live now.
_MOVED = {
    ("infer", "k"): ("pool", "k"),
    ("backbone", "device"): ("runtime", "device"),
    ("backbone", "batch_size"): ("runtime", "trunk_batch"),
    ("train", "num_workers"): ("runtime", "workers"),
    ("train", "heatmaps"): ("runtime", "heatmaps"),
    ("cache", "dir"): ("runtime", "cache_dir"),
}


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    """Move the keys of older recipes (and checkpoints) to their current sections."""
    for (sec, key), (new_sec, new_key) in _MOVED.items():
        old = values.get(sec)
        if isinstance(old, dict) and key in old:
            values.setdefault(new_sec, {})[new_key] = old.pop(key)
    if "output" in values:
        values.setdefault("runtime", {})["output"] = values.pop("output")
    return values


def recipe_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    values = _migrate(apply_overrides(copy.deepcopy(values), list(overrides or [])))
    return _build(Recipe, values).validate()


def merge_values(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_values(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's values, on top of its ``base:`` file (a path relative to it) when it names one."""
    if not path.is_file():
        where = f" (the base of {chain[-1]})" if chain else ""
        raise RecipeError(f"recipe file {path}{where} does not exist; the shipped recipes are in recipes/")
    if path.resolve() in chain:
        raise RecipeError(f"recipe file {path}: its base: chain loops back to itself")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping of sections")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise RecipeError(f"recipe file {path}: base must be the path of another recipe file, got {base!r}")
    return merge_values(read_values(path.parent / base, (*chain, path.resolve())), values)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe (on top of its ``base:``), apply overrides and validate every field; an error names
    the file, or the override (``--set key=value``, as the command line takes it) it comes from."""
    path = Path(path)
    values = read_values(path)
    try:
        return recipe_from_dict(values, overrides)
    except RecipeError as e:
        raise RecipeError(f"{_culprit(values, list(overrides or [])) or path}: {e}") from None


def _culprit(values: dict[str, Any], overrides: list[str]) -> str | None:
    """What a recipe's error comes from: None (the file), the first override that brings a bad key or value in,
    or all of them where the file alone is valid."""
    try:
        alone = _build(Recipe, _migrate(copy.deepcopy(values)))
    except RecipeError:
        return None
    for n, item in enumerate(overrides, 1):
        try:
            _build(Recipe, _migrate(apply_overrides(copy.deepcopy(values), overrides[:n])))
        except RecipeError:
            return f"--set {item}"
    try:
        alone.validate()
    except RecipeError:
        return None
    return " ".join(f"--set {o}" for o in overrides) or None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    from .files import atomic_write

    atomic_write(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
