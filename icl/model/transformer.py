"""The sequence model of STUDY.md, in one file.

Tokens ``x1 y1 x2 y2 ... x8 y8 xq`` (17): image embeddings at even positions, learned
label embeddings at odd ones, plus sinusoidal positions with max timescale 30. A causal
pre-LN transformer (attention + tanh-GELU MLP, residual, final LayerNorm) reads them, and
a linear head over the label vocabulary predicts the query's label from the last token.
``model.mlp: 0`` builds attention-only blocks (the 2-layer attention-only model of the
circuits and coopetition papers; icl-dynamics ``models.TransformerBlock`` with
``mlp_ratio=None``).

Every activation passes a :class:`~icl.model.hooks.HookPoint` with its TransformerLens name
(``blocks.{l}.attn.hook_pattern``, ``blocks.{l}.hook_resid_post``, ...; the list is in
:mod:`icl.model.hooks`), free when nothing is attached. Attention runs the fused
``scaled_dot_product_attention``; only a layer whose scores or pattern are hooked computes
the softmax explicitly (einops, TransformerLens-style), with the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from icl.config import CONTEXT_LEN, SEQ_LEN, ModelConfig
from icl.model.embedders import make_embedder
from icl.model.hooks import HookPoint, name_hook_points

N_TOKENS = 2 * CONTEXT_LEN + 1  # 17
QUERY_POS = N_TOKENS - 1


def sinusoidal_positions(n: int, d: int, max_timescale: float) -> Tensor:
    """``[n, d]`` sin/cos code; timescales from 1 to ``max_timescale`` (30, not 10,000: only
    17 positions, so the slow channels still vary across the sequence)."""
    half = d // 2
    timescales = max_timescale ** (torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    angles = torch.arange(n, dtype=torch.float64)[:, None] / timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # [B, T, H, e]
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()  # [B, H, T, T]
        self.hook_z = HookPoint()  # [B, T, H, e]

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b t h e", three=3, h=self.heads)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.hook_attn_scores.active or self.hook_pattern.active:
            z = self.explicit(q, k, v)
        else:
            q, k, v = (rearrange(a, "b t h e -> b h t e") for a in (q, k, v))
            z = rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=True), "b h t e -> b t h e")
        z = self.hook_z(z)
        return self.proj(rearrange(z, "b t h e -> b t (h e)"))

    def explicit(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention with the softmax written out, so its scores and pattern can be hooked."""
        t = q.shape[1]
        scores = einsum(q, k, "b i h e, b j h e -> b h i j") / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        return einsum(pattern, v, "b h i j, b j h e -> b i h e")


class Block(nn.Module):
    """Pre-LN block: attention, then (unless ``mlp`` is 0) the MLP, each added to the residual."""

    def __init__(self, d_model: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.mlp: nn.Module | None = None
        if mlp:
            self.ln2 = nn.LayerNorm(d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, d_model))
            self.hook_resid_mid, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_resid_pre(x)
        x = x + self.hook_attn_out(self.attn(self.ln1(x)))
        if self.mlp is not None:
            x = self.hook_resid_mid(x)
            x = x + self.hook_mlp_out(self.mlp(self.ln2(x)))
        return self.hook_resid_post(x)


class SequenceModel(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int, vocab: int):
        super().__init__()
        self.cfg = cfg
        self.embedder = make_embedder(cfg.embedder, image_size, cfg.d_model)
        self.label_embedding = nn.Embedding(vocab, cfg.d_model)
        nn.init.trunc_normal_(self.label_embedding.weight, std=0.02, a=-0.04, b=0.04)
        self.register_buffer("positions", sinusoidal_positions(N_TOKENS, cfg.d_model, cfg.max_timescale))
        self.hook_embed = HookPoint()  # [B, T, d]: image and label tokens, before positions
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads, cfg.mlp) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab)
        name_hook_points(self)

    def tokens(self, images: Tensor, labels: Tensor) -> Tensor:
        """``images [B, 9, S, S]``, ``labels [B, 9]`` (the query's label is never read) ->
        ``[B, 17, d]``, positions included."""
        x = rearrange(self.embedder(rearrange(images, "b n h w -> (b n) h w")), "(b n) d -> b n d", n=SEQ_LEN)
        y = self.label_embedding(labels[:, :CONTEXT_LEN])
        pairs = rearrange(torch.stack([x[:, :CONTEXT_LEN], y], dim=2), "b n two d -> b (n two) d")
        return self.hook_embed(torch.cat([pairs, x[:, CONTEXT_LEN:]], dim=1)) + self.positions

    def logits_from_tokens(self, h: Tensor, start: int = 0) -> Tensor:
        """The transformer from block ``start`` on and the head: tokens ``[B, 17, d]`` (or block
        ``start``'s ``hook_resid_pre``) -> query logits. Head attribution runs this many times on
        activations computed once: an intervention in block ``l`` changes nothing before it."""
        for block in self.blocks[start:]:
            h = block(h)
        return self.head(self.ln_f(h[:, QUERY_POS]))

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Query logits ``[B, vocab]``."""
        return self.logits_from_tokens(self.tokens(images, labels))

