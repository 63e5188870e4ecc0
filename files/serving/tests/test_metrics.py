from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from metalserve.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_each_app_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.forward_pass("decode", 4, 0.004, {})
    assert samples(a)[("metalserve_forward_passes_total", (("phase", "decode"),))] == 1
    assert ("metalserve_forward_passes_total", (("phase", "decode"),)) not in samples(b)


def test_model_info_names_only_the_current_version() -> None:
    metrics = Metrics()
    metrics.set_model("tiny", "a" * 64)
    metrics.set_model("tiny", "b" * 64)
    info = {k: v for k, v in samples(metrics).items() if k[0] == "metalserve_model_info"}
    assert info == {("metalserve_model_info", (("model", "tiny"), ("version", "b" * 64))): 1.0}


def test_engine_observer_methods() -> None:
    metrics = Metrics()
    metrics.engine_state(running=5, waiting=3, kv_cache_usage=0.25)
    metrics.request_queued(0.02)
    metrics.first_token("chat", 0.2)
    metrics.sequence_finished("length", 7, 5)
    metrics.forward_pass("decode", 8, 0.004, {"host": 0.001, "wait": 0.003, "emit": 0.0005})
    metrics.forward_pass("decode", 6, 0.006, {"host": 0.002, "wait": 0.004, "emit": 0.0005})
    got = samples(metrics)
    decode = (("phase", "decode"),)
    host = (("part", "host"), ("phase", "decode"))
    assert got[("metalserve_forward_pass_part_seconds_count", host)] == 2
    assert abs(got[("metalserve_forward_pass_part_seconds_sum", host)] - 0.003) < 1e-9
    assert ("metalserve_forward_pass_part_seconds_count", (("part", "device"), *decode)) not in got
    assert got[("metalserve_forward_pass_duration_seconds_count", decode)] == 2
    assert abs(got[("metalserve_forward_pass_duration_seconds_sum", decode)] - 0.010) < 1e-9
    assert got[("metalserve_batch_size_sum", decode)] == 14
    assert got[("metalserve_num_requests_running", ())] == 5
    assert got[("metalserve_num_requests_waiting", ())] == 3
    assert got[("metalserve_kv_cache_usage_perc", ())] == 0.25
    assert got[("metalserve_request_queue_time_seconds_count", ())] == 1
    assert got[("metalserve_time_to_first_token_seconds_count", (("endpoint", "chat"),))] == 1
    assert got[("metalserve_prompt_tokens_total", ())] == 7
    assert got[("metalserve_generated_tokens_total", ())] == 5
    assert got[("metalserve_sequences_finished_total", (("reason", "length"),))] == 1
