"""Model files in and out, none of which runs code on load.

jaxvi's own directory format (``model.json`` + ``model.npz``; :func:`write_model_dir`,
:func:`read_model_dir`), PyTorch ``.pt`` files without torch (:mod:`jaxvi.io.torchfile`), the
scvi-tools state-dict bridge (:mod:`jaxvi.io.bridge`) and scvi-tools model directories
(:mod:`jaxvi.io.scvi_tools`).
"""

from jaxvi.io import bridge, scanvi_bridge, scvi_tools, torchfile
from jaxvi.io._npz import (
    ADATA_FILE,
    DIGEST_KEY,
    FORMAT_VERSION,
    MAX_JSON_BYTES,
    MAX_NPZ_MEMBERS,
    MODEL_JSON,
    MODEL_NPZ,
    PickleRefused,
    array_manifest,
    atomic_write,
    flatten_tree,
    meta_digest,
    read_model_dir,
    read_saved_model,
    unflatten_tree,
    write_model_dir,
)

__all__ = [
    "ADATA_FILE",
    "DIGEST_KEY",
    "FORMAT_VERSION",
    "MAX_JSON_BYTES",
    "MAX_NPZ_MEMBERS",
    "MODEL_JSON",
    "MODEL_NPZ",
    "PickleRefused",
    "array_manifest",
    "atomic_write",
    "bridge",
    "scanvi_bridge",
    "flatten_tree",
    "meta_digest",
    "read_model_dir",
    "read_saved_model",
    "scvi_tools",
    "torchfile",
    "unflatten_tree",
    "write_model_dir",
]
