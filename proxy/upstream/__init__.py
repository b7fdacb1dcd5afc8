"""The seam to upstream HTTP: the pooled client, the SSE parser, the headers that go on."""
