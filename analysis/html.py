"""``report.html``: the report as one self-contained page, to send or attach as one file.

The page is ``report.md`` converted by Python-Markdown (its ``tables`` extension: the
report's summary and verdict tables are GitHub-style pipe tables), with every file the
report links or shows (the PNG plots, ``summary.csv``, a run's circuit plots) put inside it
as a base64 ``data:`` URI. Why Python-Markdown rather than a converter of our own: the
report is written by several modules (the verdict, the summary, the circuits section) and
grows; a small maintained converter renders whatever Markdown they write, escaping
included, where a hand-made one would silently mis-render the first construct it lacks.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

from icl.io import staged

# a plain, printable page; wide tables scroll instead of squeezing their columns
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; line-height: 1.45; color: #222;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
"""

_REFERENCE = re.compile(r'(?P<attr>src|href)="(?P<url>[^"]*)"')
_TITLE = re.compile(r"<h1>(.*?)</h1>", re.S)


def report_html(markdown_text: str, folder: Path) -> str:
    """The page for ``markdown_text`` (a report written into ``folder``): every relative
    link or image naming a file that exists is embedded; other references are kept."""
    import markdown  # only when a report is written

    md = markdown.Markdown(extensions=["tables"], output_format="html")
    md.preprocessors.deregister("html_block")  # text, never markup: a path or a value with "<" stays text
    md.inlinePatterns.deregister("html")
    body = md.convert(markdown_text)
    body = _REFERENCE.sub(lambda m: _embedded(m, Path(folder)), body)
    title = _TITLE.search(body)
    title_text = re.sub(r"<[^>]+>", "", title.group(1)) if title else "report"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title_text}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _embedded(m: re.Match[str], folder: Path) -> str:
    """One ``src=``/``href=`` attribute with the file it names inside it as a data URI."""
    attr, url = m.group("attr"), html.unescape(m.group("url"))
    if not url or re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I) or url.startswith(("#", "/")):
        return m.group(0)  # a web address, an anchor, an absolute path: not ours to embed
    path = staged(folder / url)  # a file of this report may still be in its temporary
    if not path.is_file():
        return m.group(0)
    mime = mimetypes.guess_type(url)[0] or "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    out = f'{attr}="data:{mime};base64,{data}"'
    if attr == "href":  # a link to a file (summary.csv): saved under its own name when clicked
        out += f' download="{html.escape(Path(url).name)}"'
    return out


__all__ = ["report_html", "STYLE"]
