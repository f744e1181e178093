"""K-composition between heads: how much a later head's keys read what an earlier head wrote.

Elhage et al. 2021 ("A Mathematical Framework for Transformer Circuits"): for a head ``a`` in an
earlier layer with OV circuit ``W_OV^a`` and a head ``b`` in a later layer with QK circuit
``W_QK^b``, the K-composition score is

    ||W_OV^a W_QK^b^T||_F / (||W_OV^a||_F ||W_QK^b||_F)

in the row-vector convention of this code (``x @ W``): ``W_OV = W_V W_O`` maps a residual
vector to what the head writes, ``W_QK = W_Q W_K^T`` gives the score ``x_q W_QK x_k^T``; this is
TransformerLens's ``all_composition_scores("K")`` (left = OV, right = QK^T). It lies in [0, 1];
random matrices of this size give about ``1 / sqrt(d_model)``. An induction head reads, in its
keys, the previous token that a previous-token head copied: the previous-token -> induction pair
composes strongly.

As TransformerLens's ``fold_ln``/``center_writing_weights``: each layer's ``ln1`` gain is folded
into the weights that read the normalised residual (``W_V`` of the writing head, ``W_Q`` and
``W_K`` of the reading head), and ``W_OV``'s output is centred (LayerNorm removes the mean over
the width, so a component along it is never read). Biases are not part of either circuit.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import einsum, rearrange
from torch import Tensor

from icl.model.transformer import SequenceModel


@torch.no_grad()
def head_circuits(model: SequenceModel) -> tuple[Tensor, Tensor]:
    """``W_OV`` and ``W_QK`` of every head, each ``[L, H, d, d]`` (float64, on the CPU)."""
    ov, qk = [], []
    for block in model.blocks:
        attn = block.attn
        gain = block.ln1.weight.detach().double().cpu()
        w_q, w_k, w_v = rearrange(attn.qkv.weight.detach().double().cpu(), "(three h e) d -> three h d e", three=3,
                                  h=attn.heads)
        w_q, w_k, w_v = (gain[None, :, None] * w for w in (w_q, w_k, w_v))
        w_o = rearrange(attn.proj.weight.detach().double().cpu(), "d (h e) -> h e d", h=attn.heads)
        w_ov = einsum(w_v, w_o, "h d e, h e f -> h d f")
        ov.append(w_ov - w_ov.mean(dim=-1, keepdim=True))
        qk.append(einsum(w_q, w_k, "h d e, h f e -> h d f"))
    return torch.stack(ov), torch.stack(qk)


def k_composition(model: SequenceModel) -> np.ndarray:
    """``[L, H, L, H]``: entry ``[l1, h1, l2, h2]`` is the K-composition of head ``(l1, h1)``'s
    OV with head ``(l2, h2)``'s QK; NaN unless ``l1 < l2``; 0 where a circuit is all zero."""
    ov, qk = head_circuits(model)
    layers, heads = ov.shape[:2]
    # ||OV QK^T||_F^2 = <OV^T OV, QK^T QK>_F: no [L, H, L, H, d, d] product is ever formed
    gram_ov = einsum(ov, ov, "l h d f, l h d g -> l h f g")
    gram_qk = einsum(qk, qk, "l h d f, l h d g -> l h f g")
    product_sq = einsum(gram_ov, gram_qk, "l1 h1 f g, l2 h2 f g -> l1 h1 l2 h2").clamp_min(0)
    norm = lambda m: m.flatten(-2).norm(dim=-1)  # noqa: E731
    denom = norm(ov)[:, :, None, None] * norm(qk)[None, None]
    score = torch.where(denom > 0, product_sq.sqrt() / denom.clamp_min(1e-300), torch.zeros_like(denom))
    later = torch.arange(layers)[:, None] < torch.arange(layers)[None, :]  # [l1, l2]
    score = torch.where(later[:, None, :, None].expand(layers, heads, layers, heads), score, torch.nan)
    return score.numpy()


def composition_rows(scores: np.ndarray) -> list[dict[str, float | int]]:
    """The defined pairs of :func:`k_composition` as ``composition.csv`` rows (without ``step``)."""
    layers, heads = scores.shape[:2]
    return [{"layer_from": a, "head_from": b, "layer_to": c, "head_to": d, "k_comp": float(scores[a, b, c, d])}
            for a in range(layers) for b in range(heads) for c in range(a + 1, layers) for d in range(heads)]
