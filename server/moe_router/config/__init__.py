"""Configuration: config.yaml + environment + overrides -> typed, validated, frozen.

``schema`` declares every key once (type, default, variable, bounds); ``sources`` reads
the file, the environment and overrides into layers that remember where each value came
from; ``loader`` merges them in ``PRECEDENCE`` order and validates; ``environment`` holds
the few process-environment facts launchers need. Nothing outside this package reads
the environment.
"""

from moe_router.config.loader import *  # noqa: F403 - this package's public names
from moe_router.config.loader import __all__  # noqa: F401
