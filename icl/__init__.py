"""In-context vs in-weights learning: data, model and trainer for the sweep study.

See ``../shared/docs/STUDY.md`` (the scientific specification) and README.md.
"""

__version__ = "0.1.0"
