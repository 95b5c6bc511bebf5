"""Typed run configuration: dataclass defaults, overlaid by a YAML file, then by dotted CLI overrides.

Configs are data: every job resolves one `Config`, and the resolved, flattened form is what gets
logged to MLflow, so a run can always be reproduced from its params.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the offending key."""


@dataclass
class PathsConfig:
    """Where a run keeps its files. Everything defaults under one local folder."""

    root: str = "abpipe_runs"

    def under(self, *parts: str) -> str:
        return str(Path(self.root, *parts))


@dataclass
class RayConfig:
    address: str | None = None  # None: start (or join) a local Ray instance
    num_cpus: int | None = None  # only for a local instance
    temp_dir: str | None = None  # default: /tmp/abpipe-ray


@dataclass
class IngestConfig:
    source: str = "image_folder"  # image_folder | files
    input: str = ""  # folder (image_folder) or text file with one path per line (files)
    output: str = ""  # shard directory; default <paths.root>/shards/<source>
    max_side: int = 384  # longest side after ingest; images are re-encoded at most once
    min_side: int = 8  # smaller images are skipped (reason: too_small)
    samples_per_shard: int = 1000
    jpeg_quality: int = 90


@dataclass
class ViewsConfig:
    """The multi-view crop stage (AB's source/target crops and SimCLR annotation views)."""

    num_views: int = 4  # M: all M^2 (source, target) pairs are used
    view_size: int = 224
    scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment_views: bool = False  # ablation: colour jitter / flip on the propagation crops
    annotation_views: int = 2  # SimCLR: two augmented views per image
    annotation_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = 1.0  # strength s of SimCLR's colour distortion (SimCLR's ImageNet value)
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    batch_size: int = 64  # rows per Ray Data map_batches call
    concurrency: int | None = None  # max crop actors; None = cluster CPUs - 1
    cpus_per_actor: float = 1.0


@dataclass
class DataConfig:
    shards: str = ""  # shard directory to train on; default <paths.root>/shards/image_folder
    shuffle_buffer: int = 256  # local shuffle buffer (rows) in the trainer's iterator
    read_cpus: float = 0.25  # per shard-read task: reading is I/O, and must not starve the crop actors


@dataclass
class ModelConfig:
    encoder: str = "vit_small_patch16_224"  # any timm ViT name
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. img_size, embed_dim, depth
    decoder_depth: int = 2
    decoder_heads: int = 6
    action_embedding: str = "fourier"  # fourier | learned
    fourier_bands: int = 16
    learned_action_bins: int = 32
    proj_dim: int = 256
    proj_hidden_dim: int = 1024


@dataclass
class ObjectiveConfig:
    name: str = "ab_simclr"
    temperature: float = 0.1
    annotation_weight: float = 1.0
    propagation_weight: float = 1.0
    ema_start: float = 0.004  # EMA rate tau, cosine-decayed to ema_end over the run
    ema_end: float = 0.0
    null_actions: bool = False  # ablation: action tokens carry no box


@dataclass
class TrainConfig:
    total_views: int = 800_000_000  # budget in seen views (each crop counts once)
    batch_size: int = 64  # images per worker per step
    lr: float = 1e-3  # peak lr for a global batch of 256 images (scaled linearly)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    run_name: str = "pretrain"
    storage_path: str = ""  # Ray Train storage; default <paths.root>/ray_results
    max_failures: int = 0


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # default sqlite:///<paths.root>/mlflow.db
    experiment: str = "abpipe"
    log_checkpoints: bool = True  # checkpoint weights as MLflow artifacts


@dataclass
class EvalConfig:
    checkpoint: str = ""  # checkpoint dir, or an MLflow run id of a pretraining run
    dataset: str = ""  # labelled image folder (class sub-folders)
    test_fraction: float = 0.3
    image_size: int = 0  # 0: the checkpoint's views.view_size (its ViT's input size)
    weights: str = "teacher"  # teacher (EMA) | student
    use_gpu: bool = False
    batch_size: int = 128
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_epochs: int = 500
    linear_lr: float = 1e-2
    linear_weight_decay: float = 1e-4
    probes: list[str] = field(default_factory=lambda: ["knn", "linear"])
    seed: int = 0


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def resolved(self) -> "Config":
        """Fill the path defaults that depend on `paths.root` (absolute, so Ray workers agree)."""
        cfg = dataclasses.replace(self)
        root = os.path.abspath(cfg.paths.root)
        cfg.paths = PathsConfig(root=root)
        if not cfg.ingest.output:
            cfg.ingest = dataclasses.replace(cfg.ingest, output=os.path.join(root, "shards", cfg.ingest.source))
        if not cfg.data.shards:
            cfg.data = dataclasses.replace(cfg.data, shards=os.path.join(root, "shards", "image_folder"))
        if not cfg.train.storage_path:
            cfg.train = dataclasses.replace(cfg.train, storage_path=os.path.join(root, "ray_results"))
        if not cfg.tracking.tracking_uri:
            cfg.tracking = dataclasses.replace(cfg.tracking, tracking_uri=f"sqlite:///{os.path.join(root, 'mlflow.db')}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form logged as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and prefix.count(".") < 1:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def _coerce(value: Any, target_type: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field's declared type, or fail naming the key."""
    type_str = str(target_type)
    if value is None:
        if "None" in type_str:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {type_str})")
    try:
        if type_str.startswith("tuple"):
            seq = list(value)
            return tuple(float(v) for v in seq)
        if type_str.startswith("list"):
            return list(value) if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        if type_str.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError("expected a mapping")
            return dict(value)
        if type_str.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise TypeError("expected a boolean")
        if type_str.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise TypeError("expected an integer")
            return int(value)
        if type_str.startswith("float"):
            return float(value)
        if type_str.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot use {value!r} ({exc}); expected {type_str}") from None
    return value


def _apply(section: Any, updates: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section)}
    changes = {}
    for key, value in updates.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'; known: {', '.join(sorted(fields))}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' is a section; give a mapping")
            changes[key] = _apply(current, value, dotted)
        else:
            changes[key] = _coerce(value, fields[key].type, dotted)
    return dataclasses.replace(section, **changes)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """['train.lr=1e-3', 'views.scale=[0.2,1]'] -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides; unknown keys are an error, not a silent no-op."""
    cfg = Config()
    if path:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        cfg = _apply(cfg, data, "")
    if overrides:
        cfg = _apply(cfg, parse_overrides(overrides), "")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy stored in a checkpoint)."""
    return _apply(Config(), data, "")
