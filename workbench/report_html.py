"""report.html: report.md as one self-contained page (plots inlined), to open from disk without a server.

The report's markdown is the workbench's own, so a small converter covers it: headings, paragraphs, pipe tables,
`- ` lists, images, **bold** and `code`. Every piece of text is HTML-escaped first: class names, file names and
error messages come from the user's files, and a page must not run what a dataset's names say. Images are
inlined only when they are PNG files of the run directory itself (no path, no link, under MAX_IMAGE_BYTES);
the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]*)\)$")
HEADING = re.compile(r"^(#{1,4}) (.*)$")
PLAIN_PNG = re.compile(r"^[\w.-]+\.png$")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #4C72B0; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef2f8; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; font-size: .9em; }
img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1rem 0; }
figcaption { color: #666; font-size: .85rem; }
.missing { color: #a00; }
"""


def render_html(markdown_text: str, run_dir: Path) -> str:
    """The page for a report: its markdown converted, its images read from `run_dir` and inlined."""
    title = next((line[2:] for line in markdown_text.splitlines() if line.startswith("# ")), "workbench report")
    body = "\n".join(_blocks(markdown_text.splitlines(), run_dir))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _blocks(lines: list[str], run_dir: Path):
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := HEADING.match(line):
            level = len(m.group(1))
            yield f"<h{level}>{_inline(m.group(2))}</h{level}>"
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            yield _table(rows)
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            yield "<ul>\n" + "\n".join(items) + "\n</ul>"
        elif m := IMAGE.match(line.strip()):
            yield _figure(m.group("alt"), m.group("src"), run_dir)
            i += 1
        else:  # a paragraph: this line (whatever it starts with), then the lines up to the next block
            paragraph = [line.strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not _starts_block(lines[i]):
                paragraph.append(lines[i].strip())
                i += 1
            yield f"<p>{_inline(' '.join(paragraph))}</p>"


def _starts_block(line: str) -> bool:
    """The same tests `_blocks` makes, so a paragraph stops exactly where another block begins."""
    return bool(HEADING.match(line)) or line.startswith(("|", "- ")) or bool(IMAGE.match(line.strip()))


def _cells(row: str) -> list[str]:
    """A pipe-table row's cells: split at the pipes that are not escaped (`\\|` is a pipe inside a cell)."""
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def _table(rows: list[str]) -> str:
    separator = len(rows) > 1 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+\s*", rows[1].strip())
    header, body = rows[0], rows[2:] if separator else rows[1:]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in _cells(header)) + "</tr></thead>",
           "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in body]
    return "\n".join(out + ["</tbody>", "</table>"])


BACKSLASHED = re.compile(r"\\([!-/:-@\[-`{-~])")  # markdown's backslash escape of an ASCII punctuation mark


def _inline(text: str) -> str:
    """Escape, then `code` and **bold** (code spans first, so their content stays literal). A backslash-escaped
    character (report.md escapes the names it takes from the user's files) is shown as itself and starts nothing."""
    escaped: list[str] = []

    def hold(m: re.Match) -> str:  # a private-use character stands in for it until the end
        escaped.append(m.group(1))
        return chr(0xE000 + len(escaped) - 1)

    parts = BACKSLASHED.sub(hold, text).split("`")
    out = []
    for k, part in enumerate(parts):
        if k % 2 and k < len(parts) - 1:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            part = html.escape(part if k % 2 == 0 else "`" + part)
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part))
    return re.sub("[\ue000-\uf8ff]", lambda m: html.escape(escaped[ord(m.group()) - 0xE000]), "".join(out))


def _figure(alt: str, src: str, run_dir: Path) -> str:
    caption = f"<figcaption>{html.escape(alt)} ({html.escape(src)})</figcaption>"
    path = run_dir / src
    if not PLAIN_PNG.match(src) or not path.is_file() or path.is_symlink():
        return f'<figure><p class="missing">image {html.escape(src)} is not in the run directory</p>{caption}</figure>'
    with open(path, "rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return f'<figure><p class="missing">image {html.escape(src)} is not a PNG of the run</p>{caption}</figure>'
    encoded = base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">{caption}</figure>'
