"""Data generators and the package's bundled data files.

The ``.h5ad`` files in this folder are read by :mod:`jaxvi.datasets`; this package adds
:func:`synthetic_iid`, scvi-tools' synthetic test data with a seed.
"""

from jaxvi.data.synthetic import synthetic_iid

__all__ = ["synthetic_iid"]
