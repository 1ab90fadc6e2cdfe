"""Test doubles that speak the real downstream protocols (docs/contracts/).

- `downstream`: one HTTP server implementing every downstream service contract and an
  OpenAI-compatible Chat Completions endpoint, with fault injection through `/_control`.
- `process`: `running_double(**flags)` starts it as its own process for a test.
"""
