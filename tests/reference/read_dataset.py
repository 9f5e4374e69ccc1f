"""Reads an activation dataset the way SAELens does, with Hugging Face `datasets`
(`datasets.load_from_disk`), and writes every column, its rows stacked, to a
safetensors file (f32; `token_ids` as i64):

    python3 tests/reference/read_dataset.py DATASET_DIR OUT.safetensors

Prints one JSON line: the rows, and per column its feature and its Arrow storage type.
Nothing here shares code with the Rust writer.
"""

import json
import sys

import datasets
import numpy as np

from llama_ref import save_safetensors


def main():
    directory, out = sys.argv[1:3]
    dataset = datasets.load_from_disk(directory)
    arrays = dataset.with_format("numpy")
    tensors = {name: np.asarray(arrays[name]) for name in dataset.column_names}
    save_safetensors(out, tensors)
    schema = dataset.data.schema
    print(json.dumps({
        "rows": dataset.num_rows,
        "columns": dataset.column_names,
        "features": {name: repr(f) for name, f in dataset.features.items()},
        "storage": {
            name: str(getattr(schema.field(name).type, "storage_type", schema.field(name).type))
            for name in dataset.column_names
        },
        "files": [f["filename"] for f in dataset.cache_files],
    }))


if __name__ == "__main__":
    main()
