"""deploy/prometheus/alerts.yml: every expression is valid PromQL (parsed by
promql-parser, a port of Prometheus's own parser), names only metrics this service
exports, and every condition has a warning and a critical level (seed section 5.1)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import agent_orchestrator.app  # noqa: F401 - registers every metric the API exports
from agent_orchestrator.db.repositories.batches import BATCH_ITEM_KIND
from agent_orchestrator.services.batches import CALLBACK_KIND
from agent_orchestrator.services.orchestrator import CHAT_KIND

RULES_FILE = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
#: The task kinds built in: a `kind` label a rule names must be one of them.
TASK_KINDS = {CHAT_KIND, BATCH_ITEM_KIND, CALLBACK_KIND}


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def exported_series() -> set[str]:
    """The series names the service's metric families expose (a counter `x` as `x_total`,
    a histogram as its buckets, count and sum)."""
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("nooble_orchestrator_"):
            continue
        suffixes = SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_each_rule_is_valid_promql_on_exported_metrics(rule: dict[str, Any]) -> None:
    exported = exported_series()
    used = selectors(rule["expr"])
    assert used, rule["expr"]
    for selector in used:
        assert selector.name in exported, f"{selector.name} is not a metric of the service"
        for matcher in selector.matchers.matchers:
            if matcher.name == "kind":
                assert matcher.value in TASK_KINDS
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]
    assert rule["for"]


def test_every_condition_has_a_warning_and_a_critical_level() -> None:
    levels = Counter((rule["alert"], rule["labels"]["severity"]) for rule in rules())
    names = {name for name, _ in levels}
    assert len(names) >= 7
    for name in names:
        assert levels[(name, "warning")] == 1, name
        assert levels[(name, "critical")] == 1, name


def test_the_parser_refuses_what_prometheus_refuses() -> None:
    # So that a typo in the rules fails the suite rather than the Prometheus reload.
    for broken in ("sum(rate(x[5m])", "rate(x)", "x >"):
        with pytest.raises(ValueError, match=r".+"):
            promql_parser.parse(broken)
