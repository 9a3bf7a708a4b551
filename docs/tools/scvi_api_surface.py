"""List every public member of scvi-tools' ``scvi.model.SCVI`` or ``SCANVI`` (1.4.2, with
their mixins) and what jaxvi's class of the same name has of it: member present, arguments
missing, arguments added.

Run: ``python docs/tools/scvi_api_surface.py [--model scanvi] [--markdown]``. Needs scvi-tools
(the ``[ref]`` extra). The compatibility page (docs/user_guide/compatibility.md) is these lists
with the reason for every gap; ``tests/test_docs.py`` checks that it names each one.
"""

from __future__ import annotations

import argparse
import inspect
import warnings


def _kind(cls, name) -> str:
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            if isinstance(raw, property):
                return "property"
            if isinstance(raw, classmethod):
                return "classmethod"
            if isinstance(raw, staticmethod):
                return "staticmethod"
            return "method" if callable(raw) else "attribute"
    return "instance attribute"


def _owner(cls, name) -> str:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass.__name__
    return cls.__name__


def _params(obj) -> list[str] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        ("**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else "") + n
        for n, p in sig.parameters.items()
        if n not in ("self", "cls")
    ]


def _instance_names(model) -> set[str]:
    return {k for k in vars(model) if not k.startswith("_")}


def surface(model: str = "scvi") -> list[dict]:
    """One row per public member of scvi-tools' ``SCVI`` (``model="scvi"``) or ``SCANVI``
    (``"scanvi"``): class members and the attributes a fresh instance holds."""
    warnings.filterwarnings("ignore")
    import scvi

    import jaxvi

    name = {"scvi": "SCVI", "scanvi": "SCANVI"}[model]
    ref, new = getattr(scvi.model, name), getattr(jaxvi, name)
    adata = scvi.data.synthetic_iid(batch_size=32, n_genes=20, n_batches=2)
    setup = {"batch_key": "batch"}
    if model == "scanvi":
        setup.update(labels_key="labels", unlabeled_category="label_0")
    jadata = adata.copy()
    ref.setup_anndata(adata, **setup)
    ref_model = ref(adata, n_hidden=8, n_latent=2)
    new.setup_anndata(jadata, **setup)
    new_model = new(jadata, n_hidden=8, n_latent=2)
    names = {n for n in dir(ref) if not n.startswith("_")} | _instance_names(ref_model)
    names.add("__init__")  # the constructor's arguments
    have = {n for n in dir(new) if not n.startswith("_")} | _instance_names(new_model)
    have.add("__init__")
    rows = []
    for name in sorted(names):
        row = {"name": name, "kind": _kind(ref, name), "owner": _owner(ref, name)}
        row["in_jaxvi"] = name in have
        ref_obj, new_obj = getattr(ref, name, None), getattr(new, name, None)
        if callable(ref_obj) and not isinstance(ref_obj, type):
            rp = _params(ref_obj) or []
            np_ = (_params(new_obj) or []) if callable(new_obj) else []
            # a name jaxvi takes through **kwargs (accepted, ignored) still counts as missing
            row["missing_args"] = [p for p in rp if p not in np_ and not p.startswith("*")]
            row["extra_args"] = [p for p in np_ if p not in rp and not p.startswith("*")]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("scvi", "scanvi"), default="scvi")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    rows = surface(args.model)
    if args.markdown:
        print("| member | kind | scvi-tools class | in jaxvi | arguments jaxvi lacks |")
        print("|---|---|---|---|---|")
    for r in rows:
        missing = ", ".join(r.get("missing_args", [])) or ""
        if args.markdown:
            flag = "yes" if r["in_jaxvi"] else "**no**"
            print(f"| `{r['name']}` | {r['kind']} | {r['owner']} | {flag} | {missing} |")
        else:
            flag = "ok " if r["in_jaxvi"] else "-- "
            extra = f"  (missing args: {missing})" if missing else ""
            print(f"{flag}{r['name']:42s} {r['kind']:18s} {r['owner']}{extra}")
    absent = [r["name"] for r in rows if not r["in_jaxvi"]]
    partial = [r["name"] for r in rows if r.get("missing_args")]
    print(f"\n{len(rows)} members; {len(absent)} absent in jaxvi; {len(partial)} with fewer args.")


if __name__ == "__main__":
    main()
