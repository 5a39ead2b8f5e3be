from . import caltech, files, freyfaces, mnist, omniglot, toy

__all__ = ["caltech", "files", "freyfaces", "mnist", "omniglot", "toy"]
