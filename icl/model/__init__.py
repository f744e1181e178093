"""The model: image embedders and the causal transformer over (image, label) tokens."""

from icl.model.embedders import make_embedder
from icl.model.footprint import build_model
from icl.model.transformer import N_TOKENS, QUERY_POS, SequenceModel

__all__ = ["SequenceModel", "build_model", "make_embedder", "N_TOKENS", "QUERY_POS"]
