"""The seed's import path of the in-process wrappers; the door itself is
:mod:`moe_router.doors.inprocess`."""

from moe_router.doors.inprocess import *  # noqa: F403 - the public names users import
from moe_router.doors.inprocess import __all__  # noqa: F401
