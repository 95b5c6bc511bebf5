"""`model.grad_checkpointing`: activation checkpointing of the ViT encoder, the action decoder and the text tower.

Two things are checked on real models (float32, CPU): the gradients are those of the same model without
checkpointing (max abs difference over all parameters <= 1e-6, same seed, same batch), and the checkpointing
really happens: each checkpointed block is entered a second time during the backward pass (its activations
are recomputed there), which a no-op switch would not do.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from timm.models.vision_transformer import Block

from pipeline.config import Config, ModelConfig, ObjectiveConfig, ViewsConfig, load_config
from pipeline.models.ab_model import build_model
from pipeline.models.decoder import DecoderLayer
from pipeline.models.encoder import CheckpointedBlocks, build_encoder, load_frozen_model, pooled_features
from pipeline.models.text import build_text_encoder
from pipeline.objectives.base import Progress
from pipeline.objectives.registry import build_objective
from tests.micro import MICRO_MODEL
from tests.test_objectives_ssl import fixed_batch, method_config
from tests.test_objectives_text import CONTEXT, MICRO_TEXT_MODEL, random_batch, text_config

TOL = 1e-6
# the micro models with 2 blocks everywhere, so a checkpointed block feeds another one
MODEL = dataclasses.replace(MICRO_MODEL, encoder_kwargs={**MICRO_MODEL.encoder_kwargs, "depth": 2}, decoder_depth=2)
TEXT_MODEL = dataclasses.replace(
    MICRO_TEXT_MODEL,
    encoder_kwargs={**MICRO_TEXT_MODEL.encoder_kwargs, "depth": 2},
    decoder_depth=2,
    text_kwargs={**MICRO_TEXT_MODEL.text_kwargs, "layers": 2},
)
BLOCK_KINDS = (Block, DecoderLayer, ResidualAttentionBlock)


def on(model: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model, grad_checkpointing=True)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def max_grad_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Max abs gradient difference over all parameters; the two modules must have the same parameters, the same
    weights, and the same parameters with gradients."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "not the same weights"
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga, "not the same parameters got gradients"
    return max((ga[k] - gb[k]).abs().max().item() for k in ga)


class EntryCounter:
    """Counts entries into each transformer block of `module` (a forward pre-hook: a recomputation may stop
    early, before the block's forward returns)."""

    def __init__(self, module: torch.nn.Module):
        self.blocks = {name: m for name, m in module.named_modules() if isinstance(m, BLOCK_KINDS)}
        self.calls = dict.fromkeys(self.blocks, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.blocks.items()]

    def _hook(self, name):
        def hook(_module, _args):
            self.calls[name] += 1

        return hook

    def snapshot(self) -> dict[str, int]:
        return dict(self.calls)

    def close(self):
        for h in self.handles:
            h.remove()


def run_counted(module, loss_fn):
    """(entries per block in the forward pass, entries per block during the backward pass) of one loss."""
    counter = EntryCounter(module)
    try:
        loss = loss_fn()
        forward = counter.snapshot()
        loss.backward()
        backward = {k: counter.calls[k] - forward[k] for k in forward}
    finally:
        counter.close()
    return forward, backward


def weighted_sum(*outs: torch.Tensor) -> torch.Tensor:
    """A loss reading every output element with its own fixed weight (so no gradient is trivially uniform)."""
    g = torch.Generator().manual_seed(123)
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- models


def encoder_pair(model: ModelConfig = MODEL):
    torch.manual_seed(0)
    off = build_encoder(model, 32)
    torch.manual_seed(0)
    return off, build_encoder(on(model), 32)


@pytest.mark.parametrize("dropout", [{}, {"proj_drop_rate": 0.2, "attn_drop_rate": 0.2, "drop_path_rate": 0.3}])
def test_encoder_gradients_equal_and_blocks_recomputed(dropout):
    """forward_features (timm's `checkpoint_seq`); with dropout and stochastic depth the recomputation must
    replay the same random draws (torch's checkpoint restores the RNG state)."""
    model = dataclasses.replace(MODEL, encoder_kwargs={**MODEL.encoder_kwargs, **dropout})
    off, ckpt = encoder_pair(model)
    assert ckpt.grad_checkpointing and not off.grad_checkpointing
    assert isinstance(ckpt.blocks, CheckpointedBlocks) and not isinstance(off.blocks, CheckpointedBlocks)
    x = images(6)
    if dropout:  # the draws are real: a training pass is not the eval pass
        with torch.no_grad():
            assert not torch.allclose(off(x), off.eval()(x))
        off.train()
    counts = {}
    for name, enc in (("off", off), ("on", ckpt)):
        torch.manual_seed(1)  # the dropout draws
        counts[name] = run_counted(enc, lambda: weighted_sum(pooled_features(enc, x)))
    diff = max_grad_diff(off, ckpt)
    print(f"encoder dropout={dropout}: max |grad on - grad off| = {diff:.3e}")
    assert diff <= TOL
    blocks = [n for n in counts["on"][0]]
    assert len(blocks) == 2
    assert counts["off"] == ({b: 1 for b in blocks}, {b: 0 for b in blocks})
    assert counts["on"] == ({b: 1 for b in blocks}, {b: 1 for b in blocks})  # each recomputed once, in backward


def test_direct_block_calls_are_checkpointed_too():
    """`encoder.blocks(x)` as MAE's visible-token pass calls it, bypassing forward_features; not in eval mode and
    not without grad (the EMA teacher's pass), where there is nothing to recompute."""
    off, ckpt = encoder_pair()
    tokens = torch.randn(4, 9, 48, generator=torch.Generator().manual_seed(2))
    fwd_off, bwd_off = run_counted(off, lambda: weighted_sum(off.blocks(tokens)))
    fwd_on, bwd_on = run_counted(ckpt, lambda: weighted_sum(ckpt.blocks(tokens)))
    assert max_grad_diff(off, ckpt) <= TOL
    assert set(bwd_off.values()) == {0} and set(bwd_on.values()) == {1} and set(fwd_on.values()) == {1}
    ckpt.eval()
    _, bwd_eval = run_counted(ckpt, lambda: weighted_sum(ckpt.blocks(tokens)))
    assert set(bwd_eval.values()) == {0}


def test_checkpointing_changes_no_parameter_name_and_frozen_reads_drop_it(tmp_path):
    """Same state-dict keys (timm exports and old checkpoints load as before); the eval job's frozen encoder,
    built from a run config with the switch on, runs plainly."""
    from pipeline.checkpoints import save_checkpoint

    off, ckpt = encoder_pair()
    assert list(off.state_dict()) == list(ckpt.state_dict())
    cfg = Config(model=on(MODEL), views=ViewsConfig(view_size=32))
    state = ckpt.state_dict()
    save_checkpoint(
        tmp_path, {"encoder_teacher": state, "encoder_student": state}, {"config": cfg.to_dict(), "step": 0}
    )
    frozen, loaded = load_frozen_model(tmp_path)
    assert loaded.model.grad_checkpointing
    assert not frozen.encoder.grad_checkpointing
    assert torch.equal(frozen.encode(images(2)), off.eval().forward_features(images(2)))


def test_ab_model_gradients_equal_and_decoder_layers_recomputed():
    """ABModel.forward: encoder over B*M crops and the annotation views, action decoder over M^2 queries."""
    torch.manual_seed(0)
    off = build_model(MODEL, 32)
    torch.manual_seed(0)
    ckpt = build_model(on(MODEL), 32)
    assert ckpt.decoder.grad_checkpointing and not off.decoder.grad_checkpointing
    b, m, a = 3, 3, 2
    g = torch.Generator().manual_seed(4)
    crops = torch.randn(b, m, 3, 32, 32, generator=g)
    lo = torch.rand(b, m, m, 2, generator=g) * 0.5
    actions = torch.cat([lo, lo + 0.3 + 0.2 * torch.rand(b, m, m, 2, generator=g)], dim=-1)
    ann = torch.randn(b, a, 3, 32, 32, generator=g)
    counts = {
        k: run_counted(net, lambda net=net: weighted_sum(*net(crops, actions, ann)))
        for k, net in (("off", off), ("on", ckpt))
    }
    diff = max_grad_diff(off, ckpt)
    print(f"AB model: max |grad on - grad off| = {diff:.3e}")
    assert diff <= TOL
    fwd_on, bwd_on = counts["on"]
    decoder_layers = [n for n in fwd_on if n.startswith("decoder.")]
    encoder_blocks = [n for n in fwd_on if n.startswith("encoder.")]
    assert len(decoder_layers) == 2 and len(encoder_blocks) == 2
    # two encoder and two decoder passes per step (crops, annotation views), each recomputed once
    assert all(fwd_on[n] == 2 and bwd_on[n] == 2 for n in decoder_layers + encoder_blocks)
    assert set(counts["off"][1].values()) == {0}
    # no grad (the EMA teacher's targets): nothing is checkpointed, nothing to recompute
    with torch.no_grad():
        assert torch.equal(ckpt.embed(ann[:, 0]), off.embed(ann[:, 0]))


def test_text_tower_gradients_equal_and_blocks_recomputed():
    torch.manual_seed(0)
    off = build_text_encoder(TEXT_MODEL, CONTEXT, 32)
    torch.manual_seed(0)
    ckpt = build_text_encoder(on(TEXT_MODEL), CONTEXT, 32)
    assert ckpt.transformer.transformer.grad_checkpointing and not off.transformer.transformer.grad_checkpointing
    tokens = random_batch("clip", b=4)["tokens"]
    fwd_off, bwd_off = run_counted(off, lambda: weighted_sum(off(tokens)))
    fwd_on, bwd_on = run_counted(ckpt, lambda: weighted_sum(ckpt(tokens)))
    diff = max_grad_diff(off, ckpt)
    print(f"text tower: max |grad on - grad off| = {diff:.3e}")
    assert diff <= TOL
    assert len(fwd_on) == 2 and set(fwd_on.values()) == {1}
    assert set(bwd_on.values()) == {1} and set(bwd_off.values()) == {0}


# ------------------------------------------------------------------------------------------ objectives


def objective_case(name: str):
    """(config, batch) of a method on its tests' micro config, with 2 blocks per tower."""
    if name == "ab_simclr":
        cfg = Config(
            model=MODEL,
            views=ViewsConfig(num_views=3, view_size=32, annotation_views=2),
            objective=ObjectiveConfig(name="ab_simclr"),
        )
        g = torch.Generator().manual_seed(0)
        lo = torch.rand(4, 3, 2, generator=g) * 0.5
        return cfg, {
            "views": torch.randint(0, 256, (4, 3, 32, 32, 3), dtype=torch.uint8, generator=g),
            "boxes": torch.cat([lo, lo + 0.3 + 0.2 * torch.rand(4, 3, 2, generator=g)], dim=-1),
            "ann_views": torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8, generator=g),
        }
    if name in ("ab_clip", "clip", "slip"):
        return dataclasses.replace(text_config(name), model=TEXT_MODEL), random_batch(name, b=4)
    cfg = method_config(name)
    return dataclasses.replace(cfg, model=TEXT_MODEL if name == "silc" else MODEL), fixed_batch()


def student_blocks(objective) -> set[str]:
    """The transformer blocks the student's backward pass must re-enter: every block outside the EMA teacher
    (MAE's own decoder blocks included)."""
    return {n for n, m in objective.named_modules() if isinstance(m, BLOCK_KINDS) and not n.startswith("teacher.")}


@pytest.mark.parametrize("name", ["ab_simclr", "simclr", "mae", "dino", "ab_clip", "clip", "slip", "silc"])
def test_objective_loss_and_gradients_equal_with_checkpointing(name):
    """One full loss and backward through build_objective, off and on: the same loss and gradients, and every
    student block of every tower re-entered during the backward pass."""
    cfg, batch = objective_case(name)
    off = build_objective(cfg)
    ckpt = build_objective(dataclasses.replace(cfg, model=on(cfg.model)))
    results = {}
    for key, obj in (("off", off), ("on", ckpt)):
        torch.manual_seed(3)  # MAE's masks
        holder = {}

        def loss_fn(obj=obj, holder=holder):
            holder["out"] = obj(batch, Progress(0, 10, 0.004))
            return holder["out"].loss

        results[key] = (*run_counted(obj, loss_fn), holder["out"])
    diff = max_grad_diff(off, ckpt)
    loss_off, loss_on = results["off"][2].loss, results["on"][2].loss
    print(f"{name}: loss {loss_off.item():.6f} / {loss_on.item():.6f}, max |grad on - grad off| = {diff:.3e}")
    assert torch.allclose(loss_off, loss_on, rtol=0, atol=1e-6)
    assert diff <= TOL
    expected = student_blocks(ckpt)
    assert expected, "no block to check"
    fwd_on, bwd_on = results["on"][:2]
    assert {n for n, c in bwd_on.items() if c > 0} == expected
    assert all(bwd_on[n] == fwd_on[n] for n in expected), "each checkpointed call is recomputed once"
    assert set(results["off"][1].values()) == {0}


def test_switch_is_a_config_key_and_logged():
    assert ModelConfig().grad_checkpointing is False
    cfg = load_config(None, ["model.grad_checkpointing=true"])
    assert cfg.model.grad_checkpointing is True
    assert cfg.flat()["model.grad_checkpointing"] is True


def test_the_random_init_reference_is_the_same_encoder_with_the_switch_on():
    """Checkpointing changes how a step runs, not the weights: the eval job's random-init fingerprint (its
    feature-cache key) and the encoder it writes do not move when the switch flips."""
    from pipeline.config import Config
    from pipeline.eval.random_init import random_init_fingerprint

    cfg = Config(model=MODEL)
    flipped = dataclasses.replace(cfg, model=on(cfg.model))
    assert random_init_fingerprint(cfg) == random_init_fingerprint(flipped)
    changed = dataclasses.replace(cfg, model=dataclasses.replace(MODEL, proj_dim=MODEL.proj_dim + 1))
    assert random_init_fingerprint(changed) != random_init_fingerprint(cfg)
