"""The transformer recipe: the model's structure against naive reference code, the embedded text, the
LightningCLI configs, and (slow) the claim that each pathology ends worse than the remedy that cures it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from recipes import runner
from recipes.data import make_datamodule
from recipes.spec import RunResult
from recipes.text_data import VOCAB_SIZE, TextDataModule, byte_windows, doc_topics, load_text_split
from recipes.transformer import RECIPE, Block, CausalSelfAttention, TinyGPT
from stability_callbacks import GradientMonitor, HistogramLogger, ZClip

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"

# -- the model -----------------------------------------------------------------------------------------------


def _naive_attention(attn: CausalSelfAttention, x: Tensor) -> Tensor:
    """Causal multi-head attention written out with an explicit mask and softmax."""
    b, t, c = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).split(c, dim=-1)
    q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
    if attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_naive_causal_attention(qk_norm: bool) -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4, qk_norm=qk_norm)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(attn(x), _naive_attention(attn, x), rtol=1e-5, atol=1e-6)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    for qk_norm, same in ((True, True), (False, False)):
        attn = CausalSelfAttention(16, 2, qk_norm=qk_norm)
        before = attn(x)
        with torch.no_grad():  # queries and keys times 30: the attention logits grow 900x without QK-norm
            attn.qkv.weight[:32].mul_(30.0)
            attn.qkv.bias[:32].mul_(30.0)
        after = attn(x)
        assert torch.allclose(before, after, atol=1e-4) is same, qk_norm


def _zero_branches(block: Block) -> None:
    with torch.no_grad():
        for lin in (block.attn.proj, block.mlp[-1]):
            assert isinstance(lin, nn.Linear)
            lin.weight.zero_()
            lin.bias.zero_()


def test_pre_and_post_ln_blocks_put_the_norms_where_they_say() -> None:
    torch.manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(2, 6, 16)
    pre, post = Block(16, 4, norm="pre"), Block(16, 4, norm="post")
    # with both residual branches silenced, a pre-LN block is the identity (the stream is never
    # normalised) and a post-LN block is LayerNorm applied twice (after each residual sum)
    _zero_branches(pre)
    _zero_branches(post)
    torch.testing.assert_close(pre(x), x)
    ln = nn.functional.layer_norm
    torch.testing.assert_close(post(x), ln(ln(x, (16,)), (16,)), rtol=1e-5, atol=1e-5)
    # with the branches on, each block is its formula written out
    pre, post = Block(16, 4, norm="pre"), Block(16, 4, norm="post")
    h = x + pre.attn(pre.ln1(x))
    torch.testing.assert_close(pre(x), h + pre.mlp(pre.ln2(h)))
    h = post.ln1(x + post.attn(x))
    torch.testing.assert_close(post(x), post.ln2(h + post.mlp(h)))
    with pytest.raises(ValueError, match="norm"):
        Block(16, 4, norm="sandwich")


def test_model_shapes_final_norm_and_qk_norm_layers() -> None:
    pre = TinyGPT(depth=3, dim=16, heads=4, norm="pre", max_len=12)
    post = TinyGPT(depth=3, dim=16, heads=4, norm="post", qk_norm=True, max_len=12)
    idx = torch.randint(0, VOCAB_SIZE, (5, 12))
    assert pre(idx).shape == post(idx).shape == (5, 12, VOCAB_SIZE)
    assert isinstance(pre.ln_f, nn.LayerNorm) and post.ln_f is None
    pre_blocks = [b for b in pre.blocks if isinstance(b, Block)]
    post_blocks = [b for b in post.blocks if isinstance(b, Block)]
    assert len(pre_blocks) == len(post_blocks) == 3
    assert all(b.pre for b in pre_blocks) and not any(b.pre for b in post_blocks)
    assert all(b.attn.q_norm is None and b.attn.k_norm is None for b in pre_blocks)
    for b in post_blocks:
        assert isinstance(b.attn.q_norm, nn.LayerNorm) and isinstance(b.attn.k_norm, nn.LayerNorm)
        assert b.attn.q_norm.normalized_shape == (4,)  # over each head's 4 dimensions
    with pytest.raises(ValueError, match="max_len"):
        pre(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="heads"):
        TinyGPT(dim=16, heads=3)
    with pytest.raises(ValueError, match="depth"):
        TinyGPT(depth=0)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_a_later_token_never_changes_an_earlier_positions_logits(norm: str) -> None:
    torch.manual_seed(0)
    model = TinyGPT(depth=2, dim=16, heads=2, norm=norm, qk_norm=True, max_len=10).eval()
    idx = torch.randint(0, VOCAB_SIZE, (3, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB_SIZE
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(-1).min() > 0  # every later position sees the change


def test_loss_is_mean_next_token_cross_entropy() -> None:
    torch.manual_seed(0)
    model = TinyGPT(depth=1, dim=8, heads=2, max_len=5)
    x, y = torch.randint(0, VOCAB_SIZE, (4, 5)), torch.randint(0, VOCAB_SIZE, (4, 5))
    with torch.no_grad():
        logits = model(x)
        loss = model._loss(logits, y)
    naive = -logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, naive)
    # at initialisation (weights N(0, 0.02)) the model is close to a uniform guess over 256 bytes
    assert abs(float(loss) - math.log(VOCAB_SIZE)) < 0.05


# -- the text ------------------------------------------------------------------------------------------------


def test_text_is_the_interpreters_documentation_split_by_blocks() -> None:
    from pydoc_data.topics import topics

    raw = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    train, val = load_text_split()
    assert train.dtype == val.dtype == torch.uint8
    blocks = [raw[i : i + 4096] for i in range(0, len(raw), 4096)]
    assert bytes(val.tolist()) == b"".join(blocks[9::10])
    assert bytes(train.tolist()) == b"".join(b for i, b in enumerate(blocks) if i % 10 != 9)
    assert 300_000 < len(raw) < 1_000_000 and len(val) > 30_000
    assert b"assert_stmt" in raw and [k for k, _ in doc_topics()] == sorted(topics)
    again = load_text_split()
    assert torch.equal(again[0], train) and torch.equal(again[1], val)


def test_byte_windows_known_answer_and_bad_input() -> None:
    x, y = byte_windows(torch.arange(10, dtype=torch.uint8), seq_len=3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, _ = byte_windows(torch.arange(6), seq_len=3, stride=1)
    assert x.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]] and x.dtype == torch.long
    for kwargs, name in (({"seq_len": 0}, "seq_len"), ({"seq_len": 2, "stride": 0}, "stride")):
        with pytest.raises(ValueError, match=name):
            byte_windows(torch.arange(6), **kwargs)
    with pytest.raises(ValueError, match="tokens"):
        byte_windows(torch.arange(3), seq_len=3)


def test_text_datamodule_batches_are_shifted_and_seeded() -> None:
    dm = make_datamodule("text", batch_size=8, seed=3, seq_len=32)
    assert isinstance(dm, TextDataModule)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs one byte later
    x2, _ = next(iter(TextDataModule(seq_len=32, batch_size=8, seed=3).train_dataloader()))
    x3, _ = next(iter(TextDataModule(seq_len=32, batch_size=8, seed=4).train_dataloader()))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    train, val = load_text_split()
    assert len(dm.val_set) == (len(val) - 1) // 32  # type: ignore[arg-type]
    assert len(dm.train_set) == (len(train) - 1) // 32  # type: ignore[arg-type]


# -- the recipe ----------------------------------------------------------------------------------------------


REMEDY_OF = {
    "warmup": "high_lr",
    "qk_norm": "high_lr",
    "zclip": "high_lr",
    "autopilot": "high_lr",
    "pre_ln_deep": "post_ln_deep",
}


# The remedies that lift their pathology to a healthy run's level at seeds 0, 1 and 2 (CPU preset).
CURES = {"warmup": "high_lr", "pre_ln_deep": "post_ln_deep"}


def test_only_the_remedies_that_cure_at_every_seed_say_so() -> None:
    assert {name: var.cures for name, var in RECIPE.variants.items() if var.cures} == CURES
    assert RECIPE.variants["warmup"].model == {"lr": 3e-2, "warmup_steps": 300, "cosine": True}
    post, pre = RECIPE.variants["post_ln_deep"].model, RECIPE.variants["pre_ln_deep"].model
    assert post == {"norm": "post", "depth": 6, "lr": 1e-2, "warmup_steps": 100, "cosine": True}
    assert pre == {**post, "norm": "pre"}


def test_each_remedy_changes_one_thing_of_its_pathology() -> None:
    variants = RECIPE.variants
    assert set(variants) == set(REMEDY_OF) | set(REMEDY_OF.values())
    for name, base_name in REMEDY_OF.items():
        var, base = variants[name], variants[base_name]
        assert base.callbacks() == [] and var.cures in (None, base_name), name
        changed = {k for k in var.model.keys() | base.model.keys() if var.model.get(k) != base.model.get(k)}
        # a model flag (the warm-up sets its length and the decay together) or library callbacks, not both
        assert bool(changed) != bool(var.callbacks()), name
        assert changed <= {"warmup_steps", "cosine"} or len(changed) == 1, (name, changed)


@pytest.mark.parametrize(("variant", "clipper"), [("high_lr", True), ("post_ln_deep", False)])
def test_cli_config_builds_the_variants_model(
    monkeypatch: pytest.MonkeyPatch, variant: str, clipper: bool
) -> None:
    monkeypatch.setattr(sys, "argv", ["python -m recipes.transformer"])  # the arguments come from `args`
    cli = LightningCLI(
        TinyGPT,
        pl.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(CONFIGS / f"transformer_{variant}.yaml"), "--trainer.logger=false"],
    )
    pre = RECIPE.presets["cpu"]
    expected = {**pre.model, **RECIPE.variants[variant].model}
    defaults = {"depth": 4, "norm": "pre", "lr": 1e-3, "warmup_steps": 0, "cosine": False, "qk_norm": False}
    assert {k: cli.model.hparams[k] for k in defaults | expected} == defaults | expected
    assert cli.trainer.max_steps == pre.max_steps
    assert isinstance(cli.datamodule, TextDataModule)
    assert cli.datamodule.seq_len == pre.data_kwargs["seq_len"]
    assert cli.datamodule.batch_size == pre.batch_size
    kinds = [type(c) for c in cli.trainer.callbacks]  # type: ignore[attr-defined]
    assert GradientMonitor in kinds and HistogramLogger in kinds and (ZClip in kinds) is clipper


# -- the claim (slow) ----------------------------------------------------------------------------------------


CLAIM_SEED = 1  # as in test_recipes_claims.py: the demo's seed is 0


def _most_frequent_byte_accuracy(seq_len: int) -> float:
    """Next-byte accuracy of always predicting the most frequent training byte (a space)."""
    train, val = load_text_split()
    _, y = byte_windows(val, seq_len)
    return float((y == torch.bincount(train.long(), minlength=VOCAB_SIZE).argmax()).float().mean())


def _run(variant: str) -> RunResult:
    result = runner.run_variant("transformer", variant, seed=CLAIM_SEED, log_dir=None, progress=False)
    assert result.val_metric is not None and not result.diverged, variant
    return result


@pytest.mark.slow
def test_high_lr_stays_near_byte_frequencies_and_the_warmup_cures_it() -> None:
    # Measured at seed 1 (CPU preset, one thread): high_lr 0.230, warmup 0.339, qk_norm 0.279; a
    # space-only guess scores 0.166 and a healthy 4-block run (lr 1e-2, warmed up) 0.368. The margins
    # are about half the measured gaps.
    seq_len = RECIPE.presets["cpu"].data_kwargs["seq_len"]
    floor = _most_frequent_byte_accuracy(seq_len)
    assert 0.15 < floor < 0.18
    sick, warm, qk = (_run(name).val_metric or 0.0 for name in ("high_lr", "warmup", "qk_norm"))
    assert sick < floor + 0.09, sick
    assert warm > 0.30 and warm > sick + 0.05, (warm, sick)
    assert qk > sick + 0.02 and qk < warm, (qk, sick, warm)


@pytest.mark.slow
def test_post_ln_stack_stays_at_byte_frequencies_and_the_same_stack_pre_ln_trains() -> None:
    # Measured at seed 1: post_ln_deep 0.166 (the monitor flags gradients vanishing toward the input,
    # depth ratio 5e-10), pre_ln_deep 0.315.
    floor = _most_frequent_byte_accuracy(RECIPE.presets["cpu"].data_kwargs["seq_len"])
    post, pre = _run("post_ln_deep"), _run("pre_ln_deep")
    assert post.val_metric is not None and pre.val_metric is not None
    assert abs(post.val_metric - floor) < 0.01, (post.val_metric, floor)
    assert pre.val_metric > 0.28, pre.val_metric
    assert "vanishing" in post.diagnosis() and "vanishing" not in pre.diagnosis()
