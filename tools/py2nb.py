"""Build a Jupyter notebook from a percent-format text file (an authoring aid: edit a notebook as text, then rebuild it and run nbdev-clean).

Usage: python tools/py2nb.py SRC.py DEST.ipynb   (inverse: tools/nb2py.py)
Cells start with a line `# %%` (code) or `# %% [markdown]` (markdown). In markdown cells,
lines start with `# ` (stripped). `# %% tags=["parameters"]` adds cell tags.
"""
import json, re, sys
import nbformat
from nbformat.v4 import new_notebook, new_code_cell, new_markdown_cell

def parse(text):
    cells, cur, kind, tags = [], [], None, []
    def flush():
        if kind is None: return
        body = "\n".join(cur).strip("\n")
        if kind == "md":
            body = "\n".join(l[2:] if l.startswith("# ") else (l[1:] if l.startswith("#") else l) for l in body.split("\n"))
            cells.append(new_markdown_cell(body))
        else:
            c = new_code_cell(body)
            if tags: c.metadata["tags"] = tags
            cells.append(c)
    for line in text.split("\n"):
        m = re.match(r"^# %%( \[markdown\])?(?: tags=(\[.*\]))?\s*$", line)
        if m:
            flush()
            kind = "md" if m.group(1) else "code"
            tags = json.loads(m.group(2)) if m.group(2) else []
            cur = []
        else:
            cur.append(line)
    flush()
    return cells

src, dest = sys.argv[1], sys.argv[2]
nb = new_notebook(cells=parse(open(src).read()))
nb.metadata["kernelspec"] = {"display_name": "python3", "language": "python", "name": "python3"}
nbformat.write(nb, dest)
print(f"wrote {dest}: {len(nb.cells)} cells")
