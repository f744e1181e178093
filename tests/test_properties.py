"""Property-based tests of the error boundary: whatever a user feeds the CLIs, the result is
a success or exit status 2 with one ``error:`` line, never a traceback, and the inputs stay
byte-identical.

Hypothesis generates the inputs: YAML documents (random, and config- or spec-shaped with
hostile values), raw bytes, ``--set`` items, mutations of a ``results.csv``, output paths.
The ``ci`` profile (tests/conftest.py) derandomizes them, so every run tries the same
examples; ``HYPOTHESIS_PROFILE=explore`` draws fresh ones.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from icl.config import CHOICES, RANGES, Config, load_config, valid_keys
from icl.errors import cli_entry

# --------------------------------------------------------------------------- the property


def outcome(main: Callable[[list[str] | None], int], argv: list[str]) -> tuple[int, str]:
    """Run a CLI ``main`` in-process: (exit status, stderr). Any exception other than the
    ``SystemExit`` of ``cli_entry`` propagates, i.e. is a traceback: the test fails."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return int(code or 0), err.getvalue()


def assert_success_or_one_error_line(code: int, err: str) -> None:
    words = [w for w in err.split()[1:] if "/" not in w]  # without paths: a kind of error, for
    event("success" if code == 0 else "error: " + " ".join(words[:4]))  # --hypothesis-show-statistics
    if code == 0:
        return
    assert code == 2, f"exit status {code}: {err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def sandbox(tmp_path: Path, name: str):
    """A fresh folder per example (Hypothesis reuses the test's tmp_path)."""
    folder = tmp_path / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- strategies

HOSTILE_NUMBERS = [0, -1, 1, 2**31, 2**32, 2**64, 10**400, 1e-320, 1e308, float("inf"), float("-inf"),
                   float("nan"), 0.5, -0.0, 3, 1600, 12976, 65536]
HOSTILE_TEXT = ["", "inf", ".inf", "-.nan", "1e400", "3e-4", "0x10", "cuda:-1", "cudaX", "cuda:99", "cpu",
                "~nosuchuser_icl/x", "a\0b", "2001-13-01", "\ufffd", "é", "yes", "null", "[1, 2", "{a: 1, a: 2}",
                "linear", "resnet"]

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(HOSTILE_NUMBERS), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(HOSTILE_TEXT), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
SECTIONS: dict[str, list[str]] = {}
for key in valid_keys():
    section, _, name = key.rpartition(".")
    SECTIONS.setdefault(section, []).append(name)


def key_values(key: str) -> st.SearchStrategy:
    """Values for one config key: mostly plausible (small, or at its range's ends), sometimes hostile."""
    rng, kind = RANGES.get(key), type(getattr(getattr(Config(), key.split(".")[0]), key.split(".")[-1])
                                           if "." in key else getattr(Config(), key))
    if rng is not None and kind is int:
        low, high = int(rng.low), int(rng.high) - (1 if rng.high_open else 0)
        plausible = st.one_of(st.integers(low, min(high, low + 64)), st.sampled_from([low, high]))
    elif rng is not None:
        plausible = st.floats(rng.low, rng.high, exclude_min=rng.low_open, exclude_max=rng.high_open)
    elif key in CHOICES:
        plausible = st.sampled_from(CHOICES[key])
    elif key == "train.device":
        plausible = st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "cuda:-1", "cudaX"])
    elif kind is bool:
        plausible = st.booleans()
    else:  # the path keys
        plausible = st.sampled_from([None, "/nonexistent/data", "~nosuchuser_icl/x", "rel/dir"])
    return st.one_of(plausible, plausible, st.sampled_from(HOSTILE_NUMBERS), st.sampled_from(HOSTILE_TEXT), values)


@st.composite
def config_docs(draw) -> dict:
    """A config-shaped mapping: real sections and keys (sometimes misspelt) with hostile values."""
    doc: dict = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        names = draw(st.lists(st.sampled_from(SECTIONS[section]), min_size=1, max_size=4, unique=True))
        entries = {n + draw(st.sampled_from(["", "", "", "", "s"])): draw(key_values(f"{section}.{n}".lstrip(".")))
                   for n in names}
        if section:
            doc[section] = entries if draw(st.integers(0, 9)) else draw(values)
        else:
            doc.update(entries)
    return doc


@st.composite
def spec_docs(draw) -> dict:
    """A spec-shaped mapping: base, overrides, a small grid, resources... with hostile values."""
    grid_keys = draw(st.lists(st.sampled_from(sorted(RANGES) + ["train.device", "model.embedder"]),
                              min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=3, unique=True))
    doc: dict = {
        "name": draw(st.sampled_from(["p"] * 12 + ["../x", "", "a b", 3])),
        "base": draw(st.sampled_from(["tiny"] * 12 + ["nope", "/nonexistent.yaml", None])),
        "grid": {k: draw(st.one_of(st.lists(key_values(k), min_size=1, max_size=3, unique_by=repr),
                                   st.lists(key_values(k), min_size=1, max_size=3, unique_by=repr), values))
                 for k in grid_keys},
    }
    optional = {
        "overrides": config_docs(), "resources": st.dictionaries(st.sampled_from(["cpu", "gpu", "tpu"]), values),
        "max_concurrent": values, "max_failures": values, "pack": values, "checkpoint": values,
        "description": values, "storage": values, "zzz": values,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
        doc[key] = draw(optional[key])
    return doc


def dump(doc: object) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass")


@st.composite
def yaml_bytes(draw, docs: st.SearchStrategy) -> bytes:
    """A document as YAML bytes; one in three is spoilt: a key given twice, a (recursive)
    alias, bytes before it, or bytes instead of it."""
    data = dump(draw(docs))
    spoil = draw(st.sampled_from(["none"] * 8 + ["twice", "alias", "junk", "bytes"]))
    if spoil == "twice":
        return data + (data if data.strip() != b"{}" else b"seed: 1\nseed: 2\n")
    if spoil == "alias":
        return b"a: &x {b: *x}\n" + data
    if spoil == "junk":
        return draw(st.binary(min_size=1, max_size=4)) + data
    if spoil == "bytes":
        return draw(st.binary(max_size=200))
    return data


def config_main(argv: list[str] | None) -> int:
    """The boundary every CLI runs first: ``--config PATH [--set k=v ...]``."""
    path, *sets = argv or []
    load_config(path, sets)
    return 0


CONFIG_CLI = cli_entry(config_main)


# --------------------------------------------------------------------------- config, spec, --set


@settings(max_examples=150)
@given(data=yaml_bytes(config_docs()))
def test_config_files(tmp_path_factory, data: bytes):
    folder = tmp_path_factory.mktemp("cfg")
    path = folder / "config.yaml"
    path.write_bytes(data)
    assert_success_or_one_error_line(*outcome(CONFIG_CLI, [str(path)]))
    assert path.read_bytes() == data


@settings(max_examples=150)
@given(items=st.lists(st.one_of(
    st.tuples(st.sampled_from(valid_keys() + ["data.num_clases", "", "x.y.z"]),
              st.one_of(st.sampled_from(HOSTILE_TEXT), st.sampled_from(HOSTILE_NUMBERS).map(str), st.text(max_size=20),
                        values.map(
                  lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))).map("=".join),
    st.text(max_size=20)), max_size=4))
def test_set_items(items: list[str]):
    assert_success_or_one_error_line(*outcome(CONFIG_CLI, ["tiny", *items]))


@settings(max_examples=60)
@given(data=yaml_bytes(spec_docs()), sets=st.lists(st.sampled_from(
    ["train.steps=3", "seed=inf", "optim.weight_decay=.inf", "nope=1", "model.mlp=1e12", "train.device=cuda:-1"]),
    max_size=2))
def test_sweep_specs(tmp_path_factory, data: bytes, sets: list[str]):
    from sweeps.cli import main

    folder = tmp_path_factory.mktemp("spec")
    path = folder / "spec.yaml"
    path.write_bytes(data)
    argv = [str(path), "--dry-run", "--storage", str(folder / "storage")] + [f"--set={s}" for s in sets]
    assert_success_or_one_error_line(*outcome(main, argv))
    assert path.read_bytes() == data and not (folder / "storage").exists()  # a dry run writes nothing


# --------------------------------------------------------------------------- results.csv -> icl-analyze


@functools.cache
def small_sweep(attention: bool) -> bytes:
    """A small sweep table (4 cells, 1 seed, 2 evaluations each) as the sweep writes it."""
    from analysis.synthetic import make_sweep

    df = make_sweep(classes=(100, 1600), weight_decays=(0.0, 1e-3), seeds=(0,), steps=[100, 200])
    df = df[[c for c in df.columns if not c.startswith("attn_") or (attention and c.startswith("attn_L0_"))]]
    return df.to_csv(index=False).encode()


CELLS = st.one_of(st.sampled_from(["", "nan", "inf", "-inf", "1e309", "-1", "0", "1", "1.5", "1e20", "abc",
                                   '"', ",", "\n", "4294967296", "0.5", "100", "1600", "3"]),
                  st.floats().map(repr), st.integers().map(str), st.text(max_size=6))


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``results.csv`` with a few hostile edits: cells replaced, a column dropped or renamed,
    rows shuffled or removed, the file truncated, bytes inserted."""
    df = pd.read_csv(io.BytesIO(original), dtype=str, keep_default_na=False)
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["cell", "cell", "cell", "column", "drop", "rename", "rows"]))
        if df.empty or not len(df.columns):
            break
        col = draw(st.sampled_from(list(df.columns)))
        if edit == "cell":
            df.loc[draw(st.integers(0, len(df) - 1)), col] = draw(CELLS)
        elif edit == "column":
            df[col] = draw(CELLS)
        elif edit == "drop":
            df = df.drop(columns=[col])
        elif edit == "rename":
            df = df.rename(columns={col: draw(st.sampled_from(["step", "seed", "", "data.num_classes", "x"]))})
        else:
            df = df.sample(frac=draw(st.sampled_from([0.0, 0.5, 1.0])), random_state=draw(st.integers(0, 9)))
    data = df.to_csv(index=False).encode()
    tail = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "bytes"]))
    if tail == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif tail == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


@pytest.mark.slow  # a report with its plots per example
@settings(max_examples=6)  # each success draws 4 plots (about a second): the numbers get more examples below
@given(data=st.data())
def test_results_mutations_fed_to_icl_analyze(tmp_path, data):
    from analysis.cli import main

    csv = data.draw(mutated(small_sweep(attention=False)))
    with sandbox(tmp_path, "exp") as exp:
        (exp / "results.csv").write_bytes(csv)
        code, err = outcome(main, [str(exp), "--out", str(exp / "report"), "--dpi", "10"])
        assert_success_or_one_error_line(code, err)
        assert (exp / "results.csv").read_bytes() == csv
        if code == 0:
            assert (exp / "report" / "report.md").is_file()
        else:
            assert not (exp / "report").exists() or not any((exp / "report").iterdir())


@settings(max_examples=60)
@given(data=st.data())
def test_results_mutations_through_the_numbers(tmp_path, data):
    """The same mutations through loading, the summary and the verdict (no plots: many more examples)."""
    from analysis.load import load_results
    from analysis.summary import summarize, trial_summary
    from analysis.verdict import verdict

    def analyse(argv: list[str] | None) -> int:
        df = load_results(argv[0])
        summary = summarize(df)
        verdict(summary, trial_summary(df), grid=df.attrs.get("grid"))
        return 0

    csv = data.draw(mutated(small_sweep(attention=True)))
    with sandbox(tmp_path, "exp") as exp:
        (exp / "results.csv").write_bytes(csv)
        assert_success_or_one_error_line(*outcome(cli_entry(analyse), [str(exp)]))
        assert (exp / "results.csv").read_bytes() == csv


# --------------------------------------------------------------------------- output paths

SEGMENTS = ["new", "new.npz", "dir", "file", "..", ".", "é ñ", "x" * 300, "a\nb", ".hidden", "ro"]
SPECIAL = ["/proc/icl-test.npz", "/proc/self/status", "/sys/icl-test.npz", "/proc/self", "~nosuchuser_icl/x.npz",
           "", "/dev/null"]


@st.composite
def output_paths(draw, root: Path, read_only: Path | None) -> str:
    """Paths under ``root`` built from awkward segments (never climbing out of it), or a
    special location no one may write."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(SPECIAL))
    segments = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4))
    base = root
    if segments[0] == "ro" and read_only is not None:
        base, segments = read_only, segments[1:]
    parts, depth = [], 0
    for segment in segments:
        if segment == ".." and depth == 0:  # never above the sandbox
            continue
        depth += {"..": -1, ".": 0}.get(segment, 1)
        parts.append(segment)
    return str(base.joinpath(*parts))


@pytest.fixture(scope="module")
def read_only_mount(tmp_path_factory):
    from disk_helpers import mount_tmpfs, unmount

    target = tmp_path_factory.mktemp("ro")
    if mount_tmpfs(target, "64k", read_only=True):
        yield None  # the property still runs, without this location
        return
    yield target
    unmount(target)


@settings(max_examples=25)
@given(data=st.data())
def test_icl_data_sample_output_paths(tmp_path, read_only_mount, data):
    from icl.data.cli import main

    with sandbox(tmp_path, "out") as root:
        (root / "dir").mkdir()
        (root / "file").write_bytes(b"precious")
        out = data.draw(output_paths(root, read_only_mount))
        png = data.draw(st.sampled_from([False, False, True])) and data.draw(output_paths(root, read_only_mount))
        before = snapshot(root)
        argv = ["sample", "--config", "tiny", "--split", "iwl", "-n", "2", "--out", out] + (
            ["--png", png] if png else [])
        code, err = outcome(main, argv)
        assert_success_or_one_error_line(code, err)
        after = snapshot(root)
        written = {os.path.relpath(os.path.realpath(p), os.path.realpath(root)) for p in (out, png) if p}
        for name, content in before.items():  # every other file is untouched
            assert name in written or after.get(name) == content, name
        assert not [n for n in after if n.endswith(".tmp")]
        if code != 0:  # nothing half-done: no new file at all
            assert set(after) == set(before)
