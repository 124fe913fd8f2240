"""The rule that ends a burst on evidence: it stops when the records are known, when progress
has stopped for `patience` checks, or at a ceiling, and says which; never on a step count
alone while the measures still improve."""

from __future__ import annotations

import math

import pytest

from client.learning_rule import Check, LearningRule


def feed(rule: LearningRule, series: list[tuple[float, float]], every: int = 10):
    course = rule.course()
    for i, (match, loss) in enumerate(series, start=1):
        outcome = course.observe(Check(steps=i * every, seconds=i, match=match, loss=loss))
        if outcome is not None:
            return outcome, i
    return None, len(series)


def test_stops_as_soon_as_the_records_are_known() -> None:
    rule = LearningRule(target_match=0.95, target_loss=0.2, patience=3)
    outcome, at = feed(rule, [(0.1, 3.0), (0.6, 1.0), (0.96, 0.19), (1.0, 0.01)])
    assert outcome is not None and outcome.reason == "learned" and outcome.learned
    assert at == 3 and outcome.steps == 30 and outcome.match == 0.96


def test_a_match_must_hold_over_two_checks_unless_the_loss_is_low() -> None:
    # Every answer right by argmax, but barely: one more step could flip some.
    rule = LearningRule(target_match=0.95, target_loss=0.2, patience=10)
    outcome, _ = feed(rule, [(0.5, 2.0), (1.0, 0.9)])
    assert outcome is None
    outcome, at = feed(rule, [(0.5, 2.0), (1.0, 0.9), (0.9, 0.8), (1.0, 0.7), (0.97, 0.6)])
    assert outcome is not None and outcome.reason == "learned" and at == 5
    outcome, at = feed(rule, [(0.5, 2.0), (1.0, 0.1)])
    assert outcome is not None and outcome.reason == "learned" and at == 2


def test_slow_but_steady_progress_keeps_training_past_any_small_step_count() -> None:
    rule = LearningRule(target_match=0.95, target_loss=0.2, patience=2, max_steps=10_000)
    series = [(min(0.05 * i, 0.99), 4.0 * 0.9**i) for i in range(1, 40)]
    outcome, at = feed(rule, series, every=25)
    assert outcome is not None and outcome.reason == "learned"
    assert outcome.steps > 150  # the old fixed cap would have stopped long before


def test_a_plateau_ends_after_patience_checks_without_improvement() -> None:
    rule = LearningRule(target_match=0.95, target_loss=0.1, patience=3, min_match_gain=0.01)
    series = [(0.2, 2.0), (0.5, 1.0), (0.5, 0.99), (0.505, 0.98), (0.5, 1.0), (0.9, 0.2)]
    outcome, at = feed(rule, series)
    assert outcome is not None and outcome.reason == "plateau" and at == 5
    assert outcome.best_match == 0.505 and outcome.best_loss == 0.98


def test_an_improvement_resets_patience() -> None:
    rule = LearningRule(target_match=0.99, target_loss=0.01, patience=2)
    series = [(0.2, 2.0), (0.2, 2.0), (0.3, 2.0), (0.3, 2.0), (0.3, 1.5), (0.3, 1.5)]
    outcome, at = feed(rule, series)
    assert outcome is None  # no two checks in a row without progress... until the end
    outcome, at = feed(rule, [*series, (0.3, 1.5)])
    assert outcome is not None and outcome.reason == "plateau" and at == 7


def test_ceilings_are_a_safety_net_and_are_reported() -> None:
    rule = LearningRule(target_match=0.99, target_loss=0.01, patience=100, max_steps=50)
    outcome, at = feed(rule, [(0.1 * i, 3.0 / i) for i in range(1, 10)])
    assert outcome is not None and outcome.reason == "step_ceiling" and outcome.steps == 50
    timed = LearningRule(target_match=0.99, target_loss=0.01, patience=100, max_seconds=3)
    outcome, at = feed(timed, [(0.1 * i, 3.0 / i) for i in range(1, 10)])
    assert outcome is not None and outcome.reason == "time_ceiling" and at == 3


def test_text_only_records_stop_on_loss() -> None:
    rule = LearningRule(target_match=0.95, target_loss=0.2, patience=3)
    outcome, _ = feed(rule, [(math.nan, 2.0), (math.nan, 0.5), (math.nan, 0.1)])
    assert outcome is not None and outcome.reason == "learned" and math.isnan(outcome.best_match)


def test_min_steps_holds_back_an_early_stop() -> None:
    rule = LearningRule(target_match=0.9, target_loss=0.5, min_steps=30, patience=1)
    outcome, at = feed(rule, [(1.0, 0.1), (1.0, 0.1), (1.0, 0.1)])
    assert outcome is not None and outcome.reason == "learned" and outcome.steps == 30


def test_finish_reports_the_callers_ceiling_once() -> None:
    course = LearningRule(target_match=0.99, target_loss=0.01, patience=5).course()
    check = Check(steps=7, seconds=1.0, match=0.5, loss=1.0)
    assert course.observe(check) is None
    outcome = course.finish(check)
    assert outcome.reason == "step_ceiling" and outcome.checks == 1
    assert course.finish(check) is outcome


def test_checks_are_due_every_check_every_steps() -> None:
    course = LearningRule(check_every=25).course()
    assert [s for s in range(1, 101) if course.due(s)] == [25, 50, 75, 100]


@pytest.mark.parametrize(
    "bad",
    [
        {"target_match": 0},
        {"target_match": 1.5},
        {"target_loss": 0},
        {"check_every": 0},
        {"patience": 0},
        {"min_loss_drop": 1},
        {"max_steps": 0},
        {"max_seconds": 0},
    ],
)
def test_bad_rules_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        LearningRule(**bad)


def test_a_nan_loss_is_refused() -> None:
    with pytest.raises(ValueError):
        LearningRule().course().observe(Check(1, 1.0, 0.5, math.nan))
