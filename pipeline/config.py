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


class InputError(ValueError):
    """An input (file, folder, dataset) that cannot be used as given; the message names it."""


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
    dashboard: bool = False  # local instance: start the Ray dashboard (http://127.0.0.1:8265)
    dashboard_host: str = "127.0.0.1"  # loopback only; reach a cluster's dashboard through an SSH tunnel


@dataclass
class UrlIngestConfig:
    """`ingest.source: cc12m` (any url+caption TSV/CSV/parquet): img2dataset's download settings.

    Sizes come from `ingest.*`: max_side (img2dataset resizes the longest side), min_side (its
    min_image_size), samples_per_shard, jpeg_quality.
    """

    url_col: str = "url"
    caption_col: str = "caption"  # "" for a list without captions
    columns: list[str] = field(default_factory=list)  # names for a headerless TSV/CSV: [url, caption] for cc12m.tsv
    input_format: str = ""  # tsv | csv | parquet | jsonl | txt (one URL a line); "" = from the extension (.gz ok)
    distributor: str = "multiprocessing"  # multiprocessing (this machine) | ray (one task per shard on the cluster)
    processes: int = 2  # multiprocessing: download processes; also the threads that normalise finished shards
    threads: int = 32  # download threads per process
    retries: int = 2  # extra attempts per URL after a failed download
    timeout: float = 10.0  # seconds per request (connect, and each read)
    user_agent_token: str = "abpipe"  # sent in the User-Agent; X-Robots-Tag "abpipe: noai" opts out of us alone
    # [] honours none
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    max_shard_retry: int = 1  # multiprocessing: re-runs of a shard whose worker died
    keep_raw: bool = False  # keep img2dataset's own tars after normalising (they double the disk use)


@dataclass
class CocoIngestConfig:
    """`ingest.source: coco`: `ingest.input` is the images dir; annotations come from these jsons."""

    instances: str = ""  # instances_*.json
    captions: str = ""  # optional captions_*.json
    include_crowd: bool = False  # keep iscrowd=1 boxes (counted boxes_kept_crowd) instead of dropping them
    min_box_side: float = 1.0  # boxes narrower/shorter than this after clipping (json pixels) are degenerate


@dataclass
class EpicIngestConfig:
    """`ingest.source: epic_kitchens`: `ingest.input` is a videos dir or an rgb_frames dir."""

    annotations_csv: str = ""  # EPIC_100_train.csv (optional: frames then carry no action)
    frame_stride: int = 30  # every Nth frame, starting at frame 1
    layout: str = (
        "videos"  # videos (<input>/P01/videos/P01_01.MP4) | rgb_frames (<input>/P01/rgb_frames/P01_01.tar or P01_01/)
    )
    visor_json: str = ""  # VISOR sparse annotations: one json, or a folder of per-video jsons
    visor_frame_mapping: str = (
        ""  # VISOR's frame_mapping.json (VISOR frame name -> rgb_frames name); empty: same numbers
    )
    visor_width: int = 1920  # the pixel frame VISOR polygons are drawn in
    visor_height: int = 1080


@dataclass
class IngestConfig:
    source: str = "image_folder"  # image_folder | files | cc12m | coco | epic_kitchens
    input: str = ""  # folder (image_folder) or text file with one path per line (files)
    output: str = ""  # shard directory; default <paths.root>/shards/<source>
    max_side: int = 384  # longest side after ingest; images are re-encoded at most once
    min_side: int = 8  # smaller images are skipped (reason: too_small)
    samples_per_shard: int = 1000
    jpeg_quality: int = 90
    # image_folder / files: a seeded permutation of the listing before it is cut into shards, so no shard holds
    # one class (a folder listing is sorted by class, and the trainer's shuffle buffer mixes only nearby rows)
    shuffle: bool = True
    shuffle_seed: int = 0
    cc12m: UrlIngestConfig = field(default_factory=UrlIngestConfig)
    coco: CocoIngestConfig = field(default_factory=CocoIngestConfig)
    epic: EpicIngestConfig = field(default_factory=EpicIngestConfig)


@dataclass
class TextViewsConfig:
    """Text annotations cut by the crop stage into a `tokens` column (CLIP, SLIP, AB_CLIP).

    They pair with the annotation views, so they are emitted (and required) only when
    `views.annotation_views` > 0: the propagation-crop stream of a decoupled run never needs text.
    One string per image per epoch, chosen with the crops' seeding, tokenised on the CPU actor by
    open_clip's bundled tokenizer. Samples without the text are skipped and counted
    (`no_caption`, `no_boxes`, `bad_annotation`).
    """

    source: str = (
        "none"  # none | captions (json `captions`, else the `txt` member) | boxes (json `boxes` + `labels` as text)
    )
    tokenizer: str = "ViT-S-16"  # open_clip model name whose bundled (offline) tokenizer is used
    context_length: int = 77  # token ids per string (CLIP: 77); the text tower is built for this length
    box_format: str = "names"  # boxes: names ("2 person, dog") | names_boxes ("person 12 40 88 95, dog ...")
    box_bins: int = 100  # names_boxes: box corners quantised to this many bins of the image's [0, 1] frame
    max_objects: int = 20  # boxes: only the largest objects (by box area) are written


@dataclass
class ViewsConfig:
    """The multi-view crop stage (AB's source/target crops and SimCLR annotation views)."""

    num_views: int = 4  # M: all M^2 (source, target) pairs are used
    view_size: int = 224
    scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment_views: bool = False  # ablation: colour jitter / flip on the propagation crops
    pair_sampling: str = "iid"  # iid | near | far: Fig. 3's crop-distance control (pipeline/data/pair_sampling.py)
    pair_pool: int = 4  # near/far: draw pair_pool * num_views boxes, keep one IoU-grouped set of num_views
    annotation_views: int = 2  # SimCLR: two augmented views per image
    annotation_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = 1.0  # strength s of SimCLR's colour distortion (SimCLR's ImageNet value)
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    local_views: int = 0  # DINO multi-crop: small SimCLR-augmented views per image (`local_views` column); 0 = none
    local_size: int = 96  # their side in px (DINO: 96 next to 224 px global views)
    local_scale: tuple[float, float] = (0.05, 0.4)  # their RandomResizedCrop area fraction (DINO's local_crops_scale)
    batch_size: int = 64  # rows per Ray Data map_batches call
    concurrency: int | None = None  # max crop actors; None = cluster CPUs - 1
    cpus_per_actor: float = 1.0
    # Where crop actors may run: custom resources each actor takes (e.g. {crop_node: 0.01} with CPU-only
    # nodes started with --resources '{"crop_node": 1000}') and/or node labels it needs (Ray's label
    # selectors, e.g. {node-group: crop}); empty = anywhere with free CPUs (docs/operations.md).
    resources: dict[str, float] = field(default_factory=dict)
    label_selector: dict[str, str] = field(default_factory=dict)
    text: TextViewsConfig = field(default_factory=TextViewsConfig)  # text annotations (`tokens` column)


@dataclass
class DataConfig:
    """What the trainer streams. By default one shard set gives both the propagation crops and the
    annotations (coupled, as in AB_SimCLR on ImageNet). Naming `annotation_shards` decouples them
    (the paper's AB_{I1K+D}): annotations from one dataset, propagation crops from another. Either
    stream may be a weighted mixture of shard sets instead."""

    shards: str = ""  # shard directory to train on; default <paths.root>/shards/image_folder
    mixture: dict[str, float] = field(default_factory=dict)  # {shard dir: weight}; replaces `shards` when set
    annotation_shards: str = ""  # "" = annotations come from the same images as the crops
    annotation_mixture: dict[str, float] = field(default_factory=dict)  # {shard dir: weight} for the annotation stream

    @property
    def decoupled(self) -> bool:
        """True when annotations stream from their own shard set(s) (AB_{I1K+D})."""
        return bool(self.annotation_shards or self.annotation_mixture)

    shuffle_buffer: int = 256  # local shuffle buffer (rows) in the trainer's iterator
    read_cpus: float = 0.25  # per shard-read task: reading is I/O, and must not starve the crop actors
    # Concurrent shard-read tasks per stream; None = one per 8 crop actors. Each starts a worker
    # process when the stream starts, beside the crop actors: more than the reads need only slows
    # the start-up (raise it for object storage, where one task reads slower than local disk).
    read_concurrency: int | None = None
    # Passes over the data one Ray Data execution streams (the training budget's worth, at most this
    # many): Ray Data starts a new crop-actor pool per execution, so 1 = an actor start-up per epoch.
    max_passes_per_execution: int = 16
    # Rows in one order a resumed run continues batch for batch (Ray Data's preserve_order, no local
    # shuffle): for reproducing a run exactly; costs throughput (docs/training.md, "Resume").
    deterministic: bool = False


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
    # CLIP/SLIP/AB_CLIP: the open_clip config whose text tower is built, randomly initialised
    # (ViT-S-16: 12 layers, width 384)
    text_model: str = "ViT-S-16"
    # overrides of its text_cfg (width, heads, layers); context length = views.text.context_length
    text_kwargs: dict[str, Any] = field(default_factory=dict)
    # activation checkpointing of every transformer block (ViT encoder, action decoder, text tower): the blocks'
    # activations are recomputed in the backward pass instead of stored. Same gradients, less memory, more compute.
    grad_checkpointing: bool = False


@dataclass
class DinoConfig:
    """`objective.name: dino` / `silc` (Caron et al. 2021, main_dino.py; ViT-S/16 100-epoch recipe).

    The teacher's EMA momentum 0.996 -> 1 (cosine) is `objective.ema_start: 0.004` -> `ema_end: 0`.
    """

    out_dim: int = 65536  # K prototypes (DINO ViT-S: 65536)
    hidden_dim: int = 2048  # 3-layer MLP head: dim -> 2048 -> 2048 -> bottleneck
    bottleneck_dim: int = 256  # l2-normalised before the weight-normed last layer
    head_layers: int = 3
    norm_last_layer: bool = True  # freeze the last layer's weight-norm g at 1 (stabler; DINO used False for ViT-S)
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after warm-up (DINO ViT-S/16: 0.07; its default 0.04)
    warmup_teacher_temp: float = 0.04  # linear warm-up start
    teacher_temp_warmup_fraction: float = 0.3  # of the run (DINO: 30 of 100 epochs)
    center_momentum: float = 0.9  # running mean of the teacher output, subtracted before its softmax
    freeze_last_layer_fraction: float = 0.01  # last layer gets no gradient for this fraction (DINO: 1 of 100 epochs)


@dataclass
class MaeConfig:
    """`objective.name: mae` (He et al. 2022 as used by MAWS, Singh et al. 2023, Table 10)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512  # light decoder: 8 blocks, 512 wide, 16 heads (MAE / MAWS appendix A)
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # target pixels normalised by each patch's own mean / std


@dataclass
class ClipConfig:
    """`objective.name: clip` / `slip` / `ab_clip`: image-text contrastive settings.

    CLIP (Radford et al. 2021): a learnable logit scale exp(s), initialised to 1/0.07 and clipped at
    100. SLIP (Mu et al. 2021): loss = CLIP + ssl_weight * SimCLR, SimCLR's tau = objective.temperature
    (SLIP: ssl_scale 1.0, ssl_temp 0.1).
    """

    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    ssl_weight: float = 1.0


@dataclass
class ObjectiveConfig:
    name: str = "ab_simclr"
    temperature: float = 0.1
    annotation_weight: float = 1.0
    propagation_weight: float = 1.0
    ema_start: float = 0.004  # EMA rate tau, cosine-decayed to ema_end over the run
    # Short runs: tau at step 0 is raised so the teacher's horizon (1/tau steps) is at most this fraction of the run
    # (pipeline.schedules.ema_start_for_run); 0 = ema_start as given. No effect on runs of >= 1/(0.004*h) steps.
    ema_horizon: float = 1 / 15
    ema_end: float = 0.0
    null_actions: bool = False  # ablation: action tokens carry no box
    # True: the propagation loss scores against detached student annotation embeddings (psi-bar frozen in Eq. 4);
    # False (the paper: psi-bar is among the trained parameters) lets it train them too.
    detach_annotations: bool = False
    propagation_warmup: float = (
        0.0  # fraction of the run over which the propagation weight ramps 0 -> propagation_weight
    )
    teacher: str = "ema"  # ema | student (ablation "no target network": the student makes its own targets)
    dino: DinoConfig = field(default_factory=DinoConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)  # clip / slip / ab_clip


@dataclass
class OnlineProbeConfig:
    """`train.online_probe`: a readout of the student's pooled features on a small labelled set, refit
    every `every_steps` on rank 0 and logged as `online/*` (pipeline/train/online_probe.py). Off when
    `root` is empty. It never touches the pretraining gradients or random streams."""

    root: str = ""  # labelled folder: <root>/train/<class>/*, <root>/val|test/<class>/*, or <root>/<class>/* (70/30)
    every_steps: int = 100  # refit and log every this many steps, and at the last step
    max_per_class: int = 50  # images per class and split, a seeded choice
    knn_k: int = 20
    ridge: float = 1e-2  # the linear readout: ridge regression onto one-hot labels, this penalty


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
    num_workers: int = 1  # Ray Train workers; 0: the loop runs in the driver process (docs/training.md#driver-mode)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # torch's intra-op threads per CPU worker; 0: int(cpus_per_worker). More than the reservation helps only in a
    # steady state where the data stage leaves its cores idle (docs/training.md#the-demo-recipe)
    threads_per_worker: int = 0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra custom resources per training worker
    checkpoint_every_steps: int = 500
    # > 0: checkpoint every this fraction of the run's steps instead (0.1: ten checkpoints, a learning curve
    # inside the run for `abpipe sweep`); each is an MLflow artifact, keep_checkpoints bounds only Ray's copies
    checkpoint_fraction: float = 0.0
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    run_name: str = "pretrain"
    storage_path: str = ""  # Ray Train storage; default <paths.root>/ray_results
    max_failures: int = 0
    init_from: str = (
        ""  # MAWS stage: checkpoint dir | runs:/<id>/<dir> | MLflow run id whose encoder initialises this run
    )
    init_weights: str = "teacher"  # which of init_from's encoders (teacher | student; the same for MAE)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)
    key_log: str = ""  # a folder: each worker writes the (pass, row) of every row it trains on, per step (audit)
    # auto: bf16 autocast on CUDA, fp32 on CPU | bf16: bf16 autocast (CPU too) | fp16: fp16 autocast + a GradScaler
    # (an overflowing step is skipped and counted as a bad step) | fp32: no autocast (docs/training.md)
    precision: str = "auto"
    compile: bool = False  # torch.compile the transformer blocks of the objective's encoders / decoders, in place
    # > 1: each step's forward/backward over this many equal sub-batches of batch_size (which it must divide), with
    # the whole batch's gradient (cached embeddings for the contrastive losses): less activation memory, same
    # batch, lr and budget; not dino / slip / silc (docs/training.md#gradient-accumulation)
    accum_steps: int = 1

    @property
    def world_size(self) -> int:
        """The training processes: `num_workers` Ray Train workers, or the driver alone (`num_workers=0`)."""
        return max(1, self.num_workers)


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # default sqlite:///<paths.root>/mlflow.db
    experiment: str = "abpipe"
    log_checkpoints: bool = True  # checkpoint weights as MLflow artifacts
    # A fresh run logs what the model sees (source images + crop boxes, crops, annotations); its end, learning curves.
    log_preview: bool = True
    preview_images: int = 8  # source images in that preview (the first of the first shard)


@dataclass
class ProbeConfig:
    """Trained probes (`decoder`, `attentive`): one set of settings for every method and task.

    Defaults are sized for CPU runs. The AB paper (appendix A.1) fixes a 4-layer autoregressive
    decoder cross-attending to the ViT's final tokens, one probe per task, and takes the rest from
    Beyer et al. (2023); `ProbeConfig.paper_scale()` is the GPU-scale preset (see docs/evaluation.md).
    """

    decoder_depth: int = 2  # paper: 4 (A.1)
    width: int = 128  # decoder / attentive-pool width; frozen tokens are projected to it
    heads: int = 4
    mlp_ratio: float = 4.0
    steps: int = 1000  # optimiser steps per probe (one probe per task); 400 left box probes at chance (docs/study.md)
    batch_size: int = 64  # images (classification, detection) or boxes (box_classification) per step
    lr: float = 1e-3  # AdamW peak lr, linear warmup then cosine to 0
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    coord_bins: int = 100  # location tokens: bins per box coordinate over [0, 1]
    geometry: bool = True  # location and patch tokens also get fixed Fourier features of where they are (decoder)
    max_objects: int = 10  # detection: objects per target sequence (extra ones are counted, dropped)
    eval_batch_size: int = 256

    @classmethod
    def paper_scale(cls) -> "ProbeConfig":
        """GPU-scale preset: A.1's 4-layer decoder at ViT-B width; optimiser values are ours."""
        return cls(
            decoder_depth=4,
            width=768,
            heads=12,
            steps=20_000,
            batch_size=512,
            lr=1e-3,
            weight_decay=1e-4,
            warmup_fraction=0.05,
            coord_bins=1000,
            max_objects=50,
            geometry=False,  # Beyer et al.'s decoder learns its location tokens from scratch
        )


@dataclass
class EvalConfig:
    checkpoint: str = ""  # checkpoint dir, or an MLflow run id of a pretraining run
    dataset: str = ""  # labelled image folder (class sub-folders)
    image_size: int = 0  # 0: the checkpoint's views.view_size (its ViT's input size)
    weights: str = "teacher"  # teacher (EMA) | student
    use_gpu: bool | None = None  # None: feature extraction uses a GPU when the Ray cluster has one
    batch_size: int = 128
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_epochs: int = 500
    box_linear_epochs: int = 1500  # box_linear's full-batch steps: box features fit slower (docs/evaluation.md)
    linear_lr: float = 1e-2
    linear_weight_decay: float = 1e-4
    probes: list[str] = field(default_factory=lambda: ["knn", "linear"])  # + zero_shot, retrieval (text towers)
    zero_shot_templates: list[str] = field(default_factory=list)  # "a photo of a {}."...; empty: the defaults
    seed: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # decoder / attentive probe settings
    tasks: list[str] = field(default_factory=list)  # pipeline.eval.tasks names; empty: ["folder"] on eval.dataset
    task_roots: dict[str, str] = field(default_factory=dict)  # task name -> dataset root
    max_per_split: int = 0  # 0: every example; else at most this many per split (seeded choice)
    cache_dir: str = ""  # feature cache; default <paths.root>/feature_cache
    random_init: bool = True  # also probe the randomly initialised encoder the run started from


@dataclass
class SweepConfig:
    """`abpipe sweep`: every checkpoint x `eval.tasks` pair of one or many pretraining runs."""

    runs: list[str] = field(default_factory=list)  # pretraining MLflow run ids
    experiments: list[str] = field(default_factory=list)  # ...or every pretraining run in these experiments
    checkpoints: list[str] = field(default_factory=list)  # checkpoint dirs, or Ray Train run dirs of checkpoint_*
    latest_only: bool = False  # only each run's newest checkpoint
    output: str = ""  # comparison tables; default <paths.root>/sweeps
    claim_ttl_s: float = 600.0  # a pair claimed by a sweep that stopped heart-beating this long ago is free again


@dataclass
class ScenesConfig:
    """`abpipe scenes` / the study's data: a COCO-layout scene set composed from real object images
    (pipeline/data/scenes.py), with its object-centric variant. Deterministic for a given seed."""

    objects: str = (
        "fashion_mnist"  # fashion_mnist (apt-get install dataset-fashion-mnist) | digits (sklearn) | animal_mnist
    )
    output: str = ""  # default <paths.root>/data/scenes_<objects>
    n_train: int = 10_000  # scenes per split; the object-centric variant gets as many images
    n_val: int = 2_000
    seed: int = 0
    canvas: int = 64  # scene side, pixels
    min_objects: int = 1
    max_objects: int = 3
    min_size: int = 20  # pasted object's side, pixels
    max_size: int = 36
    max_overlap: float = 0.15  # largest IoU between two objects' boxes
    background_contrast: float = 0.35  # backgrounds' texture contrast (1 = as photographed): objects stay salient
    background_dim: tuple[float, float] = (0.25, 0.45)  # backgrounds' brightness factor
    object_canvas: int = 64  # object-centric variant: image side
    object_size: int = 48  # and the object's side in it


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
    sweep: SweepConfig = field(default_factory=SweepConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)

    def resolved(self) -> "Config":
        """Fill the path defaults that depend on `paths.root` (absolute, so Ray workers agree)."""
        cfg = dataclasses.replace(self)
        root = os.path.abspath(cfg.paths.root)
        cfg.paths = PathsConfig(root=root)
        if not cfg.ingest.output:
            cfg.ingest = dataclasses.replace(cfg.ingest, output=os.path.join(root, "shards", cfg.ingest.source))
        if not cfg.scenes.output:
            cfg.scenes = dataclasses.replace(
                cfg.scenes, output=os.path.join(root, "data", f"scenes_{cfg.scenes.objects}")
            )
        if not cfg.data.shards:
            cfg.data = dataclasses.replace(cfg.data, shards=os.path.join(root, "shards", "image_folder"))
        if not cfg.train.storage_path:
            cfg.train = dataclasses.replace(cfg.train, storage_path=os.path.join(root, "ray_results"))
        if not cfg.tracking.tracking_uri:
            # MLflow's own variable first (set it in a job's runtime_env), else a local sqlite store.
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(root, 'mlflow.db')}"
            cfg.tracking = dataclasses.replace(cfg.tracking, tracking_uri=uri)
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
            glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
            if glued:  # YAML reads {depth:4} as the key "depth:4" with no value
                name, val = glued[0].split(":", 1)
                raise TypeError(f"key {glued[0]!r} has no value: write {{{name}: {val}}} (a space after the colon)")
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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(exc)})") from None
        node = nested
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' must look like section.key=value")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' was already given a value, not a section")
        node[parts[-1]] = value
    return nested


# Configs ship inside the package (pipeline/configs/; a checkout also reaches them as jobs/configs/), so
# `--config tiny.yaml` and the documented `--config jobs/configs/tiny.yaml` work from any installed copy.
_PACKAGED_PREFIXES = ("jobs/configs/", "pipeline/configs/")


def packaged_config(name: str | os.PathLike):
    """The packaged config `name` names (`tiny`, `tiny.yaml`, `methods/dino.yaml`, `jobs/configs/tiny.yaml`) or None."""
    from importlib.resources import files

    rel = Path(name).as_posix()
    if Path(name).is_absolute():
        return None
    for prefix in _PACKAGED_PREFIXES:
        rel = rel[len(prefix) :] if rel.startswith(prefix) else rel
    rel = rel if rel.endswith((".yaml", ".yml")) else rel + ".yaml"
    found = files("pipeline").joinpath("configs", *rel.split("/"))
    return found if found.is_file() else None


def packaged_config_names() -> list[str]:
    from importlib.resources import files

    return sorted(
        entry.name for entry in files("pipeline").joinpath("configs").iterdir() if entry.name.endswith(".yaml")
    )


def _config_text(path) -> str:
    """The YAML text of a config file, or of the packaged config of that name when no such file exists."""
    if os.path.exists(path):
        with open(path) as fh:
            return fh.read()
    packaged = packaged_config(path)
    if packaged is None:
        raise ConfigError(
            f"--config {path}: config file not found (packaged configs: {', '.join(packaged_config_names())})"
        )
    return packaged.read_text()


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error on one line: what is wrong and where."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides; unknown keys are an error, not a silent no-op.

    `path` is a file, or the name of a packaged config (see `packaged_config`) where no such file exists.
    """
    cfg = Config()
    if path:
        try:
            data = yaml.safe_load(_config_text(path)) or {}
        except OSError as exc:
            raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({_yaml_problem(exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        cfg = _apply(cfg, data, "")
    if overrides:
        cfg = _apply(cfg, parse_overrides(overrides), "")
    return cfg


def section_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild one config section (e.g. IngestConfig, with its nested sections) from `asdict` output."""
    return _apply(cls(), data, cls.__name__)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy stored in a checkpoint)."""
    return _apply(Config(), data, "")
