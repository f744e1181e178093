"""A 2-layer attention-only model built by hand whose circuit is known exactly, and data it can
read: every character is a one-pixel image (pixel = character id), so a class's identity is
exact and the hand-set weights can follow it.

Residual stream (d = 128; every vector below sums to zero, so LayerNorm only rescales):
- P (dims 0-33): position t is (e_2t - e_2t+1) / sqrt 2, the positional code;
- C (34-65): image content [u, -u] / sqrt 2, u a random unit vector per class (16-d);
- S (66-97): the same code, written by the previous-token head: "the image before me";
- Lb (98-113): label y is [w, -w] / sqrt 2 (8-d; w_0 and w_1 orthogonal).

Layer 0, head 0 (previous-token head): queries read P, keys read P shifted by one position, so
token t attends to t - 1; its OV copies C into S. At a label token that is the image just before.
Layer 1, head 0 (induction head): queries read the query image's C, keys read S, so the query
attends to the labels that follow images of its class; its OV copies Lb. The unembedding reads Lb.
Layer 0, head 1 is unused (output weights zero); layer 1, head 1 is small random noise, or, with
``shared=True``, a second copy of the induction head: the two share the work, so either alone can
be removed at no cost and only ablating both (layer 1, the top-2 heads by induction score) shows it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from icl.config import Config, load_config
from icl.data import StudyData
from icl.data.images import ImageBank
from icl.data.omniglot import Source
from icl.data.split import split_for
from icl.model import build_model
from icl.model.transformer import SequenceModel

N_CHARS = 64  # one pixel each on 8 x 8 images
D, E = 128, 64  # width, per-head width (2 heads)
P, C, S, LB = 0, 34, 66, 98  # first dim of each subspace
N_U, N_W = 16, 8  # content and label code sizes (each written as [u, -u] / sqrt 2)
PREV_SCALE, IND_SCALE, OUT_SCALE = 4.0, 6.0, 5.0


def config() -> Config:
    return load_config("tiny", ["model.layers=2", f"model.d_model={D}", "model.heads=2", "model.mlp=0",
                                "model.embedder=linear", "data.image_size=8", "data.num_classes=32",
                                "data.n_holdout=8", "eval.n_sequences=256", "eval.batch_size=256"])


def data(cfg: Config) -> StudyData:
    images = np.zeros((N_CHARS, 20, 8, 8), dtype=np.uint8)
    images.reshape(N_CHARS, 20, 64)[np.arange(N_CHARS), :, np.arange(N_CHARS)] = 255
    return StudyData(cfg, Source("npz", Path("planted"), "planted"), split_for(cfg, N_CHARS), ImageBank(images, False))


def _pairs(v: torch.Tensor) -> torch.Tensor:
    """[u, -u] / sqrt 2: a unit vector with zero sum."""
    return torch.cat([v, -v], dim=-1) / math.sqrt(2)


def model(cfg: Config, seed: int = 0, shared: bool = False) -> SequenceModel:
    g = torch.Generator().manual_seed(seed)
    m = build_model(cfg).eval()
    u = torch.nn.functional.normalize(torch.randn(N_CHARS, N_U, generator=g), dim=-1)
    w = torch.linalg.qr(torch.randn(N_W, N_W, generator=g))[0].T  # orthonormal rows: w_0 _|_ w_1
    w = torch.cat([w, torch.nn.functional.normalize(torch.randn(32 - N_W, N_W, generator=g), dim=-1)])
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for ln in (m.blocks[0].ln1, m.blocks[1].ln1, m.ln_f):
            ln.weight.fill_(1.0)
        positions = torch.zeros(17, D)
        positions[torch.arange(17), P + 2 * torch.arange(17)] = 1 / math.sqrt(2)
        positions[torch.arange(17), P + 2 * torch.arange(17) + 1] = -1 / math.sqrt(2)
        m.positions.copy_(positions)
        m.embedder.proj.weight[C : C + 2 * N_U] = _pairs(u).T  # pixel c -> content of character c
        m.label_embedding.weight[:, LB : LB + 2 * N_W] = _pairs(w)
        m.head.weight[:, LB : LB + 2 * N_W] = OUT_SCALE * _pairs(w)

        # qkv rows: q (h e), k (h e), v (h e); proj columns: (h e). Row convention: W_Q[h] = rows.T
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        q, k, v = (slice(i * D, i * D + E) for i in range(3))  # head 0's rows of q, k, v
        for t in range(17):  # previous-token head: q reads position t, k maps position s to s + 1
            for sign in (0, 1):
                a0.qkv.weight[q.start + 2 * t + sign, P + 2 * t + sign] = PREV_SCALE
                if t < 16:
                    a0.qkv.weight[k.start + 2 * (t + 1) + sign, P + 2 * t + sign] = 1.0
        scale0 = math.sqrt(D / 2)  # LayerNorm's gain at layer 0 (every token has norm^2 2)
        for i in range(N_U):  # OV: C -> S
            a0.qkv.weight[v.start + i, C + i] = 1.0
            a0.proj.weight[S + i, i] = 1 / scale0
            a0.proj.weight[S + N_U + i, i] = -1 / scale0
        a0.qkv.weight[D + E : D + 2 * E] = torch.randn(E, D, generator=g) * 0.2  # head 1: keys
        a0.qkv.weight[2 * D + E : 3 * D] = torch.randn(E, D, generator=g) * 0.2  # ... and values, never written

        scale1 = math.sqrt(D / 3)  # at layer 1, label tokens also hold S: norm^2 3
        for i in range(N_U):  # induction head: q reads C, k reads S
            a1.qkv.weight[q.start + i, C + i] = IND_SCALE
            a1.qkv.weight[k.start + i, S + i] = 1.0
            a1.qkv.weight[k.start + i, S + N_U + i] = -1.0
        for i in range(N_W):  # OV: Lb -> Lb
            a1.qkv.weight[v.start + i, LB + i] = 1.0
            a1.proj.weight[LB + i, i] = 1 / (scale1 * math.sqrt(2))
            a1.proj.weight[LB + N_W + i, i] = -1 / (scale1 * math.sqrt(2))
        noise = torch.randn(3, E, D, generator=g) * 0.02  # head 1 of layer 1: small random weights
        for j in range(3):
            a1.qkv.weight[j * D + E : (j + 1) * D] = noise[j]
        a1.proj.weight[:, E:] = torch.randn(D, E, generator=g) * 0.02
        if shared:  # head 1 of layer 1 := head 0 (q, k, v rows and output columns)
            for j in range(3):
                a1.qkv.weight[j * D + E : (j + 1) * D] = a1.qkv.weight[j * D : j * D + E]
            a1.proj.weight[:, E:] = a1.proj.weight[:, :E]
    return m
