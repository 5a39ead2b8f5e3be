from . import toy
from . import mnist
from . import files
from . import freyfaces
from . import caltech
from . import omniglot
