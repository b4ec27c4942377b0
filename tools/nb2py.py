"""Inverse of py2nb.py: write a notebook's cells as a percent-format text file.

Usage: python tools/nb2py.py NB.ipynb OUT.py
"""
import json, sys
import nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
out = []
for c in nb.cells:
    if c.cell_type == "markdown":
        out.append("# %% [markdown]")
        out.extend(("# " + l) if l else "#" for l in c.source.split("\n"))
    else:
        tags = c.metadata.get("tags")
        out.append("# %%" + (f" tags={json.dumps(tags)}" if tags else ""))
        out.extend(c.source.split("\n"))
    out.append("")
open(sys.argv[2], "w").write("\n".join(out))
