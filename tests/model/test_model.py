"""The model of STUDY.md: token layout, causality, both attention paths, parameter budget, hook
points and interventions, attention-only blocks."""

import pytest
import torch

from icl.config import load_config
from icl.model import N_TOKENS, QUERY_POS, build_model
from icl.model.hooks import ablate_head, hook_points, run_with_cache, run_with_hooks, set_pattern
from icl.model.transformer import sinusoidal_positions


def small(embedder="linear", **over):
    overrides = {"model.embedder": embedder, "data.image_size": 14, "model.layers": 2, "model.d_model": 32,
                 "model.heads": 4, "model.mlp": 64, "data.num_classes": 10, **over}
    cfg = load_config("tiny", [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def inputs(batch=3, size=14, vocab=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 9, size, size, generator=g), torch.randint(0, vocab, (batch, 9), generator=g)


def hidden_states(model, images, labels):
    """The last block's output at every position ``[B, 17, d]``, from the hook-point cache (the
    model itself returns only the query's logits)."""
    _, cache = run_with_cache(model, images, labels, names_filter=f"blocks.{len(model.blocks) - 1}.hook_resid_post")
    return cache[f"blocks.{len(model.blocks) - 1}.hook_resid_post"]


@pytest.mark.parametrize("embedder", ["resnet", "linear", "frozen"])
def test_logits_cover_the_label_vocabulary(embedder):
    model = small(embedder)
    images, labels = inputs()
    assert model(images, labels).shape == (3, 10)


@pytest.mark.parametrize("embedder", ["resnet", "linear"])
def test_changing_a_later_token_never_changes_an_earlier_one(embedder):
    model = small(embedder)
    images, labels = inputs()
    base = hidden_states(model, images, labels)
    assert base.shape == (3, N_TOKENS, 32)
    for item in range(9):  # perturb image `item` (token 2*item): tokens before it are untouched
        changed = images.clone()
        changed[:, item] = torch.rand_like(changed[:, item])
        h = hidden_states(model, changed, labels)
        assert torch.equal(h[:, : 2 * item], base[:, : 2 * item])
        assert not torch.allclose(h[:, 2 * item], base[:, 2 * item])
    for item in range(8):  # perturb label `item` (token 2*item + 1)
        changed = labels.clone()
        changed[:, item] = (changed[:, item] + 1) % 10
        h = hidden_states(model, images, changed)
        assert torch.equal(h[:, : 2 * item + 1], base[:, : 2 * item + 1])


def test_the_query_label_is_never_fed():
    model = small()
    images, labels = inputs()
    other = labels.clone()
    other[:, -1] = (other[:, -1] + 3) % 10
    assert torch.equal(model(images, labels), model(images, other))


def test_explicit_attention_path_matches_the_fused_one_and_is_causal():
    model = small()
    images, labels = inputs()
    fused, plain = run_with_cache(model, images, labels, names_filter=lambda n: n.endswith("hook_z"))
    logits, cache = run_with_cache(model, images, labels, names_filter=lambda n: n.endswith(("hook_pattern", "hook_z")))
    torch.testing.assert_close(logits, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"], plain["blocks.1.attn.hook_z"], rtol=1e-5, atol=1e-5)
    patterns = cache.stack("attn.hook_pattern")
    assert patterns.shape == (3, 2, 4, N_TOKENS, N_TOKENS)  # [B, L, H, T, T]
    torch.testing.assert_close(patterns.sum(-1), torch.ones(3, 2, 4, N_TOKENS))
    assert torch.all(patterns.triu(1) == 0)
    assert QUERY_POS == 16


def test_hook_points_carry_transformer_lens_names_and_shapes():
    model = small()
    images, labels = inputs()
    names = set(hook_points(model))
    for l in range(2):
        assert {f"blocks.{l}.attn.hook_{a}" for a in ("q", "k", "v", "z", "attn_scores", "pattern")} <= names
        assert {f"blocks.{l}.hook_{a}" for a in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")} <= names
    _, cache = run_with_cache(model, images, labels)
    assert set(cache) == names and all(hook_points(model)[n].name == n for n in names)
    assert cache["hook_embed"].shape == (3, N_TOKENS, 32)
    assert cache["blocks.0.attn.hook_q"].shape == cache["blocks.0.attn.hook_z"].shape == (3, N_TOKENS, 4, 8)
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, 4, N_TOKENS, N_TOKENS)
    # the residual stream adds up: resid_post = resid_pre + attn_out + mlp_out
    c = cache
    torch.testing.assert_close(c["blocks.0.hook_resid_post"],
                               c["blocks.0.hook_resid_pre"] + c["blocks.0.hook_attn_out"] + c["blocks.0.hook_mlp_out"])
    torch.testing.assert_close(c["blocks.0.hook_resid_post"], c["blocks.1.hook_resid_pre"])
    assert not any(p.active for p in hook_points(model).values())  # every hook detached afterwards


def test_head_ablation_removes_exactly_that_heads_output():
    model = small()
    images, labels = inputs()
    names = ("blocks.0.attn.hook_z", "blocks.0.hook_attn_out")
    _, clean = run_with_cache(model, images, labels, names_filter=names)
    _, ablated = run_with_cache(model, images, labels, names_filter=names, fwd_hooks=[ablate_head(0, 2)])
    z = clean["blocks.0.attn.hook_z"]
    assert torch.equal(ablated["blocks.0.attn.hook_z"][:, :, 2], torch.zeros_like(z[:, :, 2]))
    assert torch.equal(ablated["blocks.0.attn.hook_z"][:, :, [0, 1, 3]], z[:, :, [0, 1, 3]])
    w_o = model.blocks[0].attn.proj.weight[:, 16:24]  # head 2's columns of the output projection
    torch.testing.assert_close(clean["blocks.0.hook_attn_out"] - ablated["blocks.0.hook_attn_out"],
                               z[:, :, 2] @ w_o.T, rtol=1e-5, atol=1e-6)
    mean = torch.randn(N_TOKENS, 8)
    _, by_mean = run_with_cache(model, images, labels, names_filter=names, fwd_hooks=[ablate_head(0, 2, mean)])
    assert torch.equal(by_mean["blocks.0.attn.hook_z"][:, :, 2], mean.expand(3, N_TOKENS, 8))


def test_set_pattern_clamps_one_head_and_its_output_follows():
    model = small()
    images, labels = inputs()
    self_only = torch.eye(N_TOKENS)
    names = ("blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z")
    _, c = run_with_cache(model, images, labels, names_filter=names, fwd_hooks=[set_pattern(1, 3, self_only)])
    assert torch.equal(c["blocks.1.attn.hook_pattern"][:, 3], self_only.expand(3, N_TOKENS, N_TOKENS))
    torch.testing.assert_close(c["blocks.1.attn.hook_z"][:, :, 3], c["blocks.1.attn.hook_v"][:, :, 3])  # attends to itself
    assert not torch.equal(run_with_hooks(model, images, labels, fwd_hooks=[set_pattern(1, 3, self_only)]),
                           model(images, labels))


def test_attention_only_blocks_have_no_mlp():
    model = small(**{"model.mlp": 0})
    images, labels = inputs()
    assert all(b.mlp is None for b in model.blocks)
    assert not any(".mlp." in n or ".ln2." in n for n, _ in model.named_parameters())
    _, c = run_with_cache(model, images, labels)
    assert "blocks.0.hook_mlp_out" not in c
    torch.testing.assert_close(c["blocks.0.hook_resid_post"], c["blocks.0.hook_resid_pre"] + c["blocks.0.hook_attn_out"])


def test_tokens_interleave_images_and_labels():
    model = small()
    images, labels = inputs()
    tokens = model.tokens(images, labels) - model.positions
    label_rows = model.label_embedding(labels[:, :8])
    torch.testing.assert_close(tokens[:, 1:16:2], label_rows)
    image_rows = model.embedder(images.flatten(0, 1)).view(3, 9, -1)
    torch.testing.assert_close(tokens[:, 0:17:2], image_rows)


def test_positions_use_timescale_30():
    pos = sinusoidal_positions(17, 64, 30.0)
    assert pos.shape == (17, 64)
    # slowest channel has period 2*pi*30: still far from wrapping over 17 tokens
    torch.testing.assert_close(pos[:, 31], torch.sin(torch.arange(17.0) / 30.0))
    torch.testing.assert_close(pos[:, 0], torch.sin(torch.arange(17.0)))


def test_paper_model_has_about_0_6M_parameters_besides_label_tables():
    cfg = load_config("paper")
    model = build_model(cfg)
    tables = model.label_embedding.weight.numel() + sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters()) - tables
    assert 0.5e6 < total < 0.75e6, total
    assert len(model.blocks) == 12 and model.cfg.d_model == 64 and model.cfg.heads == 8


def test_frozen_embedder_has_nothing_to_train():
    model = small("frozen")
    assert not any(p.requires_grad for p in model.embedder.parameters())
    assert "embedder.weight" in model.state_dict()
