"""scvi-tools' ``AnnDataManager`` as a small read-only view of jaxvi's registry.

jaxvi keeps its registry as one plain dict (:mod:`jaxvi.data.registry`). Code written for
scvi-tools reads it through ``model.adata_manager``: :class:`RegistryView` answers the calls
such code makes (``registry``, ``data_registry``, ``summary_stats``, ``get_state_registry``,
``get_from_registry``, ``view_registry``) from that dict and the AnnData, in scvi-tools'
shapes, and changes nothing.
"""

from __future__ import annotations

import functools
import uuid

import jax
import numpy as np
import pandas as pd

from jaxvi.data import registry as reglib
from jaxvi.io.scvi_tools import registry_to_scvi
from jaxvi.model import _saveload
from jaxvi.model._minify import LIB_KEY, MINIFY_UNS_KEY, QZM_KEY, QZV_KEY

__all__ = ["AttrDict", "RegistryMethods", "RegistryView", "hybridmethod", "view_setup"]


class AttrDict(dict):
    """A dict whose keys also read as attributes (scvi-tools' ``attrdict``), read-only."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return AttrDict(value) if isinstance(value, dict) else value

    def _refuse(self, *args, **kwargs):
        raise TypeError("This registry view is read-only.")

    __setitem__ = __delitem__ = __setattr__ = update = pop = clear = setdefault = _refuse


def _minified_fields(n_latent: int) -> dict:
    def field(attr_name, attr_key, state=None, stats=None):
        return {
            "data_registry": {"attr_name": attr_name, "attr_key": attr_key},
            "state_registry": state or {},
            "summary_stats": stats or {},
        }

    cols = {"column_names": np.arange(n_latent)}
    return {
        "latent_qzm": field("obsm", QZM_KEY, cols, {"n_latent_qzm": n_latent}),
        "latent_qzv": field("obsm", QZV_KEY, cols, {"n_latent_qzv": n_latent}),
        "observed_lib_size": field("obs", LIB_KEY),
        "minify_type": field("uns", MINIFY_UNS_KEY),
    }


class RegistryView:
    """Read-only ``AnnDataManager`` of one model and AnnData (``model.adata_manager``).

    Parameters
    ----------
    registry
        jaxvi's registry (``model.registry_``).
    adata
        The AnnData it describes (None: registry queries only).
    """

    def __init__(self, registry: dict, adata=None):
        self._jaxvi_registry = registry
        self.adata = adata
        scvi = registry_to_scvi(registry)
        if adata is not None and adata.uns.get(MINIFY_UNS_KEY) is not None:
            n_latent = int(np.shape(adata.obsm[QZM_KEY])[1])
            scvi["field_registries"].update(_minified_fields(n_latent))
        self._registry = scvi

    @property
    def registry(self) -> dict:
        """The registry in scvi-tools' layout (``setup_args``, ``field_registries``, ...)."""
        return self._registry

    @property
    def data_registry(self) -> AttrDict:
        """``{field: {"attr_name", "attr_key"}}`` of the fields read from the AnnData."""
        fields = self._registry["field_registries"]
        return AttrDict(
            {k: AttrDict(v["data_registry"]) for k, v in fields.items() if v["data_registry"]}
        )

    @property
    def summary_stats(self) -> AttrDict:
        """``n_cells``, ``n_vars``, ``n_batch``, ``n_labels``, ... as scvi-tools counts them."""
        out = {}
        for field in self._registry["field_registries"].values():
            out.update(field["summary_stats"])
        return AttrDict(out)

    def get_state_registry(self, registry_key: str) -> AttrDict:
        """The state of one field (e.g. ``"batch"``: ``categorical_mapping``,
        ``original_key``)."""
        return AttrDict(self._registry["field_registries"][registry_key]["state_registry"])

    def get_from_registry(self, registry_key: str):
        """The AnnData's data of one field, as scvi-tools returns it.

        Returns
        -------
        ``"X"``: the count matrix (``adata.X`` or the layer); ``"batch"`` / ``"labels"``:
        int ``(cells, 1)`` codes; ``"size_factor"``, ``"observed_lib_size"``: ``(cells, 1)``;
        ``"extra_categorical_covs"`` (codes) / ``"extra_continuous_covs"``: DataFrames
        ``(cells, covariates)``; ``"latent_qzm"`` / ``"latent_qzv"``: ``(cells, n_latent)``.

        Raises
        ------
        KeyError
            For a field this registry does not hold.
        ValueError
            Without an AnnData.
        """
        if registry_key not in self.data_registry:
            raise KeyError(
                f"{registry_key!r} is not in the data registry {list(self.data_registry)}."
            )
        adata = self.adata
        if adata is None:
            raise ValueError("This manager has no AnnData.")
        loc = self.data_registry[registry_key]
        if registry_key == "X":
            layer = self._jaxvi_registry["setup_args"]["layer"]
            return adata.X if layer is None else adata.layers[layer]
        if loc["attr_name"] == "uns":
            return adata.uns[loc["attr_key"]]
        if registry_key in ("latent_qzm", "latent_qzv"):
            return np.asarray(adata.obsm[loc["attr_key"]])
        if registry_key == "observed_lib_size":
            return adata.obs[LIB_KEY].to_numpy().reshape(-1, 1)
        arrays = reglib.registry_arrays(adata, self._jaxvi_registry, counts=False)
        args = self._jaxvi_registry["setup_args"]
        if registry_key == "batch":
            return arrays["batch_index"].reshape(-1, 1)
        if registry_key == "labels":
            return arrays["labels"].reshape(-1, 1)
        if registry_key == "size_factor":
            return arrays["size_factor"].reshape(-1, 1)
        if registry_key == "extra_categorical_covs":
            keys = args["categorical_covariate_keys"]
            return pd.DataFrame(arrays["cat_covs"], index=adata.obs_names, columns=keys)
        keys = args["continuous_covariate_keys"]
        return pd.DataFrame(arrays["cont_covs"], index=adata.obs_names, columns=keys)

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Print the setup arguments, summary statistics, data registry and (unless
        ``hide_state_registries``) each field's categories, as scvi-tools does."""
        print(self._text(hide_state_registries))

    def _text(self, hide_state_registries: bool) -> str:
        reg = self._registry
        lines = [f"Anndata setup with jaxvi (scvi-tools {reg['scvi_version']} layout).", ""]
        name = self._jaxvi_registry.get("model_name", "SCVI")
        lines.append(f"Setup via `{name}.setup_anndata` with arguments:")
        lines += [f"  {k}: {v!r}" for k, v in reg["setup_args"].items()]
        lines += ["", "Summary Statistics"]
        lines += [f"  {k}: {v}" for k, v in sorted(self.summary_stats.items())]
        lines += ["", "Data Registry"]
        for key, loc in self.data_registry.items():
            where = f"adata.{loc['attr_name']}"
            if loc["attr_key"] is not None:
                where += f"['{loc['attr_key']}']"
            lines.append(f"  {key}: {where}")
        if not hide_state_registries:
            for key in ("batch", "labels"):
                state = self.get_state_registry(key)
                lines += ["", f"{key} State Registry (source adata.obs['{state.original_key}'])"]
                lines += [
                    f"  {cat} -> {code}" for code, cat in enumerate(state.categorical_mapping)
                ]
            cats = self._jaxvi_registry["categorical_covariate_categories"]
            for key, values in cats.items():
                lines += ["", f"extra_categorical_covs State Registry (adata.obs['{key}'])"]
                lines += [f"  {cat} -> {code}" for code, cat in enumerate(values)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RegistryView(fields={list(self.data_registry)}, adata={self.adata is not None})"


class hybridmethod:
    """A method that also works on the class (bound to the class when called there), so
    ``SCVI.view_anndata_setup(adata)`` and ``model.view_anndata_setup()`` both work."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls if obj is None else obj)


def view_setup(model_or_cls, adata, hide_state_registries: bool) -> None:
    """Print the setup of ``adata`` (its own registry, else the model's) or of the model's
    AnnData (see :meth:`jaxvi.model.BaseModel.view_anndata_setup`)."""
    is_model = not isinstance(model_or_cls, type)
    if adata is None:
        if not is_model:
            raise ValueError("Pass the AnnData: SCVI.view_anndata_setup(adata).")
        adata = model_or_cls.adata
    registry = adata.uns.get(reglib.UNS_KEY) if adata is not None else None
    if registry is None:
        if not is_model:
            reglib.get_registry(adata)  # the error naming setup_anndata
        registry = model_or_cls.registry_
    RegistryView(registry, adata).view_registry(hide_state_registries)


class RegistryMethods:
    """The AnnData and registry accessors of scvi-tools' ``BaseModelClass``, over jaxvi's
    plain registry (``self.registry_``) and AnnData (``self._adata``)."""

    @property
    def adata(self):
        """The AnnData the model works on (None when loaded without data).

        Setting it checks the new AnnData against the registry (genes, registered columns,
        known categories), as scvi-tools does, and raises ``KeyError`` (also a
        ``ValueError``) for a missing column, ``ValueError`` otherwise.
        """
        return self._adata

    @adata.setter
    def adata(self, adata) -> None:
        if adata is None:
            raise ValueError("adata cannot be None.")
        reglib.registry_arrays(adata, self.registry_, counts=False)  # genes, columns, categories
        adata.uns[reglib.UNS_KEY] = self.registry_
        self._adata = adata

    @property
    def adata_manager(self) -> RegistryView | None:
        """A read-only view of the registry and AnnData in scvi-tools' ``AnnDataManager``
        shape (``registry``, ``data_registry``, ``summary_stats``, ``get_from_registry``,
        ``get_state_registry``, ``view_registry``); None without an AnnData."""
        return None if self._adata is None else RegistryView(self.registry_, self._adata)

    def get_anndata_manager(self, adata, required: bool = False) -> RegistryView | None:
        """The registry view of ``adata``: the model's own for ``self.adata``, else the
        registry ``adata`` was set up with. None (``ValueError`` if ``required``) when
        ``adata`` was never set up."""
        if adata is self._adata and adata is not None:
            return self.adata_manager
        registry = adata.uns.get(reglib.UNS_KEY)
        if registry is None:
            if required:
                raise ValueError("Please set up your AnnData with SCVI.setup_anndata first.")
            return None
        return RegistryView(registry, adata)

    @hybridmethod
    def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:
        """Print how an AnnData is set up: arguments, summary statistics, fields, categories.

        Works on a model (its AnnData by default) and on the class
        (``SCVI.view_anndata_setup(adata)``, which scvi-tools 1.4.2 refuses).
        """
        view_setup(self, adata, hide_state_registries)

    @staticmethod
    def view_setup_args(dir_path: str, prefix: str | None = None) -> None:
        """Print the ``setup_anndata`` arguments of a saved jaxvi or scvi-tools model."""
        registry = _saveload.saved_registry(dir_path, prefix)
        print(f"Setup via `{registry.get('model_name', 'SCVI')}.setup_anndata` with arguments:")
        for k, v in registry["setup_args"].items():
            print(f"  {k}: {v!r}")

    @property
    def registry(self) -> dict:
        """The registry in scvi-tools' layout (jaxvi's own is ``registry_``)."""
        return RegistryView(self.registry_, self._adata).registry

    def data_registry(self, registry_key: str):
        """The model's AnnData's data of one field (``adata_manager.get_from_registry``)."""
        if self._adata is None:
            raise ValueError("self.adata is None. Please register AnnData object to access data.")
        return self.adata_manager.get_from_registry(registry_key)

    def get_from_registry(self, adata, registry_key: str):
        """``adata``'s data of one field, read with the model's registry."""
        return RegistryView(self.registry_, adata).get_from_registry(registry_key)

    def get_state_registry(self, registry_key: str) -> AttrDict:
        """One field's state (e.g. ``"batch"``: ``categorical_mapping``, ``original_key``)."""
        return RegistryView(self.registry_).get_state_registry(registry_key)

    def get_setup_arg(self, setup_arg: str):
        """One ``setup_anndata`` argument (e.g. ``"batch_key"``)."""
        return self.registry_["setup_args"][setup_arg]

    def get_var_names(self, legacy_mudata_format: bool = False) -> np.ndarray:
        """The model's genes, ``(genes,)`` strings."""
        del legacy_mudata_format  # AnnData only
        return np.asarray(self.registry_["var_names"], dtype=object)

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Print the registry: setup arguments, summary statistics, data registry and each
        field's categories (unless ``hide_state_registries``), as scvi-tools does."""
        RegistryView(self.registry_, self._adata).view_registry(hide_state_registries)

    def view_setup_method_args(self) -> None:
        """Print the ``setup_anndata`` arguments."""
        print(f"Setup via `{self._model_name}.setup_anndata` with arguments:")
        for k, v in self.registry_["setup_args"].items():
            print(f"  {k}: {v!r}")

    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict:
        """The registry, in scvi-tools' layout, of a saved jaxvi or scvi-tools model."""
        return registry_to_scvi(_saveload.saved_registry(dir_path, prefix))

    @property
    def device(self) -> str:
        """The device that holds the parameters, as scvi-tools names it (``"cpu"``, ``"cuda:0"``,
        ``"tpu:0"``, ...)."""
        leaf = jax.tree_util.tree_leaves(self.variables)[0]
        dev = min(leaf.devices(), key=lambda d: d.id)
        if dev.platform == "cpu":
            return "cpu"
        return f"{'cuda' if dev.platform == 'gpu' else dev.platform}:{dev.id}"

    @property
    def get_normalized_function_name(self) -> str:
        """The expression query's name, as scvi-tools records it."""
        return "get_normalized_expression"

    @property
    def id(self) -> str:
        """A random identifier of this model object (scvi-tools' ``id``)."""
        if getattr(self, "_id", None) is None:
            self._id = str(uuid.uuid4())
        return self._id

    @property
    def run_id(self) -> str:
        """scvi-tools' run identifier (for its MLflow integration); empty in jaxvi."""
        return ""

    @property
    def run_name(self) -> str:
        """scvi-tools' run name; ``"jaxvi"``, as jaxvi writes into exported files."""
        return "jaxvi"
