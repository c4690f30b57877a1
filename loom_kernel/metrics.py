"""Counters for GET /metrics, written in the Prometheus text format (no client library needed).

Labels are bounded so that a long-running server's scrape does not grow without limit: routes are the app's path
templates (an unmatched path counts as "unmatched"), and at most ``MAX_MODELS`` model ids get their own series;
later ones share the model label "other".
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import attrs

MAX_MODELS = 32
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@attrs.define
class ModelCounters:
    """Cumulative per model id, kept across unloads and reloads (Prometheus counters never go down)."""

    loads: int = 0
    load_failures: int = 0
    batches: int = 0
    batched_requests: int = 0
    decode_steps: int = 0
    joined_running: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


@attrs.define
class Histogram:
    counts: list[int] = attrs.field(factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        for i, edge in enumerate(BUCKETS):
            if seconds <= edge:
                self.counts[i] += 1
        self.total += seconds
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self._models: dict[str, ModelCounters] = {}
        self.idle_checks = 0  # looks of the idle-unload timer (tests count them instead of watching a clock)

    def model(self, model_id: str) -> ModelCounters:
        """The counters of ``model_id`` (those of "other" once MAX_MODELS ids have their own)."""
        with self._lock:
            if model_id not in self._models and len(self._models) >= MAX_MODELS:
                model_id = "other"
            return self._models.setdefault(model_id, ModelCounters())

    def request(self, method: str, route: str, status: int, seconds: float | None) -> None:
        with self._lock:
            self.requests[(method, route, str(status))] += 1
            if seconds is not None:
                self.latency[route].observe(seconds)

    def exposition(self, gauges: list[dict[str, Any]]) -> str:
        """The Prometheus text for these counters and ``gauges`` (one dict per loaded model: model, in_flight,
        queued)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])

        with self._lock:
            family("loom_http_requests_total", "counter", "HTTP requests answered, by method, route and status.")
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f"loom_http_requests_total{_labels(method=method, route=route, status=status)} {n}")
            family("loom_http_request_duration_seconds", "histogram", "Time from request to response start.")
            for route, h in sorted(self.latency.items()):
                for edge, n in zip(BUCKETS, h.counts, strict=True):
                    lines.append(f"loom_http_request_duration_seconds_bucket{_labels(route=route, le=str(edge))} {n}")
                lines.append(f"loom_http_request_duration_seconds_bucket{_labels(route=route, le='+Inf')} {h.n}")
                lines.append(f"loom_http_request_duration_seconds_sum{_labels(route=route)} {h.total:.6f}")
                lines.append(f"loom_http_request_duration_seconds_count{_labels(route=route)} {h.n}")
            per_model = {
                "loom_model_loads_total": ("loads", "Successful loads of a model."),
                "loom_model_load_failures_total": ("load_failures", "Failed loads of a model."),
                "loom_batches_total": ("batches", "Merged forward calls run (one per batch)."),
                "loom_batched_requests_total": ("batched_requests", "Requests' forward calls run in those batches."),
                "loom_decode_steps_total": ("decode_steps", "Decoding steps of running generations."),
                "loom_joined_running_total": ("joined_running", "Generated rows that joined a running batch."),
                "loom_prompt_tokens_total": ("prompt_tokens", "Tokens of the inputs run through a model."),
                "loom_generated_tokens_total": ("generated_tokens", "Tokens generated."),
            }
            for name, (attr, help_) in per_model.items():
                family(name, "counter", help_)
                for model_id, c in sorted(self._models.items()):
                    lines.append(f"{name}{_labels(model=model_id)} {getattr(c, attr)}")
        family("loom_idle_checks_total", "counter", "Looks of the idle-unload timer at the loaded models.")
        lines.append(f"loom_idle_checks_total {self.idle_checks}")
        family("loom_models_loaded", "gauge", "Models in memory and ready.")
        lines.append(f"loom_models_loaded {len(gauges)}")
        family("loom_requests_in_flight", "gauge", "Requests admitted for a model (queued or running).")
        lines.extend(f"loom_requests_in_flight{_labels(model=g['model'])} {g['in_flight']}" for g in gauges)
        family("loom_queue_depth", "gauge", "Forward calls waiting for a model's thread.")
        lines.extend(f"loom_queue_depth{_labels(model=g['model'])} {g['queued']}" for g in gauges)
        return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"
