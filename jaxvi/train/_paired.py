"""A second minibatch for every step: cells drawn from a subset, cycled over the epoch.

scvi-tools' semi-supervised loader (``ConcatDataLoader``) pairs each minibatch of the training
cells with a minibatch of a smaller loader over a subset of them (scANVI: the labelled
cells), restarting the smaller loader when it runs out. :class:`PairedCells` describes that
subset as groups of cells (each group optionally subsampled every epoch) and
:func:`paired_grid` lays one pass over it out as an explicit ``(n_steps, batch_size)`` grid,
built on the host once per epoch and passed to the compiled epoch next to the main grid
(:func:`jaxvi.train.make_train_epoch`), so nothing recompiles between epochs. The engine
knows nothing of labels: a model that reads ``Minibatch.labelled`` gives the grid its
meaning.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxvi.train._plan import steps_per_epoch

__all__ = ["PairedCells", "paired_grid", "paired_positions"]


@dataclasses.dataclass(frozen=True)
class PairedCells:
    """The cells of the second minibatch of each step (scvi-tools' ``SemiSupervisedDataLoader``).

    Attributes
    ----------
    train_groups
        Dataset rows of the paired cells among the training cells, one int array per group
        (scANVI: per class, the classes in sorted order).
    validation_groups
        The same among the validation cells (empty groups: validation minibatches are not
        paired).
    n_per_group
        At most this many cells of each group, drawn without replacement (a group with fewer
        keeps all): anew every training epoch, once per fit for validation. None: all cells.
    """

    train_groups: tuple[np.ndarray, ...]
    validation_groups: tuple[np.ndarray, ...] = ()
    n_per_group: int | None = None

    def __post_init__(self):
        """Validate ``n_per_group``; groups are stored as int64 arrays."""
        if self.n_per_group is not None and int(self.n_per_group) < 1:
            raise ValueError(f"n_samples_per_label must be >= 1 or None, got {self.n_per_group}.")
        for name in ("train_groups", "validation_groups"):
            groups = tuple(np.asarray(g, np.int64).ravel() for g in getattr(self, name))
            object.__setattr__(self, name, groups)

    def n_cells(self, part: str = "train") -> int:
        """Paired cells of one pass (after subsampling) over ``"train"`` or ``"validation"``."""
        groups = self.train_groups if part == "train" else self.validation_groups
        cap = self.n_per_group
        return int(sum(len(g) if cap is None else min(len(g), int(cap)) for g in groups))

    def rows(self, part: str, rng: np.random.Generator) -> np.ndarray:
        """The dataset rows of one pass over ``part``: groups concatenated in order, each
        subsampled to ``n_per_group`` (drawn from ``rng``) when it has more cells."""
        groups = self.train_groups if part == "train" else self.validation_groups
        cap = self.n_per_group
        out = [
            g if cap is None or len(g) < int(cap) else rng.choice(g, int(cap), replace=False)
            for g in groups
        ]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def describe(self) -> dict:
        """JSON-friendly summary (what a checkpoint must agree with)."""
        return {
            "n_train": [len(g) for g in self.train_groups],
            "n_validation": [len(g) for g in self.validation_groups],
            "n_per_group": None if self.n_per_group is None else int(self.n_per_group),
        }


def paired_grid(
    rows: np.ndarray,
    n_steps: int,
    batch_size: int,
    *,
    drop_last: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over ``rows`` cut into minibatches and cycled to fill ``n_steps`` steps.

    As ``itertools.cycle`` over a data loader: the pass (shuffled by ``rng`` when given) is
    cut into rows of ``batch_size`` (the ragged last one masked, or dropped with
    ``drop_last``); step ``i`` gets row ``i mod n_rows``, so once exhausted the same
    minibatches come again in the same order.

    Parameters
    ----------
    rows
        ``(n,)`` int dataset rows of the pass.
    n_steps
        Steps to fill (the main grid's).
    batch_size
        Cells per row.
    drop_last
        Drop the ragged last row instead of masking it.
    rng
        Shuffle the pass with it; None keeps the order (validation).

    Returns
    -------
    ``(idx, mask)``, each ``(n_steps, batch_size)``: int64 dataset rows and float32 mask.

    Raises
    ------
    ValueError
        If the pass has no row (no cells, or fewer than ``batch_size`` with ``drop_last``).
    """
    rows = np.asarray(rows, np.int64)
    if rng is not None:
        rows = rows[rng.permutation(len(rows))]
    n_rows = steps_per_epoch(len(rows), batch_size, drop_last)
    if n_rows == 0:
        raise ValueError(
            f"The paired (labelled) minibatches are empty: {len(rows)} cells with "
            f"batch_size={batch_size}" + (" and drop_last=True." if drop_last else ".")
        )
    idx = np.zeros(n_rows * batch_size, np.int64)
    mask = np.zeros(n_rows * batch_size, np.float32)
    n_used = min(len(rows), n_rows * batch_size)
    idx[:n_used] = rows[:n_used]
    mask[:n_used] = 1.0
    pick = np.arange(n_steps) % n_rows
    return idx.reshape(n_rows, batch_size)[pick], mask.reshape(n_rows, batch_size)[pick]


def paired_positions(
    idx: np.ndarray, mask: np.ndarray, cells: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """Dataset rows ``idx`` (where ``mask`` is set) as positions in a block whose ``cells``
    (dataset rows) sit at ``positions`` (:attr:`jaxvi.data.Block.cells`); masked entries
    get position 0.

    Returns
    -------
    int32 array shaped like ``idx``.

    Raises
    ------
    ValueError
        If a real row of ``idx`` is not among ``cells``.
    """
    cells = np.asarray(cells, np.int64)
    real = np.asarray(mask).ravel() > 0
    flat = np.asarray(idx, np.int64).ravel()
    out = np.zeros(flat.shape, np.int32)
    if not real.any():
        return out.reshape(np.shape(idx))
    order = np.argsort(cells, kind="stable")
    at = np.clip(np.searchsorted(cells[order], flat[real]), 0, max(len(cells) - 1, 0))
    if len(cells) == 0 or np.any(cells[order][at] != flat[real]):
        raise ValueError("Paired cells must be among the cells of the pass they are paired with.")
    out[real] = np.asarray(positions, np.int32)[order[at]]
    return out.reshape(np.shape(idx))
