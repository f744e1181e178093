"""``icl-sweep`` with faults injected, for the sweep tests: ``python tests/sweeps/faulty_sweep.py
ARGS`` is ``icl-sweep ARGS`` with :class:`sweeps.faults.Faults` from ``ICL_SWEEP_FAULTS``
(``"t001@100,t003@100x*"``) installed as the trainable's after-evaluation hook. ``icl-sweep``
itself has no such hook: only this script installs one (``sweep_helpers.run_cli(faults=...)``
runs it)."""

from __future__ import annotations

import os

from icl.errors import cli_entry
from sweeps import cli
from sweeps.faults import FAULTS_ENV, parse_faults


@cli_entry
def main(argv: list[str] | None = None) -> int:
    text = os.environ.get(FAULTS_ENV)
    return cli.run(argv, after_eval=lambda exp: parse_faults(text, [m.trial_id for m in exp.models]))


if __name__ == "__main__":
    raise SystemExit(main())
