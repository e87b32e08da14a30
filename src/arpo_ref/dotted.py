"""Your own code named in a config by a dotted path: 'package.module:attribute'.

Every hook that takes one reads it here: reward functions (`reward.function`), advantage
estimators (`train.estimator`), function tools (`tools.functions`), environments
(`data.environment`) and evaluation judges (`--judge`). A path that does not resolve fails early,
with a message that names the setting and says what to fix; what the object must be (callable,
typed, documented...) is checked by the hook that uses it.
"""

from __future__ import annotations

import importlib


def import_object(path: str, setting: str, expected: str = "package.module:function",
                  allow_dots: bool = False) -> object:
    """The object named by `path` ('package.module:attribute', the attribute possibly dotted
    itself; with `allow_dots`, 'package.module.attribute' too). Raises ValueError naming
    `setting` (e.g. "function tool") and saying what could not be found."""
    module_name, colon, attribute = path.partition(":")
    if not colon and allow_dots:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"{setting} {path!r}: write it as {expected!r}")
    try:
        found = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{setting} {path!r}: cannot import {module_name!r} ({error}); "
                         "is its folder on PYTHONPATH?") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"{setting} {path!r}: {module_name} has no attribute {attribute!r}")
        found = getattr(found, part)
    return found
