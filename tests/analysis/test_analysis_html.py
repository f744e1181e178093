"""report.html: report.md as one page, the files it shows or links inside it; absolute paths
written relative to the report's folder."""

from __future__ import annotations

import base64
from pathlib import Path

from analysis.html import report_html
from analysis.report import relative_paths
from icl.io import all_or_nothing, atomic_write

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # the bytes, not a picture: embedded as they are


def test_files_shown_or_linked_are_embedded_others_are_kept(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "heads.png").write_bytes(PNG[::-1])
    markdown = "\n".join([
        "# A report",
        "",
        "Table: [`summary.csv`](summary.csv); [plot](run/heads.png); [web](https://example.org/x.png); "
        "[gone](missing.png); [anchor](#a-report).",
        "",
        "| cell | value |",
        "|---|---|",
        "| 10 classes, wd 1e-2 | 0.850 ± 0.014 |",
        "| a \\| b <script> | & |",
        "",
        "![curves](curves.png)",
    ])
    with all_or_nothing():  # as write_report does: the plot and the csv are not in place yet
        atomic_write(tmp_path / "curves.png", PNG)
        atomic_write(tmp_path / "summary.csv", "a,b\n1,2\n")
        page = report_html(markdown, tmp_path)
    assert "<title>A report</title>" in page
    assert f'<img alt="curves" src="data:image/png;base64,{base64.b64encode(PNG).decode()}"' in page
    csv = base64.b64encode(b"a,b\n1,2\n").decode()
    assert f'href="data:text/csv;base64,{csv}" download="summary.csv"' in page
    assert f'href="data:image/png;base64,{base64.b64encode(PNG[::-1]).decode()}" download="heads.png"' in page
    assert 'href="https://example.org/x.png"' in page and 'href="missing.png"' in page and 'href="#a-report"' in page
    assert "<td>10 classes, wd 1e-2</td>\n<td>0.850 ± 0.014</td>" in page
    assert "<td>a | b &lt;script&gt;</td>\n<td>&amp;</td>" in page  # escaped, the pipe kept


def test_relative_paths_replace_whole_paths_only(tmp_path: Path) -> None:
    exp, out = tmp_path / "storage" / "demo", tmp_path / "storage" / "demo" / "report"
    text = f"from `{exp}`; run `icl-analyze heads {exp}`; not `{exp}2` nor `{exp}.old`; `{exp}/t000/run`"
    assert relative_paths(text, [str(exp), "relative/path"], out) == (
        f"from `..`; run `icl-analyze heads ..`; not `{exp}2` nor `{exp}.old`; `../t000/run`")
