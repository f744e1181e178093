"""The model: image embedders and the causal transformer over (image, label) tokens."""

from icl.model.embedders import make_embedder
from icl.model.transformer import N_TOKENS, QUERY_POS, SequenceModel, build_model

__all__ = ["SequenceModel", "build_model", "make_embedder", "N_TOKENS", "QUERY_POS"]
