from . import toy
from . import mnist
