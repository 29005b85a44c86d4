from __future__ import annotations

from pathlib import Path

from tasks.config import Settings
from tasks.guardrails.picture import draw
from tasks.guardrails.report import step_line, step_table
from tasks.guardrails.step import Watch, judge_step
from tests.tasks.guardrails.scripted import HEALTHY, Clock, ScriptedSource


def _settings(**rollout: object) -> Settings:
    alarms = {"min_requests": 20, "max_extension_s": 20, "check_interval_s": 1}
    return Settings.model_validate({"data": {"path": "x.jsonl"}, "rollout": {"alarms": alarms, **rollout}})


def _probe(passed: bool = True) -> tuple[bool, str, float]:
    return passed, "smoke test of deployment model-v2: 2/2 passed" if passed else "the pinned smoke test failed", 0.0


def test_without_a_bake_the_probes_decide_as_before() -> None:
    watch = Watch(None, "model-v2", "model-v1")
    step = judge_step(_settings(), 10, {"model-v1": 90, "model-v2": 10}, watch, _probe)
    assert step["passed"] and step["decided_by"] == "probes" and step["error_rate"] == 0.0
    assert "no bake" in step["note"] and watch.steps == [step]
    failed = judge_step(_settings(), 50, {"model-v1": 50, "model-v2": 50}, watch, lambda: _probe(False))
    assert not failed["passed"] and failed["reason"] == "at 50% the pinned smoke test failed"


def test_a_baked_canary_carries_the_champions_numbers_to_the_final_bake() -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (5.0, 0.0, 0.011, 0.95)})
    watch = Watch(source, "model-v2", "model-v1", origin=0.0)
    settings = _settings(strategy="canary", bake_s=30, final_bake_s=10)
    canary = judge_step(settings, 10, {"model-v1": 90, "model-v2": 10}, watch, _probe, clock=clock, sleep=clock.sleep)
    assert canary["passed"] and canary["decided_by"] == "live" and watch.reference is not None
    assert watch.reference.requests == 600
    source.rates = {"model-v2": (20.0, 0.0, 0.05, 0.95)}  # at 100%: 5x slower than the champion was
    final = judge_step(settings, 100, {"model-v2": 100}, watch, _probe, clock=clock, sleep=clock.sleep)
    assert not final["passed"] and final["verdict"]["alarm"] == "latency"
    assert final["champion_earlier"] and not canary["champion_earlier"]  # at 100% the champion takes no traffic
    assert watch.alarm is not None and watch.alarm["percent"] == 100 and watch.alarm["t"] > 30
    assert [s.percent for s in watch.samples][:1] == [10] and watch.samples[-1].percent == 100
    # The summary's table and the picture from the same record.
    table = step_table(watch.steps)
    assert table[2].startswith("| 10% | model-v1 90%, model-v2 10% | 30 | live | 150 / 600 | 0.0% / 0.0% |")
    assert "**rolled back** (latency)" in table[3] and "/ 600 (earlier)" in table[3]
    assert step_line(watch.steps[0]).startswith("- step 10%: passed (error rate 0%); 150 live requests")


def test_the_picture_is_a_png_with_the_steps_and_the_alarm(tmp_path: Path) -> None:
    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": HEALTHY, "model-v2": (5.0, 0.3, 0.01, 0.95)})
    watch = Watch(source, "model-v2", "model-v1", origin=0.0)
    judge_step(_settings(bake_s=30), 10, {"model-v1": 90, "model-v2": 10}, watch, _probe, clock=clock,
               sleep=clock.sleep)  # fmt: skip
    path = draw(watch.samples, watch.alarm, tmp_path / "rollout.png", "rollout of model-v2")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 10_000


def test_a_bake_without_live_requests_still_draws_a_legend_and_warns_nothing(tmp_path: Path) -> None:
    import warnings

    clock = Clock()
    source = ScriptedSource(clock, {})  # nobody sent a request: the metric panels stay empty
    watch = Watch(source, "model-v2", "model-v1", origin=0.0)
    judge_step(_settings(bake_s=5), 10, {"model-v1": 90, "model-v2": 10}, watch, _probe, clock=clock,
               sleep=clock.sleep)  # fmt: skip
    assert watch.samples and not any(s.stats.get("model-v2", {}).get("requests") for s in watch.samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend" reached the log
        path = draw(watch.samples, watch.alarm, tmp_path / "rollout.png", "rollout of model-v2")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_at_100_percent_the_new_deployment_is_judged_against_the_champion_at_full_load() -> None:
    """At a canary's share the champion answers faster (less queueing); at 100% the new deployment carries the
    whole load, so its latency is compared with the champion's before the rollout, when it carried it."""
    from tasks.guardrails.metrics import SECONDS_PER_TOKEN_BOUNDS, Counters, bucket_of

    clock = Clock()
    source = ScriptedSource(clock, {"model-v1": (20.0, 0.0, 0.02, 0.95)})  # all traffic: 20 ms per token
    watch = Watch(source, "model-v2", "model-v1", origin=0.0)
    watch.begin_baseline()
    clock.sleep(10)  # the new deployment is created and smoke-tested meanwhile
    watch.end_baseline(min_requests=20)
    assert watch.baseline is not None and watch.baseline.requests == 200
    counts = [0] * (len(SECONDS_PER_TOKEN_BOUNDS) + 1)
    counts[bucket_of(0.008)] = 600
    watch.reference = Counters({200: 600}, {"stop": 570, "length": 30}, counts).stats()  # the canary step's champion
    source.rates = {"model-v2": (20.0, 0.0, 0.02, 0.95)}  # at 100%: as fast as the champion was under that load
    settings = _settings(strategy="canary", bake_s=30, final_bake_s=10)
    final = judge_step(settings, 100, {"model-v2": 100}, watch, _probe, clock=clock, sleep=clock.sleep)
    assert final["passed"] and final["decided_by"] == "live", final
    assert final["champion"]["requests"] == 200 and final["champion_window"] == "before the rollout, with all traffic"
    # Against the canary step's numbers the same deployment would have tripped the latency alarm.
    watch.baseline = None
    again = judge_step(settings, 100, {"model-v2": 100}, watch, _probe, clock=clock, sleep=clock.sleep)
    assert (
        not again["passed"]
        and again["verdict"]["alarm"] == "latency"
        and again["champion_window"] == "an earlier step"
    )
