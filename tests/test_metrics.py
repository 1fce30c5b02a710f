"""/metrics through a real server: latency histograms from the http actor, ViT batch sizes from the
vision actor, the image stages' times, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_image
from tests.test_http import chat_body, generate
from tests.test_stream import stream
from vlmd.actors.http import METRICS_TIMEOUT_S
from vlmd.actors.metrics import MetricsQueries, render_metrics
from vlmd.core.histogram import Histogram
from vlmd.messages import GetMetrics, MetricsSnapshot

LATENCY_HISTOGRAMS = (
    "vlmd_time_to_first_token_seconds",
    "vlmd_inter_token_latency_seconds",
    "vlmd_e2e_request_latency_seconds",
)


def scrape(server) -> dict[str, dict[tuple, float]]:
    """metric family name -> {(sample name, sorted labels): value}"""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def histogram(families, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative (le, count) buckets, _count, _sum) of one histogram."""
    samples = families[name]
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in samples.items()
        if sample.endswith("_bucket")
    )
    return buckets, samples[(name + "_count", ())], samples[(name + "_sum", ())]


def assert_well_formed(families, name: str) -> None:
    buckets, count, total = histogram(families, name)
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), f"{name}: buckets are not cumulative"
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == count
    assert total >= 0


def test_latency_histograms_count_requests_and_tokens(mm_server):
    before = scrape(mm_server)
    lengths = [1, 4, 7]
    for n in lengths[:2]:
        response = generate(mm_server, chat_body("hello there", max_new_tokens=n, ignore_eos=True))
        assert response.json()["count_output_tokens"] == n
    assert len(stream(mm_server, chat_body("and a stream", max_new_tokens=lengths[2], ignore_eos=True))) == 7
    after = scrape(mm_server)
    delta = {name: histogram(after, name)[1] - histogram(before, name)[1] for name in LATENCY_HISTOGRAMS}
    assert delta["vlmd_time_to_first_token_seconds"] == len(lengths)
    assert delta["vlmd_e2e_request_latency_seconds"] == len(lengths)
    assert delta["vlmd_inter_token_latency_seconds"] == sum(n - 1 for n in lengths)
    for name in (*LATENCY_HISTOGRAMS, "vlmd_vit_batch_size"):
        assert_well_formed(after, name)
    assert after["vlmd_requests_queued"][("vlmd_requests_queued", ())] == 0


def test_vit_batch_sizes_add_up_to_the_images_encoded(mm_server):
    images = [base64.b64encode(make_image(460, 460, seed=seed)).decode() for seed in (70, 71)]
    before = scrape(mm_server)
    body = chat_body("<img></img><img></img> compare", max_new_tokens=2)
    body["multimodal_params"] = {"images": [{"type": "base64", "data": image} for image in images]}
    assert generate(mm_server, body).status_code == 200
    after = scrape(mm_server)
    vit_before, vit_after = (f["vlmd_vit_images"][("vlmd_vit_images_total", ())] for f in (before, after))
    buckets_before, count_before, sum_before = histogram(before, "vlmd_vit_batch_size")
    buckets_after, count_after, sum_after = histogram(after, "vlmd_vit_batch_size")
    assert vit_after - vit_before == 2 == sum_after - sum_before
    # Both images of one request are queued together: one batch of two (--visual_infer_batch_size 4).
    assert count_after - count_before == 1
    grew = [le for (le, a), (_, b) in zip(buckets_before, buckets_after, strict=True) if b > a]
    assert grew[0] == 2.0
    assert_well_formed(after, "vlmd_vit_batch_size")


def test_image_stages_are_timed_within_the_time_to_first_token(mm_server):
    """One request with an image: its preprocessing (http actor) and its wait for the ViT
    (scheduler) are counted once each and fit, one after the other, in its time to first token;
    the image's time inside a preprocess worker fits in its preprocessing, and its ViT batch in
    its wait; a text request counts in none of them."""
    parts = {
        "vlmd_image_preprocess_worker_seconds": "vlmd_image_preprocess_seconds",
        "vlmd_vit_batch_seconds": "vlmd_image_wait_seconds",
    }
    stages = ("vlmd_image_preprocess_seconds", "vlmd_image_wait_seconds", *parts)
    image = base64.b64encode(make_image(900, 600, seed=73)).decode()
    body = chat_body("<img></img> what is it", max_new_tokens=1)
    body["multimodal_params"] = {"images": [{"type": "base64", "data": image}]}
    before = scrape(mm_server)
    assert generate(mm_server, body).status_code == 200
    assert generate(mm_server, chat_body("and text", max_new_tokens=1)).status_code == 200
    after = scrape(mm_server)
    counts, sums = {}, {}
    for name in (*stages, "vlmd_time_to_first_token_seconds"):
        assert_well_formed(after, name)
        (_, count_before, sum_before), (_, count_after, sum_after) = (
            histogram(before, name),
            histogram(after, name),
        )
        counts[name], sums[name] = count_after - count_before, sum_after - sum_before
    assert counts == dict.fromkeys(stages, 1) | {"vlmd_time_to_first_token_seconds": 2}
    assert all(sums[name] > 0 for name in stages)
    assert (
        sums["vlmd_image_preprocess_seconds"] + sums["vlmd_image_wait_seconds"]
        <= sums["vlmd_time_to_first_token_seconds"]
    )
    assert all(sums[part] <= sums[whole] for part, whole in parts.items()), sums


def test_embed_cache_pins_show_while_a_request_runs_and_are_gone_when_it_ends(mm_server):
    image = base64.b64encode(make_image(300, 300, seed=72)).decode()
    body = chat_body("<img></img> a long answer", max_new_tokens=3000, ignore_eos=True)
    body["multimodal_params"] = {"images": [{"type": "base64", "data": image}]}

    def pinned() -> float:
        return scrape(mm_server)["vlmd_embed_cache_pinned_images"][("vlmd_embed_cache_pinned_images", ())]

    with requests.post(mm_server.url + "/generate_stream", json=body, stream=True, timeout=60) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the stream
        assert any(next(lines).startswith(b"data:") for _ in range(4))
        assert pinned() == 1
    deadline = time.monotonic() + 10  # the disconnect aborts the request, which releases the pin
    while pinned() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pinned() == 0


def test_rendered_histogram_buckets_are_cumulative():
    hist = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 3.0, 4.0):
        hist.observe(value)
    assert hist.counts == [2, 1, 2]  # a bucket holds the values <= its bound
    text = render_metrics({}, {"time_to_first_token_seconds": hist.snapshot()}).decode()
    assert 'vlmd_time_to_first_token_seconds_bucket{le="0.1"} 2.0' in text
    assert 'vlmd_time_to_first_token_seconds_bucket{le="1"} 3.0' in text
    assert 'vlmd_time_to_first_token_seconds_bucket{le="+Inf"} 5.0' in text
    assert "vlmd_time_to_first_token_seconds_count 5.0" in text
    assert "vlmd_time_to_first_token_seconds_sum 7.65" in text
    # Histograms nobody has reported yet are there, empty.
    assert 'vlmd_vit_batch_size_bucket{le="+Inf"} 0.0' in text


# --- a scheduler that does not answer ---------------------------------------------------------


def test_a_scrape_that_times_out_or_is_cancelled_leaves_no_query_behind():
    """A stalled responder (the scheduler busy, or gone) never answers: each scrape that gives up
    must take its entry with it, or every scrape from then on leaks one."""

    async def scenario() -> None:
        sent: list[GetMetrics] = []
        queries = MetricsQueries(sent.append)  # nothing ever answers
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await queries.ask(timeout_s=0.01)
        assert len(sent) == 3 and len(queries) == 0
        scrape = asyncio.ensure_future(queries.ask(timeout_s=60))
        await asyncio.sleep(0)
        assert len(queries) == 1
        scrape.cancel()  # the client went away mid-scrape
        with pytest.raises(asyncio.CancelledError):
            await scrape
        assert len(queries) == 0
        queries.answer(MetricsSnapshot(sent[0].query_id, {}))  # a late answer is dropped
        answered = asyncio.ensure_future(queries.ask(timeout_s=60))
        await asyncio.sleep(0)
        queries.answer(MetricsSnapshot(sent[-1].query_id, {"kv_pages_used": 3.0}))
        assert (await answered).values == {"kv_pages_used": 3.0} and len(queries) == 0

    asyncio.run(scenario())


def test_a_scrape_the_scheduler_does_not_answer_is_a_503_and_the_next_one_works(mm_server):
    scheduler = mm_server.actor_pid("scheduler")
    os.kill(scheduler, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = requests.get(mm_server.url + "/metrics", timeout=METRICS_TIMEOUT_S + 20)
        waited = time.monotonic() - started
    finally:
        os.kill(scheduler, signal.SIGCONT)
    assert response.status_code == 503 and "did not answer" in response.json()["error"]
    assert METRICS_TIMEOUT_S <= waited < METRICS_TIMEOUT_S + 5
    assert "vlmd_kv_pages_used" in scrape(mm_server)
