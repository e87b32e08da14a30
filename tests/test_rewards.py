"""Tests for the hierarchical reward (ARPO eq. 8): format rules, answer extraction, F1 / EM,
both reward modes, the multi-tool bonus, the registry and the `reward:` config section."""

from __future__ import annotations

import pytest

from arpo_ref.rewards import (
    REWARD_FUNCTIONS,
    RewardConfig,
    arpo_reward,
    blank_tool_results,
    exact_match,
    extract_answer,
    f1_score,
    format_error,
    get_reward_fn,
    last_boxed_content,
    normalize_answer,
    parse_golds,
    score_response,
)


def inserted(text: str) -> str:
    """A tool result exactly as the official environment inserts it."""
    return f" <result>\n{text}\n</result>"


SEARCH = "<search>capital of France</search>" + inserted("Page 1: Paris is the capital of France.")
PYTHON = "<python>print(6 * 7)</python>" + inserted("42")


def trajectory(*calls: str, answer: str = "\\boxed{Paris}") -> str:
    return "<think>plan</think>" + "".join(calls) + f"<think>done</think><answer>{answer}</answer>"


def both_modes(response: str, gold="Paris", **options) -> tuple[float, float]:
    paper = arpo_reward(response, gold, "paper", **options)
    official = arpo_reward(response, gold, "official", **options)
    return paper, official


# ---------------------------------------------------------------------------- tool results
def test_blank_tool_results_keeps_tags_and_counts_results():
    text, count = blank_tool_results(SEARCH + PYTHON)
    assert text == "<search>capital of France</search> <result></result><python>print(6 * 7)</python> <result></result>"
    assert count == 2


def test_blank_tool_results_keeps_a_result_cut_by_the_length_limit_unclosed():
    text, count = blank_tool_results("<search>q</search> <result>\nPage 1: <answer>")
    assert (text, count) == ("<search>q</search> <result>", 1)


def test_tags_inside_inserted_results_are_not_the_policys():
    """A snippet that quotes HTML-like tags must not change the format or earn the bonus.

    The official code counts these tags: it would give -1 for the second <answer> and +0.1
    for the "</python>" although the policy never ran python."""
    snippet = "Page 1: use <answer>\\boxed{Berlin}</answer> and <python>x</python> tags"
    response = trajectory("<search>tags</search>" + inserted(snippet))
    assert format_error(response, "paper") is None
    assert format_error(response, "official") is None
    assert both_modes(response) == (1.0, 1.0)
    assert extract_answer(response) == "Paris"


def test_boxed_inside_a_result_is_not_the_answer():
    response = "<think>x</think><search>q</search>" + inserted("\\boxed{Berlin}") + "<answer>Paris</answer>"
    assert extract_answer(response) == "Paris"


# ---------------------------------------------------------------------------- answer extraction
@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("\\boxed{12}", "12"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "\\left\\{ 1, 2 \\right\\}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed {7}", "7"),
        ("so $\\boxed 5$ done", "5"),
        ("\\boxed{12", None),
        ("no box here", None),
    ],
)
def test_last_boxed_content(text, content):
    assert last_boxed_content(text) == content


def test_extract_answer_prefers_boxed_in_the_answer_block():
    assert extract_answer("<answer>The answer is \\boxed{\\sqrt{2}}.</answer>") == "\\sqrt{2}"
    assert extract_answer("<answer> Paris </answer>") == "Paris"
    assert extract_answer("<answer>\\boxed{12</answer>") == "\\boxed{12"  # unbalanced: block text
    assert extract_answer("no tags, \\boxed{3}") == "3"
    assert extract_answer("no answer at all") is None
    assert extract_answer("") is None


# ---------------------------------------------------------------------------- F1 and exact match
def test_normalize_answer_follows_squad():
    assert normalize_answer("  The  Eiffel-Tower, an ICON! ") == "eiffeltower icon"
    assert normalize_answer("Amlóði") == "amlóði"


@pytest.mark.parametrize(
    ("prediction", "golds", "expected"),
    [
        ("Paris", "paris.", 1.0),
        ("Paris France", "Paris", 2 / 3),  # P = 1/2, R = 1
        ("the Eiffel Tower", "Eiffel Tower in Paris", 2 / 3),  # P = 1, R = 1/2
        ("x x y", "x y y", 2 / 3),  # overlap counts multiplicity: min(2,1) + min(1,2) = 2
        ("New York City", ["NYC", "New York"], 0.8),  # best gold: P = 2/3, R = 1
        ("Berlin", "Paris", 0.0),
        ("", "Paris", 0.0),
        ("no", "no way", 0.0),  # HotpotQA yes/no rule
        ("Yes.", "yes", 1.0),
        ("肖亮", "肖亮", 1.0),
        ("北京 大学", "北京", 2 / 3),
    ],
)
def test_f1_score_hand_computed(prediction, golds, expected):
    assert f1_score(prediction, golds) == pytest.approx(expected)


def test_exact_match():
    assert exact_match("The Beatles!", "beatles") == 1.0
    assert exact_match("Beatles band", "beatles") == 0.0
    assert exact_match("AMLÓÐI", ["x", "Amlóði"]) == 1.0
    assert exact_match("", "the") == 0.0  # an empty answer is never right


def test_parse_golds_accepts_str_list_and_json_list_of_strings():
    assert parse_golds("Paris") == ["Paris"]
    assert parse_golds(["NYC", "New York"]) == ["NYC", "New York"]
    assert parse_golds(("a", "b")) == ["a", "b"]
    assert parse_golds('["NYC", "New York"]') == ["NYC", "New York"]
    assert parse_golds(12) == ["12"]
    assert f1_score("New York", '["NYC", "New York"]') == 1.0


@pytest.mark.parametrize("gold", ["[1, 2]", "[4,\\infty)", '"Violetta"', "[]"])
def test_parse_golds_keeps_intervals_and_quoted_strings_from_the_official_parquet_whole(gold):
    """train_10k.parquet stores math intervals such as "[1, 2]": decoding them as a JSON list
    would turn one interval into two golds "1" and "2", each matching a wrong answer."""
    assert parse_golds(gold) == [gold]


def test_parse_golds_rejects_an_empty_list():
    with pytest.raises(ValueError, match="ground_truth"):
        parse_golds([])


# ---------------------------------------------------------------------------- format rules
FORMAT_CASES = {
    # name: (response, valid in paper mode, valid in official mode)
    "valid": (trajectory(SEARCH, PYTHON), True, True),
    "think unpaired": ("<think>plan" + SEARCH + "<answer>\\boxed{Paris}</answer>", False, False),
    "extra </think>": (trajectory(SEARCH).replace("done", "done</think>"), False, False),
    "no think": (SEARCH + "<answer>\\boxed{Paris}</answer>", True, False),
    "nested think": ("<think><think>a</think></think><answer>\\boxed{Paris}</answer>", False, True),
    "two answers": (trajectory(answer="\\boxed{Paris}") + "<answer>\\boxed{Rome}</answer>", False, False),
    "no </answer>": ("<think>a</think><answer>\\boxed{Paris}", False, False),
    "answer order": ("<think>a</think></answer>\\boxed{Paris}<answer>", False, False),
    "search unclosed": (trajectory("<search>q" + inserted("r")), False, False),
    "search no result": (trajectory("<search>q</search>"), False, False),
    "python unclosed": (trajectory("<python>q" + inserted("r")), False, False),
    "python no result": (trajectory("<python>q</python>"), False, False),
    "no boxed": (trajectory(SEARCH, answer="Paris"), True, False),
    "boxed unbalanced": (trajectory(SEARCH, answer="\\boxed{Paris"), True, False),
    "text after answer": (trajectory(SEARCH) + " Hope this helps.", False, True),
    "eos text after answer": (trajectory(SEARCH) + "<|im_end|>\n", True, True),
    "forged result": ("<think>a</think><result>Paris</result><answer>\\boxed{Paris}</answer>", False, True),
    "empty response": ("", False, False),
    "whitespace response": ("  \n", False, False),
}


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_each_format_rule_alone(name):
    """Each official rule violated on its own gives -1; paper mode has its own minimal rule."""
    response, paper_valid, official_valid = FORMAT_CASES[name]
    paper, official = both_modes(response)
    assert (format_error(response, "paper") is None) == paper_valid
    assert (format_error(response, "official") is None) == official_valid
    assert (paper == -1.0) == (not paper_valid)
    assert (official == -1.0) == (not official_valid)


def test_format_error_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="paper"):
        format_error("x", "papr")


# ---------------------------------------------------------------------------- modes and bonus
def test_right_answer_with_both_tools_gets_the_bonus_in_both_modes():
    assert both_modes(trajectory(SEARCH, PYTHON)) == pytest.approx((1.1, 1.1))


def test_one_tool_or_none_gets_no_bonus():
    assert both_modes(trajectory(SEARCH)) == (1.0, 1.0)
    assert both_modes(trajectory(PYTHON)) == (1.0, 1.0)
    assert both_modes(trajectory()) == (1.0, 1.0)


def test_wrong_answer_with_both_tools_paper_vs_official():
    """F1 = 0.4 (1 of 4 predicted words right, P = 1/4, R = 1) is below the paper-mode
    threshold, so the answer is wrong (0); the released code adds r_M for ANY F1 > 0."""
    response = trajectory(SEARCH, PYTHON, answer="\\boxed{Paris in Texas USA}")
    assert f1_score("Paris in Texas USA", "Paris") == pytest.approx(0.4)
    paper, official = both_modes(response)
    assert paper == 0.0
    assert official == pytest.approx(0.4 + 0.1)
    assert arpo_reward(response, "Paris", "paper", correct_threshold=0.0) == pytest.approx(0.5)


def test_partial_answer_above_threshold_is_right_in_paper_mode():
    response = trajectory(SEARCH, PYTHON, answer="\\boxed{Paris France}")
    assert both_modes(response) == pytest.approx((2 / 3 + 0.1, 2 / 3 + 0.1))


def test_totally_wrong_answer_gets_zero_and_no_bonus():
    assert both_modes(trajectory(SEARCH, PYTHON, answer="\\boxed{Berlin}")) == (0.0, 0.0)


def test_options_change_bonus_and_penalty():
    response = trajectory(SEARCH, PYTHON)
    assert arpo_reward(response, "Paris", multi_tool_bonus=0.0) == 1.0
    assert arpo_reward(response, "Paris", "official", multi_tool_bonus=0.5) == 1.5
    assert arpo_reward("", "Paris", format_penalty=-0.5) == -0.5


def test_empty_answers():
    assert both_modes("<think>a</think><answer></answer>") == (0.0, -1.0)  # official needs \boxed{}
    assert both_modes("<think>a</think><answer>\\boxed{}</answer>") == (0.0, 0.0)


def test_unicode_answers_and_multiple_golds():
    assert both_modes(trajectory(answer="\\boxed{肖亮}"), "肖亮") == (1.0, 1.0)
    assert both_modes(trajectory(answer="\\boxed{AMLÓÐI}"), "Amlóði") == (1.0, 1.0)
    golds = ["the five boroughs", "New York City", "NYC"]
    assert both_modes(trajectory(answer="\\boxed{NYC}"), golds) == (1.0, 1.0)


def test_nested_boxed_answer_is_scored_whole():
    response = trajectory(answer="so \\boxed{\\frac{1}{2}}")
    assert both_modes(response, "\\frac{1}{2}") == (1.0, 1.0)


def test_the_released_codes_own_example_scores_one_point_one():
    """The `__main__` example of the official deep_research.py: python, then search, no space
    before the results; answer 12 with both tools -> 1 + 0.1 in both modes."""
    response = (
        "<think> Let's verify with Python.\n </think><python>\nprint(12)\n</python><result>\n\n12.0\n"
        "</result><search> query </search><result> result </result><answer>The value of \\( n \\) is "
        "\\(\\boxed{12}\\). Both confirm that n = 12.</answer>"
    )
    outcome = score_response(response, "12", "official")
    assert (outcome.answer, outcome.tools_used) == ("12", ("python", "search"))
    assert both_modes(response, "12") == pytest.approx((1.1, 1.1))


def test_score_response_reports_its_parts():
    outcome = score_response(trajectory(SEARCH, answer="\\boxed{Paris France}"), "Paris")
    assert outcome.format_error is None
    assert outcome.answer == "Paris France"
    assert outcome.f1 == pytest.approx(2 / 3)
    assert (outcome.tools_used, outcome.bonus) == (("search",), False)
    bad = score_response("", "Paris", "official")
    assert (bad.reward, bad.answer, bad.f1) == (-1.0, None, 0.0)
    assert bad.format_error == "no <think> block"


# ---------------------------------------------------------------------------- registry
def test_reward_functions_registry():
    assert set(REWARD_FUNCTIONS) == {"paper", "official"}
    response = trajectory(SEARCH, PYTHON, answer="\\boxed{Paris in Texas USA}")
    assert get_reward_fn("paper")(response, "Paris") == 0.0
    assert get_reward_fn("official")(response, "Paris") == pytest.approx(0.5)


@pytest.mark.parametrize("path", ["arpo_ref.rewards:arpo_reward", "arpo_ref.rewards.arpo_reward"])
def test_get_reward_fn_imports_a_dotted_path(path):
    assert get_reward_fn(path) is arpo_reward
    assert arpo_reward(trajectory(), "Paris", mode=path) == 1.0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("papr", "valid names: paper, official"),
        ("no_such_package_xyz.rewards:score", "cannot import 'no_such_package_xyz.rewards'"),
        ("arpo_ref.rewards:no_such_function", "has no attribute 'no_such_function'"),
        ("arpo_ref.rewards:", "write it as"),
        ("arpo_ref.rewards:RewardConfig.__doc__", "is a str; name a function"),
    ],
)
def test_get_reward_fn_failures_say_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message):
        get_reward_fn(name)


# ---------------------------------------------------------------------------- config
def test_reward_config_defaults_are_the_papers():
    config = RewardConfig()
    config.validate()
    assert (config.mode, config.multi_tool_bonus, config.format_penalty) == ("paper", 0.1, -1.0)


def test_reward_config_fields_have_docstrings():
    import ast
    import inspect

    body = ast.parse(inspect.getsource(RewardConfig)).body[0].body
    for index, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            following = body[index + 1]
            assert isinstance(following, ast.Expr) and isinstance(following.value.value, str), node.target.id


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "papr"),
        ("mode", "no_such_package_xyz:score"),
        ("multi_tool_bonus", -0.1),
        ("multi_tool_bonus", float("nan")),
        ("format_penalty", 1.0),
        ("format_penalty", "minus one"),
        ("correct_threshold", 1.5),
        ("correct_threshold", True),
    ],
)
def test_reward_config_validate_names_the_field(field, value):
    config = RewardConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):
        config.validate()


def test_reward_config_builds_a_bound_reward_fn():
    response = trajectory(SEARCH, PYTHON)
    assert RewardConfig(multi_tool_bonus=0.0).build_reward_fn()(response, "Paris") == 1.0
    assert RewardConfig(mode="official", format_penalty=-2.0).build_reward_fn()("", "Paris") == -2.0
    assert RewardConfig(mode="arpo_ref.rewards:arpo_reward").build_reward_fn() is arpo_reward


# ---------------------------------------------------------------------------- every registered tool
CALCULATOR = "<calculator>6 * 7</calculator>" + inserted("42")
WEATHER = "<weather>Paris</weather>" + inserted("sunny </python> <answer>\\boxed{Rome}</answer>")


def test_a_calculator_trajectory_scores_like_a_python_one_in_both_modes():
    """Regression (issue 13): answers.py and rewards.py hard-coded `search|python` as the tool
    tags, so in paper mode a correct trajectory that used the calculator scored -1.0 (its
    `</calculator> <result>` was read as a forged result) while the same one with python scored
    1.0; in official mode the tags inside a calculator result counted as the policy's."""
    assert both_modes(trajectory(CALCULATOR)) == both_modes(trajectory(PYTHON)) == (1.0, 1.0)


def test_a_users_own_tool_is_read_from_the_names_it_is_registered_under():
    """A tool registered as `weather`: its result (which here contains a closing tool tag and a
    rival answer) is blanked in both modes once its name is passed, as the registry's names are."""
    response = trajectory(WEATHER)
    names = ("search", "python", "weather")
    assert [arpo_reward(response, "Paris", mode, tool_names=names) for mode in ("paper", "official")] == [1.0, 1.0]
    assert extract_answer(response, names) == "Paris"
    assert arpo_reward(response, "Paris", "paper") == -1.0  # not a registered tool: forged <result>


def test_official_multi_tool_bonus_keeps_the_released_pair_paper_counts_any_two_tools():
    """The released r_M names search and python; paper mode reads eq. 8 as 'two different tools'."""
    paper, official = both_modes(trajectory(SEARCH, CALCULATOR))
    assert paper == pytest.approx(1.1) and official == pytest.approx(1.0)


def test_a_stop_token_with_text_after_the_closing_tag_still_counts_as_an_answered_call():
    """Regression (issue 13): one token `>.` completes `</search>`, so the policy's text reads
    `</search>.` and the result is inserted after the dot. The inserted-result rule accepted only
    whitespace there, so the result looked forged and the leaf scored -1."""
    response = trajectory("<search>capital of France</search>." + inserted("Paris is the capital."))
    assert both_modes(response) == (1.0, 1.0)


def test_a_calculator_trajectory_is_scored_like_python():
    """Bug: answers.py hard-coded `</(?:search|python)>\\s*<result>` and the format rule listed
    search|python again, so the calculator's inserted result counted as a forged one: a right
    calculator trajectory scored -1.0 in paper mode while the same one with python scored 1.0."""
    assert both_modes(trajectory(CALCULATOR)) == both_modes(trajectory(PYTHON)) == (1.0, 1.0)


def test_tags_inside_a_calculator_result_are_not_the_policys():
    """Bug: in official mode a `<answer>` inside a calculator result counted as the policy's."""
    response = trajectory("<calculator>1</calculator>" + inserted("<answer>\\boxed{Rome}</answer>"))
    assert both_modes(response) == (1.0, 1.0)
    assert extract_answer(response) == "Paris"


def test_a_users_own_tool_is_scored_when_its_name_is_passed():
    lookup = "<lookup>France</lookup>" + inserted("Paris <answer>")
    response = trajectory(lookup)
    assert both_modes(response, tool_names=["lookup"]) == (1.0, 1.0)
    assert both_modes(response) == (-1.0, -1.0)  # not a registered tool: its result looks forged
    assert RewardConfig().build_reward_fn(["lookup", "search"])(response, "Paris") == 1.0


def test_multi_tool_bonus_paper_any_two_tools_official_only_search_and_python():
    """Paper mode: r_M for two different tools; official keeps the released search+python rule."""
    assert both_modes(trajectory(SEARCH, CALCULATOR)) == pytest.approx((1.1, 1.0))
    assert both_modes(trajectory(SEARCH, PYTHON, CALCULATOR)) == pytest.approx((1.1, 1.1))
    assert both_modes(trajectory(CALCULATOR, CALCULATOR)) == (1.0, 1.0)


def test_text_the_stop_token_carried_after_the_closing_tag_precedes_the_result():
    """A stop token `>.` leaves "</search>." before the inserted result; it is still a result."""
    response = trajectory("<search>q</search>." + inserted("Page 1: <answer>x</answer>"))
    assert blank_tool_results(response)[1] == 1
    assert both_modes(response) == (1.0, 1.0)
