"""Programs of the training loop compiled ahead of their first call, so that a compile is
announced (logged, shown on the progress bar, timed) and never hidden in an epoch's time."""

from __future__ import annotations

import jax
import numpy as np

from jaxvi._compilation import compile_ahead


class _Announced:
    """A jitted function compiled ahead (:func:`jaxvi._compilation.compile_ahead`: timed,
    logged, shown on the bar) the first time it meets a new signature of arguments, so the
    compile is never hidden in an epoch's time."""

    def __init__(self, fn, what: str, bar):
        self.fn, self.what, self.bar, self.seen = fn, what, bar, set()

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        sig = (tree, tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
        if sig not in self.seen:
            self.seen.add(sig)
            compile_ahead(self.fn, args, self.what, self.bar)
        return self.fn(*args)


def _fold(key, i: int):
    """``fold_in(key, i)``, the integer moved to the device explicitly."""
    return jax.random.fold_in(key, jax.device_put(np.int32(i)))
