"""The path of one OpenAI call, one module per stage, run in order by `gateway.py`:
authenticate, read, admit, forward, relay, settle."""
