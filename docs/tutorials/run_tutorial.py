"""Run a tutorial written in Markdown: its ```python blocks in order, as notebook cells.

    python docs/tutorials/run_tutorial.py docs/tutorials/sa_plots.md

All cells share one namespace; a cell that ends in an expression prints its value, as a notebook
shows ``Out[n]``. Tracebacks point at the Markdown file's own line numbers. Matplotlib draws off
screen (Agg) unless MPLBACKEND says otherwise.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def cells(markdown: str) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown text, with the line each one's code starts on."""
    return [(markdown.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(markdown)]


def run(path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__main__"}
    for number, (line, code) in enumerate(cells(path.read_text(encoding="utf-8")), start=1):
        print(f"\nIn [{number}]:", flush=True)
        tree = ast.parse("\n" * (line - 1) + code, filename=str(path))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, str(path), "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), str(path), "eval"), namespace)
            if value is not None:
                print(repr(value), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit("usage: python docs/tutorials/run_tutorial.py <tutorial.md>")
    os.environ.setdefault("MPLBACKEND", "Agg")
    run(Path(sys.argv[1]).resolve())
