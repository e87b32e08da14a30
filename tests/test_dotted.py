"""Every config hook that names user code by dotted path resolves it through `arpo_ref.dotted` and
fails early with a message naming the setting (rewards, estimators, judges, tools, environments)."""

import pytest

from arpo_ref.advantages import get_estimator
from arpo_ref.dotted import import_object
from arpo_ref.evaluate import load_judge
from arpo_ref.rewards import get_reward_fn
from arpo_ref.tasks.environment import load_environment_factory
from arpo_ref.tools.function_tool import load_function

LOADERS = {
    "reward function": get_reward_fn,
    "advantage estimator": get_estimator,
    "judge": load_judge,
    "function tool": load_function,
    "data.environment": load_environment_factory,
}


@pytest.mark.parametrize("setting", list(LOADERS))
@pytest.mark.parametrize(("path", "message"), [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("arpo_ref.dotted:no_such_name", "arpo_ref.dotted has no attribute 'no_such_name'"),
])
def test_a_bad_path_names_the_setting_and_what_is_missing(setting, path, message):
    with pytest.raises(ValueError, match=f"{setting} '{path}': {message}"):
        LOADERS[setting](path)


def test_import_object_resolves_nested_attributes_and_the_dotted_form():
    assert import_object("arpo_ref.dotted:import_object.__name__", "x") == "import_object"
    assert import_object("arpo_ref.dotted.import_object", "x", allow_dots=True) is import_object
    with pytest.raises(ValueError, match="write it as 'package.module:function'"):
        import_object("arpo_ref.dotted.import_object", "x")  # dots only where the hook allows them


@pytest.mark.parametrize("setting", ["advantage estimator", "judge", "reward function"])
def test_an_object_that_is_not_a_function_is_refused(setting):
    with pytest.raises(ValueError, match="is a str"):
        LOADERS[setting]("arpo_ref.dotted:__doc__")
