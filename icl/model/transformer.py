"""The sequence model of STUDY.md, in one file.

Tokens ``x1 y1 x2 y2 ... x8 y8 xq`` (17): image embeddings at even positions, learned
label embeddings at odd ones, plus sinusoidal positions with max timescale 30. A causal
pre-LN transformer (attention + tanh-GELU MLP, residual, final LayerNorm) reads them, and
a linear head over the label vocabulary predicts the query's label from the last token.

Attention has two paths with the same weights: training calls the fused
``scaled_dot_product_attention``; ``forward(..., return_attention=True)`` computes the
softmax explicitly (einops, TransformerLens-style) and returns every layer's per-head
pattern ``[B, H, T, T]`` for the diagnostics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from icl.config import CONTEXT_LEN, SEQ_LEN, Config, ModelConfig
from icl.machine import check_model_fits_host
from icl.model.embedders import make_embedder

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

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.heads)
        if return_attention:
            scores = einsum(q, k, "b h i e, b h j e -> b h i j") / math.sqrt(q.shape[-1])
            t = x.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            pattern = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            out = einsum(pattern, v, "b h i j, b h j e -> b h i e")
        else:
            pattern = None
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(rearrange(out, "b h t e -> b t (h e)")), pattern


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, d_model))

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        a, pattern = self.attn(self.ln1(x), return_attention)
        x = x + a
        return x + self.mlp(self.ln2(x)), pattern


class SequenceModel(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int, vocab: int):
        super().__init__()
        self.cfg = cfg
        self.embedder = make_embedder(cfg.embedder, image_size, cfg.d_model)
        self.label_embedding = nn.Embedding(vocab, cfg.d_model)
        nn.init.trunc_normal_(self.label_embedding.weight, std=0.02, a=-0.04, b=0.04)
        self.register_buffer("positions", sinusoidal_positions(N_TOKENS, cfg.d_model, cfg.max_timescale))
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads, cfg.mlp) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab)

    def tokens(self, images: Tensor, labels: Tensor) -> Tensor:
        """``images [B, 9, S, S]``, ``labels [B, 9]`` (the query's label is never read) ->
        ``[B, 17, d]``."""
        x = rearrange(self.embedder(rearrange(images, "b n h w -> (b n) h w")), "(b n) d -> b n d", n=SEQ_LEN)
        y = self.label_embedding(labels[:, :CONTEXT_LEN])
        pairs = rearrange(torch.stack([x[:, :CONTEXT_LEN], y], dim=2), "b n two d -> b (n two) d")
        return torch.cat([pairs, x[:, CONTEXT_LEN:]], dim=1) + self.positions

    def forward(self, images: Tensor, labels: Tensor, return_attention: bool = False):
        """Query logits ``[B, vocab]``; with ``return_attention`` also ``[B, L, H, T, T]``."""
        h = self.tokens(images, labels)
        patterns = []
        for block in self.blocks:
            h, pattern = block(h, return_attention)
            patterns.append(pattern)
        logits = self.head(self.ln_f(h[:, QUERY_POS]))
        if return_attention:
            return logits, torch.stack(patterns, dim=1)
        return logits


def build_model(cfg: Config, vocab: int | None = None) -> SequenceModel:
    """The model for a config; parameters are initialised from ``torch``'s global RNG, which
    the trainer seeds from ``cfg.seed`` first. A model whose training state cannot fit in
    this machine's memory is refused before anything is allocated."""
    check_model_fits_host(cfg)
    return SequenceModel(cfg.model, cfg.data.image_size, vocab or cfg.data.num_classes)
