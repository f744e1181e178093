"""Circuits over training: which heads carry ICL and IWL, and how they compose.

- :mod:`icl.circuits.attribution`: ablate each head alone and groups of heads together, record
  every accuracy metric's change with its paired standard error; name the ICL heads by causal
  effect, and call them induction / previous-token heads where their attention agrees.
- :mod:`icl.circuits.composition`: K-composition between every earlier and later head.
- :mod:`icl.circuits.over_training`: both for every checkpoint of a run directory,
  incrementally (``heads.csv``, ``groups.csv``, ``circuit.csv``, ``composition.csv``).
"""

from icl.circuits.attribution import ABLATIONS, MIN_DROP, Attribution, head_attribution, name_circuit
from icl.circuits.composition import k_composition
from icl.circuits.over_training import update_run

__all__ = ["ABLATIONS", "MIN_DROP", "Attribution", "head_attribution", "name_circuit", "k_composition", "update_run"]
