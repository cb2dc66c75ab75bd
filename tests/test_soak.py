"""`twinroute bench soak`'s accounting: every answer is classified, faults own the requests
whose lifetime overlaps them, memory is read from /proc. (The soak itself is a benchmark.)"""

from __future__ import annotations

import json
import os

import pytest

from twinroute.bench.soak import (
    FaultWindow,
    RequestResult,
    rss_mb,
    stream_failure,
    summarize_window,
)


def sse(*events: object) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (sse({"choices": [{"text": " lorem"}]}), ""),
        (sse({"choices": [{"text": " error"}]}), ""),
        (sse({"choices": []}, {"error": {"message": "engine e0 failed"}}), "stream_error_event"),
        ('data: {"choices": []}\n\n', "stream_truncated"),
        ("data: {not json\n\ndata: [DONE]\n\n", "stream_garbled"),
    ],
    ids=["whole", "word-error-is-not-an-error", "error-event", "no-done", "garbled"],
)  # fmt: skip
def test_stream_failure_kinds(text: str, kind: str) -> None:
    assert stream_failure(text)[0] == kind


def test_a_fault_owns_requests_whose_lifetime_overlaps_it() -> None:
    window = FaultWindow(name="engine_killed", start_s=10.0, end_s=12.0)
    outcomes = [
        RequestResult(started_s=9.0, latency_s=0.5, failure="", ended_s=9.5),  # before
        RequestResult(started_s=9.8, latency_s=0.3, failure="stream_error_event", ended_s=10.1),
        RequestResult(
            started_s=16.0, latency_s=0.1, failure="", ended_s=16.1
        ),  # in the settle time
        RequestResult(started_s=17.5, latency_s=0.1, failure="", ended_s=17.6),  # after
    ]
    summary = summarize_window(window, outcomes)
    assert summary["requests_in_window"] == 2
    assert summary["failed"] == 1
    assert summary["failure_kinds"] == {"stream_error_event": 1}


def test_rss_of_this_process_and_of_none() -> None:
    mine = rss_mb(os.getpid())
    assert mine is not None and mine > 1.0
    assert rss_mb(2**22 + 12345) is None
