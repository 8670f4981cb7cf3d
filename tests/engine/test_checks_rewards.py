"""Question extraction, rule checks (length, words, leakage over all aliases, distinct searches) and rewards."""

import pytest

from ssp.engine.checks import SearchRecord, check_question, count_answer_tags, extract_answer, extract_question, leaks
from ssp.engine.config import ChecksConfig, GameConfig
from ssp.engine.rewards import proposer_reward, solver_accuracy, solver_reward, zero_variance

Q = "Which river flows through the capital of the country where the painter of this mural was born?"
TWO = [SearchRecord("mural painter", 3), SearchRecord("painter birthplace", 3)]


def test_extract_first_question_block() -> None:
    text = "<think>x</think><question>  first one </question> then <question>second</question>"
    assert extract_question(text) == "first one"
    assert extract_question("no tags here") is None
    assert extract_question("<question>   </question>") is None
    assert extract_question("<question>multi\nline</question>") == "multi\nline"


def test_extract_last_answer_and_count_tags() -> None:
    assert extract_answer("<answer>a</answer> <answer> b </answer>") == "b"
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("<answer> <think>sure</think> <answer> Paris </answer>") == "Paris"  # a prefilled opener
    assert extract_question("<question> <question> Who wrote it? </question>") == "Who wrote it?"
    assert count_answer_tags("<answer>" * 12 + "x</answer>") == 12


def test_valid_question_passes() -> None:
    assert check_question(Q, ["Danube"], TWO, ChecksConfig()) == []


def test_length_and_word_rules() -> None:
    cfg = ChecksConfig()
    assert "too_short" in check_question("short?", ["x"], TWO, cfg)
    assert "too_few_words" in check_question("one two three four five six", ["x"], TWO, cfg)
    assert "too_long" in check_question("word " * 300, ["x"], TWO, cfg)


def test_leakage_checks_every_alias_case_insensitively() -> None:
    # SSP's reference code compared only one spelling, and crashed (silently) on list-typed answers.
    aliases = ["United States of America", "USA"]
    assert leaks("Which country, the usa or another, ...", aliases)
    assert "answer_leak" in check_question(Q + " (hint: the USA)", aliases, TWO, ChecksConfig())
    assert not leaks(Q, aliases)


def test_leakage_in_search_queries_is_configurable() -> None:
    searches = [SearchRecord("danube river", 3), SearchRecord("painter birthplace", 3)]
    assert "answer_in_search" in check_question(Q, ["Danube"], searches, ChecksConfig())
    assert check_question(Q, ["Danube"], searches, ChecksConfig(leak_in_search_queries=False)) == []


def test_needs_distinct_searches_with_results() -> None:
    cfg = ChecksConfig()
    same = [SearchRecord("Mural painter", 3), SearchRecord("mural   painter", 3)]
    assert "too_few_searches" in check_question(Q, ["x"], same, cfg)
    empty = [SearchRecord("a b", 0), SearchRecord("c d", 3)]
    assert "too_few_searches" in check_question(Q, ["x"], empty, cfg)
    assert check_question(Q, ["x"], [], ChecksConfig(min_searches=0)) == []


def test_solver_reward_rules() -> None:
    cfg = GameConfig()
    assert solver_reward(True, 1, cfg) == 1.0
    assert solver_reward(False, 1, cfg) == 0.0
    assert solver_reward(True, 10, cfg) == 1.0
    assert solver_reward(True, 11, cfg) == 0.25  # tag spam: more than 10 answer tags
    assert solver_reward(False, 11, cfg) == 0.0


def test_proposer_reward_is_one_minus_accuracy_or_invalid_reward() -> None:
    cfg = GameConfig(invalid_reward=-0.5)
    # the judge's verdicts: a tag-spam answer (rewarded 0.25) is still correct, so it counts as solved
    assert proposer_reward(True, [], [True, False, True, False, False], cfg) == pytest.approx(0.6)
    assert proposer_reward(True, [], [False] * 5, cfg) == 1.0
    assert proposer_reward(False, ["no_question"], [], cfg) == -0.5
    assert solver_accuracy([True, False]) == 0.5
    with pytest.raises(ValueError, match="empty group"):
        solver_accuracy([])


def test_graded_invalid_rewards_pay_for_getting_further() -> None:
    cfg = GameConfig(invalid_reward=-1.0, invalid_reward_by_stage={"failed_checks": -0.6, "failed_verification": -0.3})
    assert proposer_reward(False, ["no_question"], [], cfg) == -1.0  # not listed: invalid_reward
    assert proposer_reward(False, ["too_few_words", "answer_leak"], [], cfg) == -0.6
    assert proposer_reward(False, ["failed_verification"], [], cfg) == -0.3
    with pytest.raises(ValueError, match=r"unknown stages \['no_answer'\]; the stages are no_question"):
        GameConfig(invalid_reward_by_stage={"no_answer": 0.0})


def test_zero_variance() -> None:
    assert zero_variance([1.0] * 5) and zero_variance([0.0] * 5)
    assert not zero_variance([1.0, 0.0, 0.0, 0.0, 0.0])
