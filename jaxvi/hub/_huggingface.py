"""Transfers of hub directories to and from the Hugging Face Hub, through huggingface_hub.

huggingface_hub is the optional ``hub`` extra: it is imported on first use, never at import
time, and its absence is reported with the install command. :class:`HubModel`'s
``push_to_huggingface_hub`` and ``pull_from_huggingface_hub`` are these functions.
"""

from __future__ import annotations

import json
import os
import warnings

from jaxvi import io
from jaxvi.criticism import METRICS_FILE
from jaxvi.hub._files import CARD_FILE, LARGE_TRAINING_ADATA_FILE, METADATA_FILE, files_under
from jaxvi.hub._formats import registered_model_formats

__all__ = [
    "MAX_HF_UPLOAD_SIZE",
    "import_huggingface_hub",
    "pull_hub_directory",
    "push_hub_directory",
]

MAX_HF_UPLOAD_SIZE = 5e9  # bytes of adata.h5ad that scvi-tools refuses to upload


def import_huggingface_hub():
    """The ``huggingface_hub`` module; ``ImportError`` naming the ``hub`` extra without it."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(
            "This needs huggingface_hub: `pip install 'jaxvi[hub]'` (or `pip install "
            "huggingface_hub`)."
        ) from e
    return huggingface_hub


def push_hub_directory(
    local_dir: str,
    card_text: str,
    metadata,
    repo_name: str,
    repo_token: str | None = None,
    repo_create: bool = False,
    repo_create_kwargs: dict | None = None,
    collection_name: str | None = None,
    push_anndata: bool = True,
    **kwargs,
):
    """Upload ``card_text`` as ``README.md``, ``metadata`` (a :class:`HubMetadata`) and the
    files of ``local_dir`` to ``repo_name`` in one commit; see
    :meth:`HubModel.push_to_huggingface_hub`, which is this function.

    Returns
    -------
    The ``huggingface_hub.CommitInfo`` of the upload.
    """
    hf = import_huggingface_hub()
    adata_path = os.path.join(local_dir, io.ADATA_FILE)
    if (
        push_anndata
        and os.path.isfile(adata_path)
        and os.path.getsize(adata_path) >= MAX_HF_UPLOAD_SIZE
    ):
        raise ValueError(
            f"{adata_path} is too large to upload to the Hub (5 GB or more): host it "
            "elsewhere, set the metadata's training_data_url, and push with "
            "`push_anndata=False`."
        )
    if repo_token is not None and os.path.isfile(repo_token):
        with open(repo_token) as f:
            repo_token = f.read().strip()
    api = hf.HfApi(token=repo_token)
    if repo_create:
        api.create_repo(repo_name, **(repo_create_kwargs or {}))
    ops = [
        hf.CommitOperationAdd(CARD_FILE, card_text.encode("utf-8")),
        hf.CommitOperationAdd(
            METADATA_FILE, json.dumps(metadata.to_dict(), indent=4).encode("utf-8")
        ),
    ]
    skip = {CARD_FILE, METADATA_FILE, LARGE_TRAINING_ADATA_FILE}
    for rel in files_under(local_dir):
        if rel in skip or (not push_anndata and rel.endswith((".h5ad", ".h5mu"))):
            continue
        ops.append(hf.CommitOperationAdd(rel, os.path.join(local_dir, rel)))
    kwargs.setdefault("commit_message", f"Upload {metadata.model_cls_name} model")
    info = api.create_commit(repo_id=repo_name, operations=ops, **kwargs)
    if collection_name is not None:
        api.add_collection_item(
            collection_slug=collection_name,
            item_id=repo_name,
            item_type="model",
            exists_ok=True,
        )
    return info


def pull_hub_directory(
    repo_name: str,
    cache_dir: str | None = None,
    revision: str | None = None,
    pull_anndata: bool = True,
    **kwargs,
) -> str:
    """Download the hub files of ``repo_name`` into huggingface_hub's cache and return the
    local folder; see :meth:`HubModel.pull_from_huggingface_hub`, which is this function."""
    hf = import_huggingface_hub()
    if revision is None:
        warnings.warn(
            "No revision was passed, so the default (latest) revision will be used.",
            UserWarning,
            stacklevel=3,  # the caller of HubModel.pull_from_huggingface_hub
        )
    patterns = [METADATA_FILE, CARD_FILE, METRICS_FILE]
    for fmt in registered_model_formats().values():
        patterns += [f for f in fmt.files if f not in patterns]
    if pull_anndata:
        patterns.append(io.ADATA_FILE)
    return hf.snapshot_download(
        repo_id=repo_name,
        allow_patterns=patterns,
        cache_dir=cache_dir,
        revision=revision,
        **kwargs,
    )
