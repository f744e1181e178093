"""The input boundary (icl.inputs): strict UTF-8, YAML without duplicate keys or aliases, safe paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from icl.config import build_config, load_config, parse_overrides
from icl.errors import UserError
from icl.inputs import parse_yaml, read_text, read_yaml, user_path

NOT_UTF8 = b"seed: 1\ndata:\n  root: /d\xe9j\xe0\n"  # Latin-1 accents


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_text_that_is_not_utf8_names_the_file_and_byte(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_bytes(NOT_UTF8)
    msg = message(load_config, str(p))
    assert str(p) in msg and "not UTF-8" in msg and "0xe9" in msg and "offset 24" in msg
    assert p.read_bytes() == NOT_UTF8


def test_utf8_with_a_byte_order_mark_is_read(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_bytes("\ufeffseed: 5\n".encode())
    assert load_config(str(p)).seed == 5


@pytest.mark.parametrize(
    "text, words",
    [
        ("seed: 1\nseed: 2\n", ["'seed'", "twice", "line 2"]),
        ("data:\n  p_bursty: 0.1\n  p_bursty: 0.9\n", ["'p_bursty'", "twice", "line 3"]),
        ("data: {augment: true, augment: false}\n", ["'augment'", "twice"]),
        ("base: &b {seed: 1}\nother: *b\n", ["aliases"]),
        ("a: &x {b: *x}\n", ["aliases"]),  # a recursive document
        ("1: 2\n", ["not text"]),
        ("data:\n  root: 2001-13-01\n", ["cannot build"]),  # YAML's date, month 13
        ("[" * 20000, []),  # nested beyond any config
        ("seed: !!python/name:os.system\n", ["not valid YAML"]),
        ("seed: [1, 2\n", ["not valid YAML", "line 2"]),
    ],
)
def test_yaml_that_is_ambiguous_or_explosive_is_refused(tmp_path: Path, text: str, words: list[str]):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    msg = message(read_yaml, p)
    assert str(p) in msg
    for w in words:
        assert w in msg


def test_duplicate_keys_refused_in_a_sweep_spec(tmp_path: Path):
    from sweeps.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text("base: tiny\ngrid:\n  seed: [0, 1]\n  seed: [2]\n")
    msg = message(load_spec, str(p))
    assert "'seed'" in msg and "twice" in msg and str(p) in msg


def test_set_values_are_parsed_by_the_same_loader():
    assert parse_overrides(["data.root={a: 1, a: 2}"])["data.root"] == "{a: 1, a: 2}"  # not YAML: text
    assert "must be a number" in message(build_config, "tiny", ["optim.lr={a: 1, a: 2}"])
    assert parse_overrides(["data.root=2001-13-01"])["data.root"] == "2001-13-01"


def test_read_text_reports_a_folder_and_a_missing_file(tmp_path: Path):
    assert "cannot read" in message(read_text, tmp_path, "config") and str(tmp_path) in message(read_text, tmp_path)
    msg = message(read_text, tmp_path / "absent", "config")
    assert "absent" in msg and "does not exist" in msg


def test_parse_yaml_plain_documents():
    assert parse_yaml("a: 1\nb: [1, 2]\n", "x") == {"a": 1, "b": [1, 2]}
    assert parse_yaml("", "x") is None and parse_yaml("3e-4", "x") == "3e-4"


@pytest.mark.parametrize("text", ["~nosuchuser_icl/x", "a\0b", ""])
def test_user_path_refuses_what_names_no_file(text: str):
    assert "path" in message(user_path, text, "data.root") or "no such user" in message(user_path, text, "data.root")


def test_user_path_expands_home(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_path("~/x", "p") == tmp_path / "x"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match="cannot be resolved|loop"):
        user_path(loop / "x", "p")


def test_data_root_of_an_unknown_user_is_one_error(tmp_path: Path):
    from icl.data import load_data

    cfg = build_config("tiny", {"data.root": "~nosuchuser_icl/x"})
    assert "no such user" in message(load_data, cfg)


def test_checksum_file_that_is_not_utf8(omniglot_dir: Path, tmp_path: Path):
    from icl.data.omniglot import NPZ_FILES, find_source

    for name in NPZ_FILES:
        (tmp_path / name).symlink_to(omniglot_dir / name)
    (tmp_path / "SHA256SUMS").write_bytes(b"\xff\xfe" + (omniglot_dir / "SHA256SUMS").read_bytes())
    msg = message(find_source, tmp_path)
    assert "SHA256SUMS" in msg and "not UTF-8" in msg


def test_spec_beside_results_that_is_not_utf8(tmp_path: Path):
    from analysis.load import load_results
    from analysis.synthetic import make_sweep

    make_sweep(classes=(100,), weight_decays=(0.0,), seeds=(0,), steps=[100, 200]).to_csv(
        tmp_path / "results.csv", index=False)
    (tmp_path / "spec.yaml").write_bytes(b"grid:\n  seed: [0]\nname: \x80\n")
    msg = message(load_results, tmp_path)
    assert "spec.yaml" in msg and "not UTF-8" in msg


def test_results_table_that_is_not_utf8(tmp_path: Path):
    from analysis.load import load_results

    (tmp_path / "results.csv").write_bytes(b"step,icl_acc,iwl_acc,train_acc\n1,0.5,0.5,\xff\n")
    assert "not UTF-8" in message(load_results, tmp_path)


def test_run_config_that_is_not_utf8_in_analysis(tmp_path: Path):
    from analysis.load import load_results

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,icl_acc,iwl_acc,train_acc\n1,0.5,0.5,0.5\n")
    (run / "config.yaml").write_bytes(NOT_UTF8)
    assert "not UTF-8" in message(load_results, run)


def test_saved_run_config_not_utf8_refused_by_the_trainer(tmp_path: Path):
    """``icl-train`` reads a run directory's config.yaml through the same reader."""
    from icl.train.cli import main

    (tmp_path / "config.yaml").write_bytes(NOT_UTF8)
    with pytest.raises(SystemExit) as e:
        main(["--config", "tiny", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert (tmp_path / "config.yaml").read_bytes() == NOT_UTF8
    shutil.rmtree(tmp_path)
