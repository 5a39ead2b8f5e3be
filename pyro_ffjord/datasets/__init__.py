"""Data sets as tensors, read from their published files (nothing is downloaded).

Every data set module has one entry, ``load(data_dir, ...)``, returning its splits
(:class:`mnist.MNISTSplits`, :class:`freyfaces.FreyFacesSplits`, :class:`caltech.CaltechSplits`,
:class:`omniglot.OmniglotSplits`); ``toy`` samples the 2-D toy densities; ``tabular.load(name, ...)``
returns :class:`tabular.TabularSplits` of the FFJORD paper's tabular sets (POWER, GAS, HEPMASS,
MINIBOONE, BSDS300: ``maf_tabular`` reads MAF's files with MAF's preprocessing) or of the bundled
``breast_cancer`` table. Shared pieces:
``files`` (finding, reading and checking files; the errors), ``binarize`` (static and dynamic
binarization), ``matfile`` (images from MATLAB files), ``idx`` and ``amat`` (the two MNIST file
formats).
"""

from . import amat, binarize, caltech, files, freyfaces, idx, maf_tabular, matfile, mnist, omniglot, tabular, toy

__all__ = [
    "amat", "binarize", "caltech", "files", "freyfaces", "idx", "maf_tabular", "matfile", "mnist", "omniglot",
    "tabular", "toy",
]
