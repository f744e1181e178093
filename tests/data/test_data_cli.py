"""``icl-data``: info, prepare, sample, and every bad input as one ``error:`` line, exit 2."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icl.config import build_config
from icl.data import load_data
from icl.data.cli import main
from icl.data.omniglot import NPZ_FILES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``icl-data argv`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------- info, prepare


def test_info(capsys, omniglot_dir, session_cache_dir):
    code, out, err = run(capsys, "info", "--config", "tiny")
    assert code == 0 and err == ""
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["source"] == f"npz pair in {omniglot_dir}"
    assert fields["characters"].startswith("1623")
    assert fields["classes"].startswith("1623")
    assert fields["holdout"].startswith("23 classes")
    assert fields["training"] == "64 of 1600 available"
    assert fields["image size"] == "14 px"
    cache = Path(fields["cache"])
    assert cache.parent == session_cache_dir and cache.is_file()


def test_info_with_augmentation(capsys):
    code, out, _ = run(capsys, "info", "--config", "tiny", "--set", "data.augment=true",
                       "--set", "data.num_classes=12800")
    assert code == 0
    assert "12984" in out and "184 classes" in out and "12800 of 12800 available" in out


def test_prepare_with_data_present(capsys, session_cache_dir):
    code, out, err = run(capsys, "prepare", "--config", "tiny")
    assert code == 0 and err == ""
    assert "found npz pair" in out and "cache ready" in out and str(session_cache_dir) in out


# --------------------------------------------------------------------------- sample


@pytest.mark.parametrize("split", ["train", "icl", "iwl"])
def test_sample_writes_npz(capsys, tmp_path, split):
    out = tmp_path / f"{split}.npz"
    code, stdout, err = run(capsys, "sample", "--config", "tiny", "--split", split, "-n", "20",
                            "--out", str(out), "--set", "data.num_classes=100")
    assert code == 0 and err == "" and str(out) in stdout
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) == {"classes", "labels", "exemplars", "train_classes", "holdout_classes"}
    for k in ("classes", "labels", "exemplars"):
        assert arrays[k].shape == (20, 9) and arrays[k].dtype == np.int64
    train, held = arrays["train_classes"], arrays["holdout_classes"]
    assert train.shape == (100,) and held.shape == (23,)
    data = load_data(build_config("tiny", {"data.num_classes": 100}))
    np.testing.assert_array_equal(train, data.split.train_classes)
    np.testing.assert_array_equal(held, data.split.holdout_classes)
    expected = data.train_batch(0, 20) if split == "train" else getattr(data.eval_sets, split)[:20]
    for k in ("classes", "labels", "exemplars"):
        np.testing.assert_array_equal(arrays[k], getattr(expected, k).numpy())
    if split == "icl":
        assert np.isin(arrays["classes"], held).all() and set(np.unique(arrays["labels"])) == {0, 1}
    else:  # fixed labels: the label is the class's position in the training list
        np.testing.assert_array_equal(train[arrays["labels"]], arrays["classes"])


def test_sample_step_and_png(capsys, tmp_path):
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    code, stdout, err = run(capsys, "sample", "--config", "tiny", "--split", "train", "-n", "8",
                            "--step", "7", "--out", str(out), "--png", str(png))
    assert code == 0 and err == "" and str(png) in stdout
    data = load_data(build_config("tiny"))
    with np.load(out) as z:
        np.testing.assert_array_equal(z["classes"], data.train_batch(7, 8).classes.numpy())
    payload = png.read_bytes()
    assert payload.startswith(PNG_MAGIC) and len(payload) > 5000
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 500 and im.height > 300
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_sample_overwrites_an_existing_out_on_success(capsys, tmp_path):
    out = tmp_path / "s.npz"
    out.write_bytes(b"old")
    code, _, _ = run(capsys, "sample", "--config", "tiny", "--split", "iwl", "-n", "3", "--out", str(out))
    assert code == 0
    with np.load(out) as z:
        assert z["classes"].shape == (3, 9)


# --------------------------------------------------------------------------- bad input


def copy_data(src: Path, dst: Path, sums: bool = True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*NPZ_FILES, *(("SHA256SUMS",) if sums else ())):
        shutil.copy(src / name, dst / name)
    return dst


BAD = {
    # name: (extra argv, words the error line must contain)
    "unknown key": (["--set", "data.num_clases=5"], ["data.num_clases", "data.num_classes", "data.p_bursty"]),
    "wrong type": (["--set", "data.num_classes=many"], ["data.num_classes", "integer"]),
    "wrong bool": (["--set", "data.augment=maybe"], ["data.augment", "true or false"]),
    "p_bursty out of range": (["--set", "data.p_bursty=1.5"], ["data.p_bursty", "[0, 1]"]),
    "too many classes": (["--set", "data.num_classes=1601"], ["data.num_classes", "1600"]),
    "too many augmented classes": (["--set", "data.augment=true", "--set", "data.num_classes=12801"],
                                   ["data.num_classes", "12800"]),
    "malformed --set": (["--set", "data.num_classes"], ["key=value"]),
    "unknown preset": (["--config", "nope"], ["nope", "tiny"]),
    "missing config file": (["--config", "/nonexistent/cfg.yaml"], ["/nonexistent/cfg.yaml"]),
    "n zero": (["-n", "0"], ["-n"]),
    "n not an int": (["-n", "ten"], ["-n"]),
    "negative step": (["--step", "-1"], ["--step"]),
    "bad split": (["--split", "test"], ["--split"]),
    "eval set too small": (["--split", "icl", "-n", "129"], ["eval.n_sequences"]),
    "missing out folder": (["--out", "/nonexistent/dir/x.npz"], ["/nonexistent/dir"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_leaves_out_alone(capsys, tmp_path, case):
    extra, words = BAD[case]
    out = tmp_path / "existing.npz"
    out.write_bytes(b"precious")
    png = tmp_path / "new.png"
    opts = {"--config": "tiny", "--split": "train", "-n": "4", "--out": str(out), "--png": str(png)}
    sets = []
    for flag, value in zip(extra[::2], extra[1::2]):  # the case replaces one option or adds --set
        if flag == "--set":
            sets += [flag, value]
        else:
            opts[flag] = value
    code, _, err = run(capsys, "sample", *[x for kv in opts.items() for x in kv], *sets)
    assert_user_error(code, err, *words)
    assert out.read_bytes() == b"precious"
    assert not png.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.npz"]


def test_missing_required_argument(capsys, tmp_path):
    code, _, err = run(capsys, "sample", "--config", "tiny", "-n", "4", "--out", str(tmp_path / "x.npz"))
    assert_user_error(code, err, "--split")
    assert not (tmp_path / "x.npz").exists()
    code, _, err = run(capsys)
    assert_user_error(code, err)


@pytest.mark.parametrize("command", ["info", "sample"])
def test_data_missing_offline(capsys, tmp_path, monkeypatch, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("ICL_DATA_DIR", str(empty))
    out = tmp_path / "x.npz"
    argv = ["info", "--config", "tiny"] if command == "info" else \
        ["sample", "--config", "tiny", "--split", "train", "-n", "2", "--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, str(empty), "images_background.npz", "ICL_DATA_DIR", "icl-data prepare")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("sums", [True, False], ids=["with-sums", "no-sums"])
def test_corrupt_data_file(capsys, tmp_path, monkeypatch, omniglot_dir, damage, sums):
    """A damaged copy of the npz pair exits 2 naming the file, with or without SHA256SUMS, even
    though an intact cache of the good data exists (the cache is keyed by content)."""
    root = copy_data(omniglot_dir, tmp_path / "data", sums)
    bad = root / NPZ_FILES[0]
    data = bytearray(bad.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("ICL_DATA_DIR", str(root))
    out = tmp_path / "x.npz"
    out.write_bytes(b"precious")
    code, _, err = run(capsys, "sample", "--config", "tiny", "--split", "train", "-n", "2", "--out", str(out))
    line = assert_user_error(code, err, str(bad))
    assert ("SHA-256" in line) if sums else ("cannot read" in line)
    assert out.read_bytes() == b"precious"


def test_corrupt_cache_is_rebuilt_with_a_warning(capsys, tmp_path, omniglot_subset):
    # a small real-data pair (90 + 2 characters) keeps the rebuild cheap
    argv = ["info", "--config", "tiny", "--set", f"data.root={omniglot_subset(90, 2)}",
            "--set", f"data.cache_dir={tmp_path}", "--set", "data.n_holdout=10", "--set", "data.custom=true"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == "" and "92 x 20 drawers" in out
    npy = Path(out.split("cache:")[1].strip())
    assert npy.parent == tmp_path and npy.is_file()
    data = bytearray(npy.read_bytes())
    data[-7] ^= 0x40
    npy.write_bytes(bytes(data))
    code, out, err = run(capsys, *argv)
    assert code == 0 and err.startswith("warning:") and "checksum" in err and str(npy) in err
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == ""


# --------------------------------------------------------------------------- the console script


@pytest.mark.slow  # the installed console script, in a subprocess
def test_console_script(tmp_path):
    """The installed ``icl-data`` as a real process: bad input -> exit 2, one error line."""
    out = tmp_path / "x.npz"
    out.write_bytes(b"precious")
    exe = shutil.which("icl-data")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from icl.data.cli import main; sys.exit(main())"]
    bad = subprocess.run([*cmd, "sample", "--config", "tiny", "--split", "icl", "-n", "5", "--out", str(out),
                          "--set", "data.p_bursty=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: data.p_bursty")
    assert "Traceback" not in bad.stderr
    assert out.read_bytes() == b"precious"


# --------------------------------------------------------------------------- outputs and sizes


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--out", "{tmp}", ["--out", "is a folder"]),
        ("--png", "{tmp}", ["--png", "is a folder"]),
        ("--out", "/proc/icl.npz", ["/proc/icl.npz", "cannot write"]),
        ("--out", "{tmp}/existing.npz/x.npz", ["does not exist"]),
        ("--png", "{tmp}/existing.npz", ["same file"]),
        ("--out", "~nosuchuser_icl/x.npz", ["no such user"]),
        ("-n", "1000001", ["-n", "1000000"]),
        ("-n", "99999999999999999999", ["-n"]),
        ("--step", str(2**32), ["--step", "2^32"]),
    ],
)
def test_outputs_and_sizes_are_checked_before_work(capsys, tmp_path, monkeypatch, flag, value, words):
    import icl.data.cli as cli

    monkeypatch.setattr(cli, "load_data", lambda cfg: pytest.fail("loaded the data before checking the outputs"))
    out = tmp_path / "existing.npz"
    out.write_bytes(b"precious")
    opts = {"--config": "tiny", "--split": "train", "-n": "4", "--out": str(out), "--png": str(tmp_path / "p.png")}
    opts[flag] = value.format(tmp=tmp_path)
    code, _, err = run(capsys, "sample", *[x for kv in opts.items() for x in kv])
    assert_user_error(code, err, *words)
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["existing.npz"]


def test_read_only_output_is_refused_before_work(capsys, tmpfs):
    ro = tmpfs("64k", read_only=True)
    code, _, err = run(capsys, "sample", "--config", "tiny", "--split", "iwl", "-n", "2", "--out", str(ro / "x.npz"))
    assert_user_error(code, err, str(ro / "x.npz"), "read-only")


def test_a_failed_png_leaves_no_npz(capsys, tmp_path, monkeypatch):
    """The picture and the sequences are one result: if the PNG cannot be written, the npz
    is not either, and an existing npz keeps its content."""
    import icl.io

    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    out.write_bytes(b"precious")
    real = icl.io._write_payload

    def refuse_png(fd, tmp, data):
        if tmp.name.startswith(".s.png."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, tmp, data)

    monkeypatch.setattr(icl.io, "_write_payload", refuse_png)
    code, _, err = run(capsys, "sample", "--config", "tiny", "--split", "iwl", "-n", "2", "--out", str(out),
                       "--png", str(png))
    assert_user_error(code, err, f"cannot write {png}", "No space left", "free space")
    assert out.read_bytes() == b"precious" and not png.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_stale_temporary_of_the_output_is_removed(capsys, tmp_path):
    out = tmp_path / "s.npz"
    stale = tmp_path / ".s.npz.k1ll3d00.tmp"  # left by a sample killed while writing
    stale.write_bytes(b"half")
    code, _, _ = run(capsys, "sample", "--config", "tiny", "--split", "iwl", "-n", "2", "--out", str(out))
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_dataset_that_is_not_omniglot_needs_data_custom(capsys, tmp_path, omniglot_subset):
    root = omniglot_subset(90, 2)
    argv = ["info", "--config", "tiny", "--set", f"data.root={root}", "--set", f"data.cache_dir={tmp_path}",
            "--set", "data.n_holdout=10"]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, str(root / NPZ_FILES[0]), "90 characters", "964", "data.custom=true")
    code, out, err = run(capsys, *argv, "--set", "data.custom=true")
    assert code == 0 and "92 x 20 drawers" in out


# --------------------------------------------------------------------------- a fresh checkout


@pytest.mark.slow  # copies of the checkout, CLIs in subprocesses
def test_a_fresh_checkout_finds_shared_data_beside_it_and_offline_says_how_to_provide_it(tmp_path, omniglot_dir):
    """A copy of the checkout, run in a clean environment (no ICL_DATA_DIR): the copy of
    Omniglot in ../shared/data/omniglot is found; without it, on a machine that cannot
    download, the one error line saying how to provide the data (exit 2)."""
    from icl.data.omniglot import can_download

    proj = tmp_path / "proj"
    shutil.copytree(Path(__file__).resolve().parents[2] / "icl", proj / "icl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "omniglot").symlink_to(omniglot_dir)
    env = {k: v for k, v in os.environ.items() if k != "ICL_DATA_DIR"}
    env["PYTHONPATH"] = str(proj)

    def icl_data(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "icl.data.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    done = icl_data("info", "--config", "tiny")
    assert done.returncode == 0, done.stderr
    assert f"data root:         {shared / 'omniglot'}" in done.stdout.splitlines()

    (shared / "omniglot").unlink()
    if can_download():
        pytest.skip("this machine is online: the checkout would download Omniglot")
    done = icl_data("info", "--config", "tiny")
    assert_user_error(done.returncode, done.stderr, f"no Omniglot data under {proj / 'data'}", "icl-data prepare")
    assert not (proj / "data").exists()


# --------------------------------------------------------------------------- inputs are never outputs


@pytest.fixture
def own_data_root(tmp_path, omniglot_subset):
    """A data root of our own (the small npz pair, a SHA256SUMS, a config file beside): what
    a hostile --out/--png aims at. Never the shared dataset: a broken guard would damage it."""
    import hashlib

    root = tmp_path / "data"
    shutil.copytree(omniglot_subset(30, 2), root)
    (root / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}\n"
                                             for n in NPZ_FILES))
    config = tmp_path / "my.yaml"
    config.write_text(f"data:\n  root: {root}\n  cache_dir: {tmp_path / 'cache'}\n  custom: true\n  n_holdout: 5\n"
                      "  image_size: 14\n")
    return root, config


@pytest.mark.parametrize("flag, target", [
    ("--out", "data/images_background.npz"),
    ("--png", "data/SHA256SUMS"),
    ("--out", "data/new.npz"),  # inside the dataset's folder
    ("--png", "my.yaml"),  # the config this command reads
    ("--out", "cache/x.npz"),  # inside the image cache
])
def test_sample_never_writes_onto_its_inputs(capsys, tmp_path, own_data_root, flag, target):
    root, config = own_data_root
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    opts = {"--out": str(tmp_path / "s.npz"), "--png": str(tmp_path / "s.png"), flag: str(tmp_path / target)}
    code, _, err = run(capsys, "sample", "--config", str(config), "--split", "iwl", "-n", "2",
                       *[x for kv in opts.items() for x in kv])
    assert_user_error(code, err, flag, "which this command reads")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_sample_never_writes_through_a_link_onto_the_dataset(capsys, tmp_path, own_data_root):
    root, config = own_data_root
    link = tmp_path / "innocent.npz"
    link.symlink_to(root / NPZ_FILES[0])
    before = (root / NPZ_FILES[0]).read_bytes()
    code, _, err = run(capsys, "sample", "--config", str(config), "--split", "iwl", "-n", "2", "--out", str(link))
    assert_user_error(code, err, "--out", "which this command reads")
    assert (root / NPZ_FILES[0]).read_bytes() == before


@pytest.mark.parametrize("value, words", [("", ["--out", "not a usable path"]), ("loop", ["--out", "cannot be resolved"])])
def test_sample_refuses_an_empty_or_looping_out(capsys, tmp_path, value, words):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    out = str(loop) if value == "loop" else value
    code, _, err = run(capsys, "sample", "--config", "tiny", "--split", "iwl", "-n", "2", "--out", out)
    assert_user_error(code, err, *words)


def test_a_failed_offline_prepare_leaves_the_data_root_as_it_was(capsys, tmp_path, monkeypatch):
    """No internet (every download goes to a proxy on a closed local port): prepare fails with
    one line and leaves no half-made omniglot-py, and no data root it created."""
    for var in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for root in (existing, tmp_path / "new" / "root"):
        monkeypatch.setenv("ICL_DATA_DIR", str(root))
        code, _, err = run(capsys, "prepare", "--config", "tiny")
        assert_user_error(code, err, "downloading Omniglot into", "failed")
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "new").exists()
