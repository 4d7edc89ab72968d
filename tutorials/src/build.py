"""Build (and optionally execute) the tutorial notebooks from their sources in this folder.

Each ``NN_name.py`` here is a notebook in the "percent" format: ``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell whose lines are comment lines (``# text``). The notebook
``tutorials/NN_name.ipynb`` is generated from it, so the sources diff cleanly in review.

    python tutorials/src/build.py                 # write the .ipynb files, no outputs
    python tutorials/src/build.py --execute 01    # execute notebook(s) matching "01" in place
    PPL_LM_SMOKE=1 python tutorials/src/build.py --execute 01   # the same, on tiny LMs

Executing keeps the outputs (figures as inline PNG) in the committed notebook, so a reader on
a code host sees the results of the real (SmolLM2) run without running anything.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat

SRC = Path(__file__).resolve().parent
OUT = SRC.parent


def parse(text: str) -> list:
    """Split a percent-format source into notebook cells."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if not body:
            return
        if kind == "markdown":
            md = "\n".join(re.sub(r"^# ?", "", ln) for ln in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(md))
        else:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind = "markdown" if "[markdown]" in line else "code"
            lines = []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(src: Path) -> Path:
    """Write ``tutorials/<stem>.ipynb`` from its source.

    Outputs of code cells whose source is unchanged are carried over from the existing notebook
    (matched in order), so editing the prose does not throw away the results of a real run.
    """
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(src.read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    out = OUT / (src.stem + ".ipynb")
    if out.exists():
        old = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
        new = [c for c in nb.cells if c.cell_type == "code"]
        if [c.source for c in old] == [c.source for c in new]:
            for o, n in zip(old, new):
                n.outputs, n.execution_count = o.get("outputs", []), o.get("execution_count")
            if "ppl_lm_run" in nbformat.read(out, as_version=4).metadata:
                nb.metadata["ppl_lm_run"] = nbformat.read(out, as_version=4).metadata["ppl_lm_run"]
    nbformat.write(nb, out)
    return out


def execute(path: Path, timeout: int = 3600) -> float:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, kernel_name="python3", timeout=timeout,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    dt = time.perf_counter() - t0
    mode = "smoke" if os.environ.get("PPL_LM_SMOKE") == "1" else "real"
    nb.metadata["ppl_lm_run"] = {"mode": mode, "seconds": round(dt), "date": time.strftime("%Y-%m-%d")}
    nbformat.write(nb, path)
    return dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--execute", nargs="*", default=None, help="execute notebooks whose name contains these")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = ap.parse_args(argv)
    sources = sorted(p for p in SRC.glob("[0-9][0-9]_*.py"))
    for src in sources:
        out = build(src)
        print(f"wrote {out.relative_to(OUT.parent)}")
        if args.execute is not None and (not args.execute or any(k in src.stem for k in args.execute)):
            mode = "smoke" if os.environ.get("PPL_LM_SMOKE") == "1" else "real"
            dt = execute(out, args.timeout)
            size = out.stat().st_size / 1e6
            print(f"executed {out.name} ({mode}) in {dt:.0f} s, {size:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
