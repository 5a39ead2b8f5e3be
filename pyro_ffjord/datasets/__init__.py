from . import toy
