"""GET /metrics: the server's counters in Prometheus' text format (0.0.4), written by hand.

    muse_http_requests_total{route,method,status}     requests answered (route: the path template)
    muse_http_request_duration_seconds{route}         histogram, until the last byte (streams included)
    muse_time_to_first_token_seconds{model}           histogram, from the request's arrival to its first token
    muse_prompt_tokens_total{model}, muse_completion_tokens_total{model}
    muse_requests_waiting{model}, muse_requests_running{model}      the scheduler's queue, now
    muse_prefix_cache_hit_tokens_total{model}, muse_prefix_cache_tokens{model}

`install(app)` adds the route and the middleware that counts every answer (the outermost one,
so refusals by the security middleware — 401, 403, 413 — are counted too). Like the rest of the
API, /metrics needs the API key when the server has one (Prometheus: `authorization: {credentials: KEY}`).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter(tags=["Server"])


class Histogram:
    def __init__(self, buckets=BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for edge, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{edge:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    """Counters and histograms, shared by the event loop and the thread pool (one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft: dict[str, Histogram] = defaultdict(Histogram)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.cached_tokens: dict[str, int] = defaultdict(int)  # prompt tokens served by the prefix cache

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, method, status)] += 1
            self.latency[route].observe(seconds)

    def watch(self, model: str, stream, started: float, count_prompt: bool = True) -> "WatchedStream":
        """`stream` (a scheduler `Stream`) that records its first token's delay and its token counts."""
        return WatchedStream(self, model, stream, started, count_prompt)

    def render(self, service) -> str:
        with self.lock:
            requests = dict(self.requests)
            latency = {k: _copy(h) for k, h in self.latency.items()}
            ttft = {k: _copy(h) for k, h in self.ttft.items()}
            prompt, completion = dict(self.prompt_tokens), dict(self.completion_tokens)
            cached = dict(self.cached_tokens)
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        family("muse_http_requests_total", "counter", "HTTP requests answered, by route template, method and status.",
               [f'muse_http_requests_total{{route="{_esc(r)}",method="{m}",status="{s}"}} {n}'
                for (r, m, s), n in sorted(requests.items())])
        family("muse_http_request_duration_seconds", "histogram",
               "Time from a request's arrival to its last byte (a stream's included).",
               [line for r, h in sorted(latency.items())
                for line in h.lines("muse_http_request_duration_seconds", f'route="{_esc(r)}"')])
        family("muse_time_to_first_token_seconds", "histogram",
               "Time from a generation request's arrival to its first token.",
               [line for m, h in sorted(ttft.items())
                for line in h.lines("muse_time_to_first_token_seconds", f'model="{_esc(m)}"')])
        family("muse_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
               [f'muse_prompt_tokens_total{{model="{_esc(m)}"}} {n}' for m, n in sorted(prompt.items())])
        family("muse_completion_tokens_total", "counter", "Tokens generated.",
               [f'muse_completion_tokens_total{{model="{_esc(m)}"}} {n}' for m, n in sorted(completion.items())])
        queues = {name: service.schedulers.get(name) for name in service.models}
        family("muse_requests_waiting", "gauge", "Requests queued for a batch row.",
               [f'muse_requests_waiting{{model="{_esc(m)}"}} {s.waiting if s else 0}' for m, s in queues.items()])
        family("muse_requests_running", "gauge", "Requests being prefilled or decoded.",
               [f'muse_requests_running{{model="{_esc(m)}"}} {s.active if s else 0}' for m, s in queues.items()])
        family("muse_prefix_cache_hit_tokens_total", "counter",
               "Prompt tokens whose keys and values came from the prefix cache.",
               [f'muse_prefix_cache_hit_tokens_total{{model="{_esc(m)}"}} {cached.get(m, 0)}' for m in queues])
        family("muse_prefix_cache_tokens", "gauge", "Prompt positions held in the prefix cache.",
               [f'muse_prefix_cache_tokens{{model="{_esc(m)}"}} {s.prefix_cache.tokens if s else 0}'
                for m, s in queues.items()])
        return "\n".join(out) + "\n"


def _copy(h: Histogram) -> Histogram:
    c = Histogram(h.buckets)
    c.counts, c.sum, c.count = list(h.counts), h.sum, h.count
    return c


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class WatchedStream:
    """A scheduler `Stream` (async iteration, cancel) that reports to `Metrics` as it is read."""

    def __init__(self, metrics: Metrics, model: str, stream, started: float, count_prompt: bool):
        self.metrics, self.model, self.stream = metrics, model, stream
        self.started, self.count_prompt = started, count_prompt

    def cancel(self) -> None:
        self.stream.cancel()

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    async def __aiter__(self):
        first, m = True, self.metrics
        async for chunk in self.stream:
            if first:
                first = False
                with m.lock:
                    m.ttft[self.model].observe(time.perf_counter() - self.started)
            if chunk.finish_reason:
                with m.lock:
                    m.completion_tokens[self.model] += chunk.generation_tokens
                    if self.count_prompt:
                        m.prompt_tokens[self.model] += chunk.prompt_tokens
                        m.cached_tokens[self.model] += chunk.cached_tokens
            yield chunk


class MetricsMiddleware:
    """Counts every HTTP answer by the route that took it (its template: no ids in the labels)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.request(route, scope.get("method", ""), status, time.perf_counter() - started)


@router.get("/metrics", summary="Counters in Prometheus' text format", response_class=PlainTextResponse)
def metrics(request: Request):
    return PlainTextResponse(request.app.state.metrics.render(request.app.state.service), media_type=CONTENT_TYPE)


def install(app: FastAPI) -> None:
    """Add /metrics and the counting middleware (call it after the other middleware: it must run first)."""
    app.state.metrics = Metrics()
    app.include_router(router)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
