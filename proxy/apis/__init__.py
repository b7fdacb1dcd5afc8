"""Pure cores of the agent APIs (Responses, Anthropic Messages): request reading, usage, errors.

No I/O here: the request path calls these with bodies, events and bucket states.

    usage.py             reading reported counts (the one Usage type is proxy.limits.types.Usage)
    estimate.py          input-token estimates for items and content blocks (characters / 4)
    responses.py         POST /v1/responses: read the call, usage of a response, the stream meter
    anthropic.py         POST /v1/messages (+ count_tokens): read the call, usage, the stream meter
    anthropic_errors.py  Anthropic's error bodies, our errors mapped to its types, its rate-limit headers
"""
