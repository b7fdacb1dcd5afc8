"""The wire formats the mock upstream speaks besides chat: pure builders of bodies and SSE frames.

`proxy.mock_upstream` owns the I/O (routes, faults, stats); these modules only turn a request
body and its fault into the JSON bodies and event frames a real upstream would send.
"""
