"""What the benchmarks share: texts, timing, the offline GPT-2-small-sized model, servers and concurrent clients."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # serverutil: the tests' `loom serve` runner

WORDS = (
    "the model reads each token and writes a hidden state at every layer while researchers compare how meaning "
    "moves through attention heads residual streams and feed forward blocks from the embedding to the last layer"
)


def corpus(n: int, seed: int = 0, words: tuple[int, int] = (4, 60)) -> list[str]:
    """``n`` sentences of ``words`` (lowest, highest) words: mixed lengths, as a real batch has."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS.split(), k=rng.randint(*words))).capitalize() + "." for _ in range(n)]


STAGGER_GAP_S = 0.25  # the staggered clients arrive this far apart


def staggered_lengths() -> list[int]:
    """The staggered clients' ``max_tokens``, in the order they arrive (shuffled once, the same in every run)."""
    lengths = [8, 16, 24, 32, 48, 64, 96, 128]
    random.Random(0).shuffle(lengths)
    return lengths


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fastest of ``repeats`` runs, in seconds (the least disturbed by the rest of the machine)."""
    return min(latencies(repeats, fn))


def latencies(n: int, fn: Callable[[], object]) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolated between the nearest ranks."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(q) - 1))]


def build(root: Path) -> Path:
    """A GPT-2-small-sized model (12 layers, 768 wide, 512-token vocabulary) built offline under ``root``."""
    from loom_transformers.testing import build_tiny_model

    # EOS never wins in this seed's greedy run, so every measurement generates the full token count.
    return build_tiny_model(
        "gpt2",
        root,
        name="gpt2-small-sized",
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_positions=1024,
        eos_token_id=None,
        bos_token_id=None,
    )


@contextlib.contextmanager
def serve(models: list[str], **env: str) -> Iterator[str]:
    """A real ``loom serve`` on a free loopback port with ``models`` preloaded (and loaded); yields its base URL.

    ``env`` adds environment variables (the server otherwise runs with defaults: no LOOM_* of the caller's).
    """
    from serverutil import loom_server, wait_for

    args = [a for m in models for a in ("--preload", m)]
    with tempfile.TemporaryDirectory() as home, loom_server(args, Path(home), **env) as (base, log, proc):
        for m in models:
            wait_for(rf"loaded {re.escape(m)}:", log, proc, timeout=300)
        yield base


class Connection:
    """One keep-alive HTTP/1.1 connection of a benchmark client: ``http.client``, the standard library's, or httpx.

    The load generator runs on the machine it measures: on 2 cores every millisecond of CPU a client spends on a
    request is one the server does not get. An ``http.client`` round trip of an /embed takes about 0.2 ms of the
    client's CPU, an httpx one about 0.7 ms (``python -m bench`` prints the clients' cores), so the throughput rows
    use ``http.client`` and one row shows what httpx clients get. Answers are decoded after the clock stops.
    """

    def __init__(self, base: str, kind: str = "stdlib") -> None:
        self.kind = kind
        if kind == "httpx":
            import httpx

            self._httpx = httpx.Client(base_url=base, timeout=600)
        else:
            import http.client
            from urllib.parse import urlsplit

            url = urlsplit(base)
            self._conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """The answer's body, undecoded (a caller decodes what it needs once the clock stops: on this machine
        ``json.loads`` of an /embed answer costs the client more CPU than the HTTP round trip); an HTTP error status
        raises."""
        if self.kind == "httpx":
            headers = {"Content-Type": "application/json"} if body is not None else {}
            r = self._httpx.request(method, path, content=body, headers=headers)
            r.raise_for_status()
            return r.content
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self._conn.request(method, path, body=body, headers=headers)
        r = self._conn.getresponse()
        data = r.read()
        if r.status >= 400:
            raise RuntimeError(f"{method} {path}: {r.status} {data[:500]!r}")
        return data

    def close(self) -> None:
        (self._httpx if self.kind == "httpx" else self._conn).close()


def run_clients(
    base: str, path: str, bodies: list[dict[str, Any]], clients: int, kind: str = "stdlib"
) -> tuple[float, list[dict[str, Any]], float]:
    """POST ``bodies`` to ``path`` from ``clients`` threads at once, each on its own keep-alive ``Connection`` of
    ``kind``.

    Client ``i`` sends bodies ``i``, ``i + clients``, ... one after another. Returns the seconds from the common
    start to the last answer, the JSON answers in the order of ``bodies``, and the CPU seconds this process (the
    clients) spent meanwhile.
    """
    answers: list[bytes] = [b""] * len(bodies)
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    encoded = [json.dumps(b).encode() for b in bodies]

    def client(i: int) -> None:
        c = Connection(base, kind)
        try:
            c.request("GET", "/health")  # the connection is open before the clock starts
            start.wait()
            for j in range(i, len(bodies), clients):
                answers[j] = c.request("POST", path, encoded[j])
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu
    if errors:
        raise errors[0]
    return elapsed, [json.loads(a) for a in answers], cpu


@contextlib.contextmanager
def background_load(base: str, path: str, bodies: list[dict[str, Any]], clients: int) -> Iterator[list[int]]:
    """``clients`` threads POST ``bodies`` (round and round) to ``path`` until the block ends; yields the count of
    answers so far (one counter a client), which the block may read to see that the load runs."""
    stop = threading.Event()
    done = [0] * clients
    errors: list[BaseException] = []
    encoded = [json.dumps(b).encode() for b in bodies]

    def client(i: int) -> None:
        c = Connection(base)
        j = i
        try:
            while not stop.is_set():
                c.request("POST", path, encoded[j % len(encoded)])
                done[i] += 1
                j += clients
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        yield done
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def probe_health(base: str, calls: int, interval: float) -> list[float]:
    """Seconds of ``calls`` GET /health on one keep-alive connection, ``interval`` seconds apart.

    Runs in a process of its own in the suite, so that the load's client threads do not delay it.
    """
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=60) as c:
        c.get("/health").raise_for_status()
        for _ in range(calls):
            time.sleep(interval)
            t0 = time.perf_counter()
            c.get("/health").raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def cpu_ticks() -> tuple[int, int] | None:
    """(clock ticks the machine's CPUs were busy, ticks this process and its descendants used) since boot, or None
    where /proc does not tell. Two readings tell how much other work shared the machine in between."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
        used = tree_ticks(os.getpid())
    except (OSError, ValueError, IndexError):
        return None
    return user + nice + system + irq + softirq, used + reaped_ticks() + RETIRED[0]


# Ticks of descendants that ended without this process reaping them (Ray's processes, stopped by `ray stop`): read
# by ``stopping`` just before they go, or their work would count as other processes'.
RETIRED = [0]


def reaped_ticks() -> int:
    """Clock ticks of the descendants this process has reaped."""
    t = os.times()
    return round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


@contextlib.contextmanager
def stopping(root: int) -> Iterator[None]:
    """Around stopping ``root``: its tree's ticks so far count as this process's (less what reaping it counts)."""
    tree, reaped = tree_ticks(root), reaped_ticks()
    try:
        yield
    finally:
        RETIRED[0] += max(0, tree - (reaped_ticks() - reaped))


def tree_ticks(root: int) -> int:
    """Clock ticks (user + system) that ``root`` and its live descendants have used."""
    parents, used = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(pid)] = int(fields[1])
        used[int(pid)] = int(fields[11]) + int(fields[12])  # utime + stime
    tree, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        for child in [c for c, p in parents.items() if p == pid and c not in tree]:
            tree.add(child)
            todo.append(child)
    return sum(used.get(p, 0) for p in tree)


def others_cpus(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float | None:
    """CPUs that other processes kept busy on average between two ``cpu_ticks`` readings ``seconds`` apart."""
    if before is None or after is None or seconds <= 0:
        return None
    busy, mine = after[0] - before[0], after[1] - before[1]
    return max(0.0, busy - mine) / os.sysconf("SC_CLK_TCK") / seconds
