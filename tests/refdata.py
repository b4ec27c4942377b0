"""Loading the reference test vectors (see tests/reference/README.md)."""
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

REFERENCE_DIR = Path(os.environ.get("QACLIMS_REFERENCE_DIR", Path(__file__).parent / "reference"))


@lru_cache(maxsize=None)
def load_reference(name):
    """The arrays of `name` (an .npz) as a dict keyed 'case/field', or the parsed JSON of a .json file."""
    path = REFERENCE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"reference vectors '{path}' not found (set QACLIMS_REFERENCE_DIR or restore tests/reference/)")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def case_names(data, prefix):
    """Sorted case names such as `case00`, `case01`, ... present in an npz dict, whatever their count."""
    names = {key.split("/")[0] for key in data}
    return sorted(n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit())
