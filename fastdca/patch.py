"""`fastdca.patch` as a module (the function of that name shadows it on the package): the model
integration's public names, which live in `fastdca.hf`."""

from fastdca.hf import *  # noqa: F401,F403
from fastdca.hf import __all__  # noqa: F401
