"""The encoder variance activation (scvi-tools' ``var_activation``), by name.

scvi-tools takes any torch callable and pickles it with the model; jaxvi saves JSON, so the
model keeps a *name*: one of the built-ins below, or a name given to
:func:`register_var_activation`. ``SCVI(var_activation=...)`` accepts a name or a callable;
a built-in JAX function (``jnp.exp``, ``jax.nn.softplus``, ...) is recognised, another
callable is registered under its qualified name for this process.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "VAR_ACTIVATIONS",
    "get_var_activation",
    "register_var_activation",
    "var_activation_name",
]

VAR_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "exp": jnp.exp,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "abs": jnp.abs,
    "square": jnp.square,
}
_BUILTIN = frozenset(VAR_ACTIVATIONS)
# torch spellings a user moving code over may pass as strings
_ALIASES = {
    "torch.exp": "exp",
    "torch.nn.functional.softplus": "softplus",
    "F.softplus": "softplus",
}


def register_var_activation(name: str, fn: Callable[[jax.Array], jax.Array]) -> None:
    """Make ``fn`` (elementwise, positive outputs) available as ``var_activation=name``.

    A model saved with it loads in another process once the same name is registered there.

    Raises
    ------
    ValueError
        When ``name`` is a built-in with another function, or ``fn`` is not callable.
    """
    if not callable(fn):
        raise ValueError(f"var_activation {name!r} must be callable, got {type(fn).__name__}.")
    if name in _BUILTIN and VAR_ACTIVATIONS[name] is not fn:
        raise ValueError(f"{name!r} is a built-in var_activation and cannot be replaced.")
    VAR_ACTIVATIONS[str(name)] = fn


def var_activation_name(value: str | Callable | None) -> str:
    """The saved name of ``value``: None is ``"exp"`` (scvi-tools' default), a name must be
    known, a known function gives its name, another callable is registered under its
    ``module.qualname``."""
    if value is None:
        return "exp"
    if isinstance(value, str):
        name = _ALIASES.get(value, value)
        get_var_activation(name)
        return name
    if not callable(value):
        raise ValueError(
            f"var_activation must be a name ({sorted(VAR_ACTIVATIONS)}) or a callable, got "
            f"{type(value).__name__}."
        )
    for name, fn in VAR_ACTIVATIONS.items():
        if fn is value:
            return name
    if "torch" in str(getattr(value, "__module__", "")):
        raise ValueError(
            "var_activation is a torch function; jaxvi needs a JAX one (e.g. jnp.exp, "
            f"jax.nn.softplus) or a name from {sorted(VAR_ACTIVATIONS)}."
        )
    name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    register_var_activation(name, value)
    return name


def get_var_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The function registered as ``name``.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    try:
        return VAR_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"Unknown var_activation {name!r}; known: {sorted(VAR_ACTIVATIONS)}. A custom "
            "function must be registered in this process first with "
            "jaxvi.nn.register_var_activation(name, fn)."
        ) from None
