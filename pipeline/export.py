"""`abpipe export`: a checkpoint's ViT encoder as timm weights (+ text towers), a config and a model card.

Every method trains the same timm ViT (pipeline/models/encoder.py), so one export serves all of
them: the teacher or student encoder goes out as `model.safetensors` + timm's hub-style
`config.json` (architecture, `model_args` to rebuild it, `pretrained_cfg` with abpipe's
normalisation) + `README.md` (method, data, config, probe results from MLflow). The folder loads
with `timm.create_model("local-dir:DIR", pretrained=True)`, with
`timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=...),
**cfg["model_args"])`, or as plain tensors with `safetensors.torch.load_file`.

Strict on both ends: the checkpoint's tensors must be exactly the timm model's (missing, unexpected
and mis-shaped keys are named, never skipped), and the written folder is loaded back through timm
and checked tensor by tensor and on features (pooled and token) against the encoder it came from
before the export counts as done. Other frameworks' exports have loaded a handful of tensors and
logged success (timm's own loader turns strict off when `num_classes` differs from its
pretrained_cfg); the `pretrained_cfg` written here carries `num_classes: 0`, so timm stays strict.

Text-tower methods (clip, slip, silc, ab_clip) also get what zero-shot scores need, in formats torch,
timm and open_clip load without abpipe: `text.safetensors` (open_clip's text transformer),
`image_head.safetensors` (the image projection; for ab_clip the decoder's identity-action path and
the head as `nn.TransformerDecoderLayer`s, since phi(x) is the decoder's answer) and a `text` section
in config.json (open_clip text_cfg, tokenizer, context length, logit scale, how z_img is formed).
They are loaded back the same way (`load_exported_towers`) and must score as `load_towers` does.

When the checkpoint belongs to an MLflow run, the folder is logged as that run's artifacts
(`export/<weights>`) and registered as a new version of a registered model (if the tracking store
has a model registry; sqlite and tracking servers do).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import console
from pipeline.checkpoints import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_config,
    encoder_state,
    file_sha256,
    load_state,
    read_meta,
    resolve_checkpoint,
)
from pipeline.config import Config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
TEXT_FILE = "text.safetensors"  # open_clip text tower (text-tower methods only)
IMAGE_HEAD_FILE = "image_head.safetensors"  # image projection, or ab_clip's decoder + head
IMAGE_ENCODER_FILE = "image_encoder.safetensors"  # only where the towers' ViT is not model.safetensors
WEIGHTS = ("teacher", "student")
PARITY_ATOL = 1e-5  # max abs difference allowed between exported and checkpoint features (CPU fp32)
# Eval-run metrics that describe the run, not the probe result (left out of the model card).
_BOOKKEEPING = ("n_train", "n_test", "features_cached", "extract_s", "eval_s")


class ExportError(RuntimeError):
    """An export that cannot be made or would not load exactly; the message says which and why."""


@dataclass
class ExportResult:
    out: str
    architecture: str
    weights: str
    tensors: int  # tensors in the timm model = tensors written = tensors loaded back
    parameters: int
    max_abs_diff: float  # exported vs checkpoint encoder, pooled and token features
    checkpoint: str
    step: int | None
    run_id: str | None
    registered: dict[str, str] = field(default_factory=dict)  # {"name", "version"} when registered
    # text-tower methods: {"files", "image_embedding", "image_encoder", "towers", "max_abs_diff": {image, text,
    # logit_scale}} (the export's zero-shot towers vs abpipe's own); None for methods without a text tower
    text: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------- tensors


def check_tensors(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> int:
    """Number of tensors, after checking `given` has exactly `expected`'s keys and shapes.

    Raises ExportError naming every missing, unexpected and mis-shaped key (first 20 of each).
    """

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:20]) + (f" ... (+{len(keys) - 20})" if len(keys) > 20 else "")

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {names(unexpected)}")
    if shapes:
        problems.append(
            f"{len(shapes)} with another shape: "
            + names([f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes])
        )
    if problems:
        raise ExportError(f"{what}: {len(given)} tensors for a model of {len(expected)}; " + "; ".join(problems))
    return len(expected)


def load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> int:
    """Load every tensor of `model` from `tensors` (nothing missing, nothing extra); returns the count."""
    count = check_tensors(model.state_dict(), tensors, what)
    model.load_state_dict(tensors, strict=True)
    return count


def encoder_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final tokens (B, N, D), pooled (B, D)): what the decoder/attentive and linear/kNN probes read."""
    from pipeline.models.encoder import pool_tokens

    with torch.no_grad():
        tokens = model.forward_features(x)
        return tokens, pool_tokens(model, tokens)


def max_feature_diff(a: torch.nn.Module, b: torch.nn.Module, image_size: int, seed: int = 0, n: int = 4) -> float:
    """Largest |a - b| over the token and pooled features of `n` seeded random normalised images."""
    x = torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    ta, pa = encoder_features(a.eval(), x)
    tb, pb = encoder_features(b.eval(), x)
    return max((ta - tb).abs().max().item(), (pa - pb).abs().max().item())


# ----------------------------------------------------------------------------------------- timm files


def _timm_config(model: torch.nn.Module, image_size: int) -> dict[str, Any]:
    """abpipe's preprocessing as timm's pretrained_cfg: ImageNet mean/std (images_to_float), bicubic
    shorter-side resize + centre crop at the trained view size (the eval job's `crop` mode)."""
    from pipeline.models.ab_model import IMAGENET_MEAN, IMAGENET_STD

    provenance = (
        "url",
        "hf_hub_id",
        "file",
        "state_dict",
        "license",
        "origin_url",
        "paper_ids",
        "paper_name",
        "notes",
        "tag",
    )
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in provenance}
    cfg.update(
        tag="abpipe",
        custom_load=False,
        input_size=(3, image_size, image_size),
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="center",
        mean=tuple(IMAGENET_MEAN),
        std=tuple(IMAGENET_STD),
        num_classes=0,
    )
    return cfg


def write_timm_folder(model: torch.nn.Module, out: Path, model_args: dict[str, Any], image_size: int) -> None:
    """model.safetensors + config.json through timm's own writer (the format timm's loaders read)."""
    from timm.models import save_for_hf

    model.pretrained_cfg = _timm_config(model, image_size)
    save_for_hf(model, str(out), model_config={"model_args": dict(model_args)}, safe_serialization=True)


def load_exported(directory: str | os.PathLike) -> tuple[torch.nn.Module, int]:
    """(timm model, tensors loaded) from an export folder, through timm's file loader, then checked
    key by key and value by value against the safetensors file it was asked to read."""
    import timm
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{directory}: unreadable {CONFIG_FILE}: {exc}") from None
    weights = directory / WEIGHTS_FILE
    overlay = dict(cfg["pretrained_cfg"], file=str(weights))  # carries num_classes=0: timm loads strictly
    model = timm.create_model(
        cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg.get("model_args", {})
    )
    tensors = load_file(str(weights))
    state = model.state_dict()
    count = check_tensors(state, tensors, f"{weights} in timm's {cfg['architecture']}")
    differ = [k for k, v in tensors.items() if not torch.equal(state[k], v)]
    if differ:
        raise ExportError(
            f"{weights}: timm did not load {len(differ)} of {count} tensors (e.g. {', '.join(differ[:5])})"
        )
    return model.eval(), count


# ----------------------------------------------------------------------------------------- text towers


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().contiguous().clone()


def ab_head_tensors(image_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The identity-action path of an ABModel's decoder + head, in plain torch's layout.

    phi(x) asks the decoder one question, the identity action, whose 5 query tokens (readout + the
    identity box's 4 corner tokens) do not depend on the image: they are written once as `query`.
    Each abpipe DecoderLayer (pre-norm self-attention, cross-attention to the normalised memory, GELU
    MLP) is torch's `nn.TransformerDecoderLayer(norm_first=True)`: q and kv projections become
    `in_proj_weight` = [q; k; v]. With a single question there is no block mask to carry.
    """
    from pipeline.geometry import box_corners

    dec, head = image_model.decoder, image_model.head
    with torch.no_grad():
        identity = image_model.identity_action.float()  # (1, 1, 4)
        corners = dec.corner_embed(box_corners(identity)) + dec.corner_index  # (1, 1, 4, D)
        out = {"query": _copy(torch.cat([dec.readout, corners[0, 0]], dim=0))}  # (5, D)
    out["memory_norm.weight"], out["memory_norm.bias"] = _copy(dec.memory_norm.weight), _copy(dec.memory_norm.bias)
    for i, layer in enumerate(dec.layers):
        p = f"layers.{i}."
        for ours, theirs in (("self_attn", "self_attn"), ("cross_attn", "multihead_attn")):
            attn = getattr(layer, ours)
            out[p + theirs + ".in_proj_weight"] = _copy(torch.cat([attn.q.weight, attn.kv.weight]))
            out[p + theirs + ".in_proj_bias"] = _copy(torch.cat([attn.q.bias, attn.kv.bias]))
            out[p + theirs + ".out_proj.weight"] = _copy(attn.out.weight)
            out[p + theirs + ".out_proj.bias"] = _copy(attn.out.bias)
        for n in ("norm1", "norm2", "norm3"):
            norm = getattr(layer, n)
            out[p + n + ".weight"], out[p + n + ".bias"] = _copy(norm.weight), _copy(norm.bias)
        for ours, theirs in ((0, "linear1"), (2, "linear2")):
            out[p + theirs + ".weight"] = _copy(layer.mlp[ours].weight)
            out[p + theirs + ".bias"] = _copy(layer.mlp[ours].bias)
    out["norm.weight"], out["norm.bias"] = _copy(dec.norm.weight), _copy(dec.norm.bias)
    for i in (0, 2):
        out[f"head.{i}.weight"], out[f"head.{i}.bias"] = _copy(head.mlp[i].weight), _copy(head.mlp[i].bias)
    return out


def ab_head_spec(image_model: torch.nn.Module) -> dict[str, Any]:
    """config.json's `text.image.decoder`: the sizes `build_ab_head` rebuilds the modules from."""
    from pipeline.models.decoder import TOKENS_PER_ACTION

    dec = image_model.decoder
    layer = dec.layers[0]
    return {
        "queries": TOKENS_PER_ACTION,
        "dim": int(dec.readout.shape[-1]),
        "depth": len(dec.layers),
        "heads": int(layer.self_attn.heads),
        "dim_feedforward": int(layer.mlp[0].out_features),
        "hidden_dim": int(image_model.head.mlp[0].out_features),
        "layer": (
            "torch.nn.TransformerDecoderLayer(dim, heads, dim_feedforward, dropout=0.0, activation='gelu', "
            "batch_first=True, norm_first=True)"
        ),
    }


def build_ab_head(spec: dict[str, Any], embed_dim: int) -> torch.nn.Module:
    """Plain torch modules for `image_head.safetensors` of an ab_clip export (keys as ab_head_tensors)."""
    from torch import nn

    d = int(spec["dim"])
    head = nn.Module()
    head.query = nn.Parameter(torch.empty(int(spec["queries"]), d))
    head.memory_norm = nn.LayerNorm(d)
    head.layers = nn.ModuleList(
        nn.TransformerDecoderLayer(
            d,
            int(spec["heads"]),
            int(spec["dim_feedforward"]),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        for _ in range(int(spec["depth"]))
    )
    head.norm = nn.LayerNorm(d)
    hidden = int(spec["hidden_dim"])
    head.head = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
    return head


def ab_head_forward(head: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens (B, N, D) -> the identity-action embedding, before normalisation (B, P)."""
    memory = head.memory_norm(tokens)
    x = head.query.expand(tokens.shape[0], -1, -1)
    for layer in head.layers:
        x = layer(x, memory)
    return head.head(head.norm(x[:, 0]))


class ExportedTowers(torch.nn.Module):
    """An export's zero-shot towers, rebuilt from its files with torch, timm and open_clip only."""

    def __init__(self, directory: Path, cfg: dict[str, Any], vit, text, head, tokenizer):
        super().__init__()
        self.directory, self.spec = directory, cfg["text"]
        self.vit, self.text, self.head = vit.eval(), text.eval(), head.eval()
        self.tokenizer = tokenizer
        self.logit_scale = float(self.spec["logit_scale"])

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        if self.spec["image"]["embedding"] == "ab_decoder":
            z = ab_head_forward(self.head, tokens)
        else:
            z = self.vit.forward_head(tokens, pre_logits=True) @ self.head.image_projection.T
        return torch.nn.functional.normalize(z.float(), dim=-1)

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.text(tokens.long()).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.tokenizer(list(texts)), dtype=torch.long)


def load_exported_towers(directory: str | os.PathLike) -> ExportedTowers:
    """The text tower, the image embedding and the tokenizer of an export (`config.json`'s `text`
    section), each file loaded strictly. Raises ExportError for an export without a text tower or
    with files that do not fit the config."""
    import open_clip
    import timm
    from open_clip.model import _build_text_tower
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{directory}: unreadable {CONFIG_FILE}: {exc}") from None
    spec = cfg.get("text")
    if not spec:
        raise ExportError(f"{directory}: no text tower in this export ({CONFIG_FILE} has no 'text' section)")

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(directory / name))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ExportError(f"{directory / name}: unreadable: {exc}") from None

    vit = timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))
    load_strict(vit, tensors(spec["image"]["encoder"]), f"{spec['image']['encoder']} in timm's {cfg['architecture']}")
    text = _build_text_tower(int(spec["embed_dim"]), dict(spec["text_cfg"]), quick_gelu=bool(spec["quick_gelu"]))
    load_strict(text, tensors(spec["weights"]), f"{spec['weights']} in open_clip's text tower")
    image = spec["image"]
    if image["embedding"] == "ab_decoder":
        head = build_ab_head(image["decoder"], int(spec["embed_dim"]))
    elif image["embedding"] == "projection":
        head = torch.nn.Module()
        head.image_projection = torch.nn.Parameter(torch.empty(int(spec["embed_dim"]), vit.embed_dim))
    else:
        raise ExportError(f"{directory}: unknown image embedding {image['embedding']!r} in {CONFIG_FILE}")
    load_strict(head, tensors(image["head"]), f"{image['head']} ({image['embedding']})")
    tokenizer = open_clip.get_tokenizer(spec["tokenizer"], context_length=int(spec["context_length"]))
    return ExportedTowers(directory, cfg, vit, text, head, tokenizer)


PARITY_TEXTS = ("a photo of a dog.", "a blurry photo of a red car.", "2 person, bicycle", "")


def text_side(ckpt_dir: str, weights: str, encoder: torch.nn.Module, cfg: Config):
    """(towers, {file: tensors}, config.json's `text` section) for a text-tower method, None otherwise.

    The image encoder of the towers is normally the exported one; where it is not (SiLC's `teacher`
    is the DINO branch's EMA copy, which has no image projection: its towers read the student), it
    is written beside it as `image_encoder.safetensors` and the section names that file.
    """
    from pipeline.models.text import text_tower_config
    from pipeline.objectives.towers import NoTextTower, load_towers

    try:
        towers, _ = load_towers(ckpt_dir, weights)
    except NoTextTower:
        return None
    except CheckpointError as exc:
        raise ExportError(f"{cfg.objective.name} has a text tower, but it cannot be exported: {exc}") from None
    net = towers.modules_
    if hasattr(net, "image_projection"):  # CLIPNet: clip, slip, silc
        tower_encoder = net.encoder
        head = {"image_projection": _copy(net.image_projection.weight)}
        image = {
            "embedding": "projection",
            "formula": "normalize(forward_head(forward_features(x), pre_logits=True) @ image_projection.T)",
        }
    elif hasattr(net, "image") and hasattr(net.image, "decoder"):  # ABCLIPNet: ab_clip
        tower_encoder = net.image.encoder
        head = ab_head_tensors(net.image)
        image = {
            "embedding": "ab_decoder",
            "formula": (
                "phi(x) = normalize(head(norm(decoder layers(query, memory_norm(forward_features(x)))[:, 0]))): the AB "
                "decoder's identity-action embedding"
            ),
            "decoder": ab_head_spec(net.image),
        }
    else:  # pragma: no cover - a new text-tower method must say how its image side exports
        raise ExportError(f"{cfg.objective.name}: no export layout for its image tower ({type(net).__name__})")
    exported = encoder.state_dict()
    theirs = tower_encoder.state_dict()
    same = set(theirs) == set(exported) and all(torch.equal(theirs[k], exported[k]) for k in theirs)
    files = {TEXT_FILE: {k: _copy(v) for k, v in towers.text.transformer.state_dict().items()}, IMAGE_HEAD_FILE: head}
    if same:
        image["encoder"] = WEIGHTS_FILE
    else:
        image["encoder"] = IMAGE_ENCODER_FILE
        image["encoder_note"] = (
            f"the {weights} encoder in {WEIGHTS_FILE} is not the one the image projection was trained on; "
            f"{IMAGE_ENCODER_FILE} is (same architecture and model_args)"
        )
        files[IMAGE_ENCODER_FILE] = {k: _copy(v) for k, v in theirs.items()}
    image["head"] = IMAGE_HEAD_FILE
    tower = text_tower_config(cfg.model, cfg.views.text.context_length)
    section = {
        "method": cfg.objective.name,
        "towers": weights if cfg.objective.name == "ab_clip" and cfg.objective.teacher == "ema" else "student",
        "weights": TEXT_FILE,
        "builder": "open_clip.model._build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)",
        "embed_dim": int(cfg.model.proj_dim),
        "text_cfg": tower["text_cfg"],
        "quick_gelu": tower["quick_gelu"],
        "tokenizer": towers.tokenizer,
        "context_length": towers.context_length,
        "logit_scale": towers.logit_scale,
        "score": "logit_scale * <z_img, z_txt>, z_img = normalize(image embedding), z_txt = normalize(text(tokens))",
        "image": image,
    }
    return towers, files, section


def towers_diff(towers, exported: ExportedTowers, image_size: int, seed: int = 0, n: int = 4) -> dict[str, float]:
    """Max |abpipe's towers - the export's| on seeded random images and a few tokenised strings."""
    x = torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    ours, theirs = towers.tokenize(list(PARITY_TEXTS)), exported.tokenize(list(PARITY_TEXTS))
    if not torch.equal(ours, theirs):
        raise ExportError("the export's tokenizer gives other token ids than the training run's")
    with torch.no_grad():
        image = (towers.embed_images(x) - exported.embed_images(x)).abs().max().item()
        text = (towers.embed_texts(ours) - exported.embed_texts(theirs)).abs().max().item()
    return {"image": image, "text": text, "logit_scale": abs(towers.logit_scale - exported.logit_scale)}


def write_text_side(directory: Path, files: dict[str, dict[str, torch.Tensor]], section: dict[str, Any]) -> None:
    """The text-side safetensors files, and the `text` section added to timm's config.json."""
    from safetensors.torch import save_file

    for name, tensors in files.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
    path = directory / CONFIG_FILE
    cfg = json.loads(path.read_text())
    cfg["text"] = section
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def check_text_side(directory: Path, towers, section: dict[str, Any], image_size: int) -> dict[str, Any]:
    """Load the written text side back without abpipe's modules and compare it with the towers."""
    diff = towers_diff(towers, load_exported_towers(directory), image_size)
    if not max(diff.values()) <= PARITY_ATOL:
        raise ExportError(f"the exported zero-shot towers differ from the checkpoint's: {diff} (> {PARITY_ATOL:g})")
    image = section["image"]
    files = [TEXT_FILE, IMAGE_HEAD_FILE] + ([image["encoder"]] if image["encoder"] != WEIGHTS_FILE else [])
    return {
        "files": files,
        "image_embedding": image["embedding"],
        "image_encoder": image["encoder"],
        "towers": section["towers"],
        "max_abs_diff": diff,
    }


# ----------------------------------------------------------------------------------------- model card


def probe_results(tracking_uri: str, run_id: str) -> list[dict[str, Any]]:
    """Probe metrics of the eval runs of pretraining run `run_id`, in any experiment of the store."""
    from mlflow.tracking import MlflowClient

    from pipeline.eval.report import result_rows

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`abpipe.parent_run_id` = '{run_id}' and tags.`abpipe.kind` = 'eval'"
    rows = []
    for run in client.search_runs(experiments, filter_string=query, max_results=1000):
        metrics = {k: v for k, v in run.data.metrics.items() if k not in _BOOKKEEPING and not k.startswith("skipped/")}
        for metric, value, random_init in result_rows(metrics):
            rows.append(
                {
                    "task": run.data.tags.get("abpipe.task", run.info.run_name or ""),
                    "step": run.data.tags.get("abpipe.checkpoint_step", ""),
                    "metric": metric,
                    "value": value,
                    "random_init": random_init,
                    "run_id": run.info.run_id,
                }
            )
    return sorted(rows, key=lambda r: (r["task"], str(r["step"]).zfill(12), r["metric"]))


def _probe_table(rows: list[dict[str, Any]], step: int | None) -> list[str]:
    lines = ["| task | checkpoint step | metric | pretrained | random init |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " (this export)" if step is not None and str(r["step"]) == str(step) else ""
        rand = "" if r["random_init"] is None else f"{r['random_init']:.4f}"
        lines.append(f"| {r['task']} | {r['step']}{mark} | {r['metric']} | {r['value']:.4f} | {rand} |")
    return lines


_LOAD_SNIPPET = """\
```python
import json, timm
from safetensors.torch import load_file

model = timm.create_model("local-dir:.", pretrained=True)  # this folder (timm with local-dir:, e.g. {timm})
cfg = json.load(open("config.json"))  # or, with any timm >= 1.0:
overlay = dict(cfg["pretrained_cfg"], file="model.safetensors")  # all of it: num_classes=0 keeps timm strict
model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"])
tensors = load_file("model.safetensors")  # plain tensors, timm's key names
features = model.forward_head(model.forward_features(images), pre_logits=True)  # pooled, as abpipe's probes
```

Input: RGB at {size} px, ImageNet mean/std (`timm.data.resolve_data_config({{}}, model=model)`).
"""


ZERO_SHOT_HEADING = "## Zero-shot classification"

_ZERO_SHOT_LOAD = """\
```python
import json, timm, open_clip, torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file

cfg = json.load(open("config.json"))
t = cfg["text"]  # the text tower and how the image embedding is formed
overlay = dict(cfg["pretrained_cfg"], file=t["image"]["encoder"])
vit = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"])
vit.eval()
preprocess = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=vit))
text = open_clip.model._build_text_tower(t["embed_dim"], t["text_cfg"], quick_gelu=t["quick_gelu"]).eval()
text.load_state_dict(load_file(t["weights"]), strict=True)
tokenizer = open_clip.get_tokenizer(t["tokenizer"], context_length=t["context_length"])
{image}

@torch.no_grad()
def classifier(classnames, templates):  # CLIP's prompt averaging: one unit row per class
    rows = []
    for name in classnames:
        z = F.normalize(text(tokenizer([tpl.format(name) for tpl in templates])), dim=-1)
        rows.append(F.normalize(z.mean(0), dim=-1))
    return torch.stack(rows)
```
"""

_PROJECTION_IMAGE = """\
projection = load_file(t["image"]["head"])["image_projection"]  # (embed_dim, ViT width)


def embed_images(x):  # preprocessed images (B, 3, H, W) -> unit embeddings (B, embed_dim)
    pooled = vit.forward_head(vit.forward_features(x), pre_logits=True)
    return F.normalize(pooled @ projection.T, dim=-1)
"""

_AB_DECODER_IMAGE = """\
d = t["image"]["decoder"]  # the AB decoder's identity-action path, as plain torch modules
head = nn.Module()
head.query = nn.Parameter(torch.empty(d["queries"], d["dim"]))  # readout + the identity box's 4 corner tokens
head.memory_norm, head.norm = nn.LayerNorm(d["dim"]), nn.LayerNorm(d["dim"])
layer = dict(dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
head.layers = nn.ModuleList(
    nn.TransformerDecoderLayer(d["dim"], d["heads"], d["dim_feedforward"], **layer) for _ in range(d["depth"])
)
head.head = nn.Sequential(nn.Linear(d["dim"], d["hidden_dim"]), nn.GELU(), nn.Linear(d["hidden_dim"], t["embed_dim"]))
head.load_state_dict(load_file(t["image"]["head"]), strict=True)
head.eval()


def embed_images(x):  # phi(x), the decoder's answer for the identity action -> unit embeddings (B, embed_dim)
    memory = head.memory_norm(vit.forward_features(x))
    q = head.query.expand(len(x), -1, -1)
    for block in head.layers:
        q = block(q, memory)
    return F.normalize(head.head(head.norm(q[:, 0])), dim=-1)
"""

_ZERO_SHOT_USE = """\
```python
from PIL import Image

classnames = ["cat", "dog"]
templates = ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.", "a photo of the small {}."]
x = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in ["cat.png", "dog.png"]])
with torch.no_grad():
    logits = t["logit_scale"] * embed_images(x) @ classifier(classnames, templates).T  # (images, classes)
predicted = [classnames[i] for i in logits.argmax(-1)]
```
"""


def zero_shot_snippet(embedding: str) -> str:
    """The card's self-contained loading code (torch, timm, open_clip, safetensors) for an image embedding."""
    image = {"projection": _PROJECTION_IMAGE, "ab_decoder": _AB_DECODER_IMAGE}[embedding]
    return _ZERO_SHOT_LOAD.format(image=image)


def _zero_shot_section(cfg: Config, result: ExportResult) -> list[str]:
    if result.text is None:
        return [
            "## Text tower",
            "",
            (
                f"None: `{cfg.objective.name}` trains no text tower, so this export is the image encoder alone "
                "(zero-shot classification and retrieval apply to the clip, slip, silc and ab_clip exports, which also "
                "carry `text.safetensors` and `image_head.safetensors`)."
            ),
            "",
        ]
    t = result.text
    embedding = t["image_embedding"]
    how = (
        "the linear image projection (`image_head.safetensors`) of the pooled ViT output"
        if embedding == "projection"
        else (
            "phi(x), the AB decoder's identity-action embedding: the decoder and projection head are in "
            "`image_head.safetensors`, in `torch.nn.TransformerDecoderLayer`'s layout"
        )
    )
    enc = (
        ""
        if t["image_encoder"] == WEIGHTS_FILE
        else (
            f" The image side reads `{t['image_encoder']}` ({t['towers']} encoder), not `{WEIGHTS_FILE}`: the "
            f"{result.weights} encoder was not trained with the image projection."
        )
    )
    return [
        ZERO_SHOT_HEADING,
        "",
        (
            f"This export carries the text tower (`text.safetensors`, open_clip's text transformer) and the image "
            f"embedding: {how}; `config.json` has both under `text` (tokenizer `{cfg.views.text.tokenizer}`, "
            f"context length {cfg.views.text.context_length}). Scores are logit_scale * <z_img, z_txt> of unit "
            f"embeddings, as in training.{enc} Nothing of abpipe is needed:"
        ),
        "",
        zero_shot_snippet(embedding),
        _ZERO_SHOT_USE,
    ]


def _described(mixture: dict[str, float], shards: str) -> str:
    return ", ".join(f"{k} (weight {w:g})" for k, w in mixture.items()) or shards


def _text_checks(result: ExportResult) -> list[str]:
    if result.text is None:
        return []
    d = result.text["max_abs_diff"]
    return [
        (
            f"- zero-shot towers rebuilt from this folder (torch, timm, open_clip only) vs the checkpoint's: max abs "
            f"diff {d['image']:.3g} (image embeddings), {d['text']:.3g} (text embeddings), {d['logit_scale']:.3g} "
            "(logit scale)"
        )
    ]


def model_card(
    cfg: Config,
    meta: dict[str, Any],
    result: ExportResult,
    sha256: str,
    probes: list[dict[str, Any]] | None,
    tracking_uri: str | None,
) -> str:
    """README.md: what the weights are, how they were trained, what probes measured, how to load them."""
    import yaml
    from timm import __version__ as timm_version

    v, t = cfg.views, cfg.train
    data = _described(cfg.data.mixture, cfg.data.shards) or "(not recorded)"
    ann = _described(cfg.data.annotation_mixture, cfg.data.annotation_shards)
    views_seen = int(meta.get("views_seen") or 0)
    workers = meta.get("world_size", t.world_size)
    lines = [
        "---",
        "library_name: timm",
        f"tags: [image-feature-extraction, {'zero-shot-image-classification, ' if result.text else ''}timm, abpipe, "
        f"{cfg.objective.name}]",
        "---",
        "",
        f"# {t.run_name}: {cfg.objective.name} {result.architecture} encoder ({result.weights} weights)",
        "",
        (
            f"Exported by `abpipe export` from step {meta.get('step')} ({views_seen:,} views seen) of MLflow run "
            f"`{result.run_id or 'none'}`; `state.pt` sha256 `{sha256}`."
        ),
        "",
        "## Load",
        "",
        _LOAD_SNIPPET.format(timm=timm_version, size=v.view_size),
        *_zero_shot_section(cfg, result),
        "## Method and data",
        "",
        f"- method: `{cfg.objective.name}` ({result.weights} encoder; without a teacher, the student is both)",
        (
            f"- encoder: `{result.architecture}` {json.dumps(cfg.model.encoder_kwargs)} at {v.view_size} px, "
            f"{result.parameters:,} parameters in {result.tensors} tensors"
        ),
        f"- data: {data}" + (f"; annotations from {ann}" if ann else ""),
        (
            f"- views: {v.num_views} crops (scale {list(v.scale)}), {v.annotation_views} annotation views, "
            f"{v.local_views} local views; text annotations: {v.text.source}"
        ),
        f"- budget: {t.total_views:,} views, batch {t.batch_size} x {workers} workers, lr {t.lr:g}, seed {t.seed}",
        "",
        "## Probe results",
        "",
    ]
    if probes:
        lines += [f"Frozen-feature probes logged by `abpipe eval` in `{tracking_uri}`:", ""]
        lines += [*_probe_table(probes, meta.get("step")), ""]
    elif probes is None:
        lines += ["Not looked up: the checkpoint names no MLflow run, or the tracking store could not be read.", ""]
    else:
        lines += [
            f"No evaluation runs of this run in `{tracking_uri}` yet (`abpipe eval --checkpoint {result.run_id}`).",
            "",
        ]
    lines += [
        "## Export checks",
        "",
        f"- {result.tensors} of {result.tensors} tensors of the timm model loaded (no missing or unexpected key)",
        (
            f"- features of the exported model vs the checkpoint's encoder: max abs diff {result.max_abs_diff:.3g} "
            "(CPU fp32)"
        ),
        *_text_checks(result),
        "",
        "## Full training config",
        "",
        "<details><summary>resolved config</summary>",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=True).rstrip(),
        "```",
        "</details>",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- MLflow


def register(tracking_uri: str, run_id: str, out: str, name: str, weights: str, step: int | None) -> dict[str, str]:
    """Log `out` as the run's `export/<weights>` artifacts and register them as a new model version.

    Returns {"name", "version", "source"}, or {"skipped": reason} when the store has no registry.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import probe

    probe(tracking_uri)
    client = MlflowClient(tracking_uri)
    artifact_path = f"export/{weights}"
    client.log_artifacts(run_id, out, artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        try:
            client.create_registered_model(
                name, description="abpipe encoder exports (timm safetensors + config.json + model card)"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={"abpipe.weights": weights, "abpipe.checkpoint_step": str(step)},
            description=f"{weights} encoder at step {step}",
        )
    except MlflowException as exc:
        return {"skipped": f"the tracking store has no model registry ({exc.message.splitlines()[0]})"}
    return {"name": name, "version": str(version.version), "source": source}


# ----------------------------------------------------------------------------------------- export


def _config(ckpt_dir: str) -> Config:
    try:
        return checkpoint_config(ckpt_dir)
    except KeyError:
        raise ExportError(f"{ckpt_dir}: its {META_FILE} has no training config") from None


def export_checkpoint(
    ckpt_dir: str,
    out: str | os.PathLike,
    weights: str = "teacher",
    run_id: str | None = None,
    tracking_uri: str | None = None,
    register_as: str | None = None,
) -> ExportResult:
    """Write the encoder of checkpoint `ckpt_dir` to `out` and check it loads exactly (see module doc).

    `run_id`: the pretraining run (default: the one recorded in the checkpoint); with `tracking_uri`
    its eval runs fill the model card and, if `register_as` is given, the export is registered.
    """
    from pipeline.models.encoder import build_encoder

    if weights not in WEIGHTS:
        raise ExportError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder")
    meta = read_meta(ckpt_dir)
    cfg = _config(ckpt_dir)
    try:
        tensors = encoder_state(load_state(ckpt_dir), weights)
    except KeyError as exc:
        raise ExportError(f"{ckpt_dir}: {exc.args[0]}") from None
    encoder = build_encoder(cfg.model, cfg.views.view_size)
    loaded = load_strict(encoder, tensors, f"{ckpt_dir} ({weights} encoder) in timm's {cfg.model.encoder}")
    run_id = run_id or meta.get("mlflow_run_id")
    text = text_side(ckpt_dir, weights, encoder, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # moved into place when complete
    try:
        model_args = {"img_size": cfg.views.view_size, **cfg.model.encoder_kwargs, "num_classes": 0}
        write_timm_folder(encoder, staging, model_args, cfg.views.view_size)
        if text is not None:
            write_text_side(staging, *text[1:])
        reloaded, count = load_exported(staging)
        if count != loaded:
            raise ExportError(f"wrote {loaded} tensors, timm loaded {count}")
        diff = max_feature_diff(encoder, reloaded, cfg.views.view_size)
        if not diff <= PARITY_ATOL:
            raise ExportError(f"exported features differ from the checkpoint's by {diff:.3g} (> {PARITY_ATOL:g})")
        result = ExportResult(
            out=str(out),
            architecture=cfg.model.encoder,
            weights=weights,
            tensors=count,
            parameters=sum(p.numel() for p in encoder.parameters()),
            max_abs_diff=diff,
            checkpoint=str(ckpt_dir),
            step=meta.get("step"),
            run_id=run_id,
        )
        if text is not None:
            result.text = check_text_side(staging, text[0], text[2], cfg.views.view_size)
        probes = None
        if run_id and tracking_uri:
            try:
                probes = probe_results(tracking_uri, run_id)
            except Exception as exc:  # noqa: BLE001 - the card says it could not look; the export stands
                console.warn(f"probe results not read from {tracking_uri}: {exc}")
        sha = file_sha256(os.path.join(ckpt_dir, STATE_FILE))
        (staging / CARD_FILE).write_text(model_card(cfg, meta, result, sha, probes, tracking_uri))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if register_as and run_id and tracking_uri:
        try:
            result.registered = register(tracking_uri, run_id, str(out), register_as, weights, result.step)
        except Exception as exc:  # noqa: BLE001 - the folder is complete and checked; say why it is not in MLflow
            result.registered = {"skipped": f"{type(exc).__name__}: {exc}"}
    elif register_as:
        result.registered = {"skipped": "the checkpoint names no MLflow run"}
    if "skipped" in result.registered:
        console.warn(f"export not registered in MLflow: {result.registered['skipped']}")
    return result


def run_export(
    ref: str,
    out: str,
    weights: str = "teacher",
    tracking_uri: str | None = None,
    default_uri: str = "",
    register_model: bool = True,
    name: str | None = None,
) -> ExportResult:
    """`abpipe export REF --out DIR`: REF is a checkpoint directory, `runs:/<id>/<dir>` or a run id.

    The MLflow store is `tracking_uri` when given; else a run id is looked up in `default_uri`, and a
    checkpoint directory's run in the store its own config names (where that run was logged).
    Registered as `name` (default `abpipe-<run name>`) unless `register_model` is off.
    """
    download = tempfile.mkdtemp(prefix="abpipe-export-dl-")
    try:
        ckpt_dir, source_run, _ = resolve_checkpoint(ref, tracking_uri or default_uri, download)
        cfg = _config(ckpt_dir)
        uri = tracking_uri or (default_uri if source_run else cfg.tracking.tracking_uri) or None
        register_as = (name or f"abpipe-{cfg.train.run_name}") if register_model else None
        return export_checkpoint(ckpt_dir, out, weights, source_run, uri, register_as)
    finally:
        shutil.rmtree(download, ignore_errors=True)


__all__ = [
    "CheckpointError",
    "ExportError",
    "ExportResult",
    "export_checkpoint",
    "load_exported",
    "load_exported_towers",
    "run_export",
]
