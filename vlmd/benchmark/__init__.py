"""`vlmd bench`: a load generator against a running server (vlmd's /generate_stream, or any
OpenAI-compatible /v1/chat/completions), reporting throughput and latency percentiles.

`dataset` builds the synthetic requests, `backends` sends one and parses its stream, `report`
turns the results into figures, `runner` schedules the requests and is the command line.
"""
