"""Prometheus metrics of one served ensemble (GET /metrics).

Each app gets its own registry, so several servers (tests, embedding) can live in
one process. Queue depths are read from the engine when scraped; rounds and
their times come from the engine loop's round listener; the rest is counted by
the HTTP layer as requests progress.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

# seconds: rounds on a 2-core CPU take 0.05-2 s, on a GPU a few ms
_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, ensemble):
        self.registry = reg = CollectorRegistry(auto_describe=True)
        engine = ensemble.engine
        Gauge("specem_requests_running", "Requests holding a cache slot (in the running batch)",
              registry=reg).set_function(lambda: engine.running)
        Gauge("specem_requests_waiting", "Requests waiting for a slot (every slot is busy)",
              registry=reg).set_function(lambda: engine.waiting)
        Gauge("specem_batch_slots", "Request slots (max_batch)", registry=reg).set(ensemble.config.max_batch)
        self.rounds = Counter("specem_rounds", "Engine rounds run (one round serves every running request)",
                              registry=reg)
        self.round_seconds = Histogram("specem_round_seconds", "Wall time of one engine round",
                                       buckets=_TIME_BUCKETS, registry=reg)
        self.round_requests = Histogram("specem_round_requests", "Requests served by one engine round",
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=reg)
        self.tokens = Counter("specem_generated_tokens", "Answer tokens of finished requests (lead drafter's tokens)",
                              registry=reg)
        self.prompt_tokens = Counter("specem_prompt_tokens", "Prompt tokens of finished requests (lead drafter's)",
                                     registry=reg)
        self.first_segment = Histogram("specem_time_to_first_segment_seconds",
                                       "From a request's arrival to its first accepted segment",
                                       buckets=_TIME_BUCKETS, registry=reg)
        self.latency = Histogram("specem_request_seconds", "From a request's arrival to its end",
                                 buckets=_TIME_BUCKETS, registry=reg)
        self.won = Counter("specem_segments_won", "Accepted segments per winning model", ["model"], registry=reg)
        self.finished = Counter("specem_requests_finished", "Finished requests by the engine's stop reason",
                                ["stop_reason"], registry=reg)
        self.errors = Counter("specem_request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=reg)
        self.cancelled = Counter("specem_requests_cancelled", "Requests cancelled (client gone, shutdown)",
                                 registry=reg)
        for m in ensemble.model_names:
            self.won.labels(model=m)  # every member shows, even before it wins
        engine.round_listeners.append(self._round)
        self._engine = engine

    def _round(self, n_requests: int, seconds: float) -> None:
        self.rounds.inc()
        self.round_seconds.observe(seconds)
        self.round_requests.observe(n_requests)

    def detach(self) -> None:
        """Stop listening to the engine (the app is gone)."""
        if self._round in self._engine.round_listeners:
            self._engine.round_listeners.remove(self._round)

    def render(self) -> bytes:
        return generate_latest(self.registry)
