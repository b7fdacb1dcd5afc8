"""GET /v1/responses/{id}?stream=true (with `starting_after`): a stored response's events again,
through the proxy by the official OpenAI SDK: uvicorn on a real port, the mock upstream on another.

The upstream's events are relayed as they arrive, unchanged, to keys of the team that created the
response only (others get 404 and the upstream never hears of it); the read counts one request,
holds its parallel slot until the last byte and is charged nothing; a stream the upstream breaks
ends with an `error` event, and a client that leaves closes the upstream request and settles.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.support.configs import KEYS, make_config

PROMPT = "x" * 40


def limits(**values: int):
    def patch(data: dict) -> None:
        data["keys"]["alice"]["limits"] = values

    return patch


@pytest.fixture
def server(mock_upstream, start_proxy):
    server, recorder = start_proxy(make_config(mock_upstream.url, patch=limits(rpm=1000, max_parallel=1)))
    server.recorder = recorder
    return server


def oai(server, key: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[key], max_retries=0)


def fault(**fields: object) -> dict[str, str]:
    return {"x-mock-fault": json.dumps(fields)}


def created(server) -> str:
    with oai(server) as sdk:
        return sdk.responses.create(model="chat-model", input=PROMPT).id


def test_the_events_come_again_unchanged_from_any_sequence_number(server, mock_upstream):
    response_id = created(server)
    with oai(server) as sdk:
        replayed = sdk.responses.with_raw_response.retrieve(response_id, stream=True)
        events = list(replayed.parse())
        later = list(sdk.responses.retrieve(response_id, stream=True, starting_after=10))
    assert replayed.headers["content-type"].startswith("text/event-stream")
    assert replayed.headers["x-ratelimit-limit-requests"] == "1000"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert (events[0].type, events[-1].type) == ("response.created", "response.completed")
    assert [e.model_dump() for e in later] == [e.model_dump() for e in events[11:]]
    sent = mock_upstream.requests[-1]
    assert (sent["method"], sent["path"], sent["query"]) == (
        "GET",
        f"/v1/responses/{response_id}",
        "starting_after=10&stream=true",  # the client's query, as it sent it
    )
    direct = httpx.get(f"{mock_upstream.url}/responses/{response_id}", params={"stream": "true"}).text
    through = httpx.get(
        f"{server.base_url}/responses/{response_id}",
        params={"stream": "true"},
        headers={"authorization": f"Bearer {KEYS['alice']}"},
    ).text
    assert through == direct  # byte for byte, `event:` lines included
    server.wait_settled()
    reads = [o for o in server.recorder.outcomes if o.finished_at][1:]
    assert [(o.status, o.stream, o.cost_micros, o.usage.total_tokens) for o in reads] == [(200, True, 0, 0)] * 3


def test_the_creating_team_only(server, mock_upstream):
    response_id = created(server)
    with oai(server, "bob") as same_team:
        assert list(same_team.responses.retrieve(response_id, stream=True))[-1].type == "response.completed"
    before = len(mock_upstream.requests)
    with oai(server, "carol") as other_team:
        for response in (response_id, "resp_never_seen"):
            with pytest.raises(openai.NotFoundError) as missing:
                other_team.responses.retrieve(response, stream=True)
            assert missing.value.body["message"] == f"No response found with id '{response}'."
    assert len(mock_upstream.requests) == before, "another team's read reached the upstream"


def test_events_are_relayed_as_they_arrive(server, mock_upstream):
    response_id = created(server)
    mock_upstream.add_faults([{"chunk_delay_s": 0.3}])
    started = mock_upstream.stats()["streams_completed"]
    with oai(server) as sdk:
        stream = iter(sdk.responses.retrieve(response_id, stream=True, starting_after=16))
        first = next(stream)
        assert mock_upstream.stats()["streams_completed"] == started, "the first event waited for the whole stream"
        rest = list(stream)
    assert [first.sequence_number, *(e.sequence_number for e in rest)] == list(range(17, 24))


def test_a_broken_replay_ends_with_an_error_event_and_is_charged_nothing(server, mock_upstream):
    response_id = created(server)
    mock_upstream.add_faults([{"cut_after_chunks": 2}])
    with oai(server) as sdk:
        events = list(sdk.responses.retrieve(response_id, stream=True, starting_after=5))
    assert [e.type for e in events] == ["response.output_text.delta"] * 2 + ["error"]
    assert events[-1].sequence_number == 8
    assert events[-1].message == "The upstream stream was interrupted before it finished."
    mock_upstream.add_faults([{"cut_after_chunks": 0}])
    with oai(server) as sdk:
        (error,) = list(sdk.responses.retrieve(response_id, stream=True, starting_after=5))
    assert (error.type, error.sequence_number) == ("error", 6)  # after the one the client had
    server.wait_settled()
    reads = [o for o in server.recorder.outcomes if o.finished_at][1:]
    assert [(o.stream_error, o.cost_micros) for o in reads] == [("stream_cut", 0)] * 2


def test_a_client_that_leaves_settles_and_frees_its_parallel_slot(server, mock_upstream):
    response_id = created(server)
    mock_upstream.add_faults([{"chunk_delay_s": 0.5}])
    with oai(server) as sdk:
        stream = sdk.responses.retrieve(response_id, stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):  # max_parallel 1: the replay holds the slot
            sdk.responses.retrieve(response_id)
        stream.close()
        deadline = time.monotonic() + 5
        while mock_upstream.stats()["streams_cancelled"] == 0:  # the upstream request was closed
            assert time.monotonic() < deadline, "the upstream request outlived the client"
            time.sleep(0.01)
        server.wait_settled()
        assert sdk.responses.retrieve(response_id).id == response_id
    (replay,) = [o for o in server.recorder.outcomes if o.stream]
    assert replay.client_gone and replay.cost_micros == 0


@pytest.mark.parametrize("after", ["x", "-1", "\u00b2", "9" * 5000, ""])
def test_a_bad_starting_after_is_the_upstreams_to_refuse(server, after):
    response_id = created(server)
    reply = httpx.get(
        f"{server.base_url}/responses/{response_id}",
        params={"stream": "true", "starting_after": after},
        headers={"authorization": f"Bearer {KEYS['alice']}"},
    )
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
