"""Stored vectors: round trip, persistence across a restart, a crash mid-write, durable deletes, a full disk, the
byte budget, bad vectors, and /vectors/contrast against the mean difference computed in-process from transformers'
own hidden states."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from litestar.testing import TestClient
from loom_interp.stores import SUFFIX, TensorStore
from test_batching import arrays
from test_models import app_with

POSITIVE = ["I love this, it is wonderful", "What a great and happy day", "Thank you, this is lovely"]
NEGATIVE = ["I hate this, it is awful", "What a terrible and sad day", "This is bad and I am angry"]


def b64(values: np.ndarray) -> dict:
    return {
        "data": base64.b64encode(values.astype("<f4").tobytes()).decode(),
        "shape": list(values.shape),
        "dtype": "float32",
        "encoding": "base64",
    }


def test_round_trip_listing_and_deletion(tmp_path: Path) -> None:
    values = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    with TestClient(app_with()) as c:
        r = c.post("/vectors", json={"name": "joy", "vector": values.tolist(), "site": 2, "description": "a test"})
        assert r.status_code == 201, r.text
        assert r.json()["shape"] == [64] and r.json()["site"] == "2"
        assert abs(r.json()["norm"] - float(np.linalg.norm(values.astype(np.float64)))) < 1e-4
        assert c.post("/vectors", json={"name": "wire", "vector": b64(values)}).status_code == 201
        listed = c.get("/vectors").json()
        assert sorted(v["name"] for v in listed["vectors"]) == ["joy", "wire"]
        assert listed["bytes"] == sum(v["bytes"] for v in listed["vectors"]) and listed["entries"] == 2
        assert all(v["bytes"] > 64 * 4 for v in listed["vectors"])  # the numbers, and what is kept beside them
        for name in ("joy", "wire"):
            got = c.get(f"/vectors/{name}").json()
            np.testing.assert_array_equal(np.asarray(got["vector"]["data"], dtype=np.float32), values)
        same = c.post("/vectors", json={"name": "joy", "vector": values.tolist(), "site": 2, "description": "a test"})
        assert same.status_code == 200 and same.json()["created"] == r.json()["created"]  # the same: no change
        again = c.post("/vectors", json={"name": "joy", "vector": values.tolist()})  # other fields: a conflict
        assert again.status_code == 409 and again.json()["field"] == "name"
        assert c.post("/vectors", json={"name": "joy", "vector": [1.0], "replace": True}).json()["shape"] == [1]
        assert c.delete("/vectors/joy").status_code == 200
        gone = c.get("/vectors/joy")
        assert gone.status_code == 404 and gone.json()["allowed"] == ["wire"]
        assert c.delete("/vectors/joy").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "../etc", "vector": [1.0]}, "name"),
        ({"name": "x", "vector": [[1.0, 2.0], [3.0]]}, "vector"),
        ('{"name": "x", "vector": [1e400]}', "vector"),
        ({"name": "x", "vector": {"data": "AAAA", "shape": [2], "dtype": "float32", "encoding": "base64"}}, "vector"),
        ({"name": "x", "vector": {"data": [1.0], "shape": [2], "dtype": "float64"}}, "vector"),
        ({"name": "x", "vector": ["a"]}, "vector"),
    ],
)
def test_bad_vectors_are_422_naming_the_field(body: dict | str, field: str) -> None:
    with TestClient(app_with()) as c:
        sent = (
            {"content": body, "headers": {"content-type": "application/json"}}
            if isinstance(body, str)
            else {"json": body}
        )
        r = c.post("/vectors", **sent)
        assert r.status_code == 422 and r.json()["field"].startswith(field), r.text
        assert c.get("/vectors").json()["vectors"] == []


def test_the_byte_budget_is_a_507_and_a_replacement_counts_what_it_frees() -> None:
    with TestClient(app_with(options={"vectors_max_mb": 12_000 / 2**20})) as c:  # an entry costs 4 KiB besides
        assert c.post("/vectors", json={"name": "a", "vector": [0.5] * 200}).status_code == 201
        r = c.post("/vectors", json={"name": "b", "vector": [0.5] * 900})
        assert r.status_code == 507 and "budget of 12000 bytes" in r.json()["detail"], r.text
        assert c.post("/vectors", json={"name": "a", "vector": [0.5] * 1000, "replace": True}).status_code == 201
        assert [v["name"] for v in c.get("/vectors").json()["vectors"]] == ["a"]


def test_vectors_persist_across_a_restart_and_a_crash_mid_write_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "vectors"
    values = np.arange(64, dtype=np.float32) / 7
    with TestClient(app_with(options={"vectors_directory": str(directory)})) as c:
        assert c.post("/vectors", json={"name": "steady", "vector": values.tolist(), "model": "m"}).status_code == 201
    assert oct(directory.stat().st_mode & 0o777) == "0o700"

    real_write = os.write

    def crash(fd: int, data: bytes) -> int:  # the process dies with half a file written under its temporary name
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory.resolve())):
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", crash)
    store = TensorStore("vector", 2**20, directory)
    with pytest.raises(KeyboardInterrupt):
        store.put("steady", torch.zeros(64), {}, replace=True)
    from loom_interp.stores import _HOST

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid nobody has now
    (directory / f".steady.{_HOST}.{dead.pid}.0a1b.tmp").write_bytes(b"left by a crash")  # what a kill -9 leaves
    # Another process's write in progress (it is alive), and another host's: not this store's to remove.
    (directory / f".steady.{_HOST}.{os.getppid()}.2c3d.tmp").write_bytes(b"being written")
    (directory / f".steady.otherhost.{dead.pid}.4e5f.tmp").write_bytes(b"another machine's")
    monkeypatch.undo()

    with TestClient(app_with(options={"vectors_directory": str(directory)})) as c:  # the restart
        listed = c.get("/vectors").json()["vectors"]
        assert [(v["name"], v["model"]) for v in listed] == [("steady", "m")]
        got = c.get("/vectors/steady").json()["vector"]
        np.testing.assert_array_equal(np.asarray(got["data"], dtype=np.float32), values)
    left = {f".steady.{_HOST}.{os.getppid()}.2c3d.tmp", f".steady.otherhost.{dead.pid}.4e5f.tmp"}
    assert {p.name for p in directory.iterdir()} - {".lock"} == {*left, "steady.safetensors"}


@pytest.mark.parametrize(
    ("kind", "body"),
    [("vectors", {"vector": [0.5] * 8}), ("probes", {"site": 2, "weight": [[0.5] * 8] * 2, "bias": [0.0, 0.0]})],
)
def test_a_delete_is_on_disk_before_it_is_answered(tmp_path: Path, monkeypatch, kind: str, body: dict) -> None:
    """A deleted entry's file is gone from its directory's entries on disk (the directory fsynced after the unlink),
    so a crash after the 200 cannot bring it back, as a write's rename is made durable before its 201."""
    directory = tmp_path / kind
    entry = directory / f"gone{SUFFIX}"
    synced: list[bool] = []  # at each fsync of the directory itself: whether the entry's file was already unlinked
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.samestat(os.fstat(fd), os.stat(directory)):
            synced.append(not entry.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with TestClient(app_with(options={f"{kind}_directory": str(directory)})) as c:
        assert c.post(f"/{kind}", json={"name": "gone", **body}).status_code == 201
        assert entry.exists() and synced == [False]  # the write's rename, made durable
        r = c.delete(f"/{kind}/gone")
        assert r.status_code == 200, r.text
        assert synced == [False, True]
        assert c.get(f"/{kind}/gone").status_code == 404


@contextlib.contextmanager
def full_disk(directory: Path, size: int) -> Iterator[None]:
    """A real file system of ``size`` bytes mounted on ``directory`` (tmpfs: root with CAP_SYS_ADMIN)."""
    directory.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        # Lazily: tensors read back from the store's files stay mapped to them while the app lives.
        subprocess.run(["umount", "--lazy", str(directory)], check=True)


@pytest.mark.parametrize("fault", ["tmpfs", errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_a_507_naming_the_entry_and_the_store_is_as_it_was(
    tmp_path: Path, monkeypatch, fault: str | int
) -> None:
    """Over a real tmpfs too small for the entry, and with the store's own writes failing as a full disk or a used
    up quota makes them fail (the file system is real; only its answer to a write is made up)."""
    directory = tmp_path / "vectors"
    old = np.arange(16, dtype=np.float32)
    big = [0.25] * 100_000  # 400 kB: more than the tmpfs holds
    with contextlib.ExitStack() as stack:
        if fault == "tmpfs":
            stack.enter_context(full_disk(directory, 64 * 1024))
        with TestClient(app_with(options={"vectors_directory": str(directory)})) as c:
            assert c.post("/vectors", json={"name": "kept", "vector": old.tolist()}).status_code == 201
            before = {p.name: p.read_bytes() for p in directory.iterdir()}
            if fault != "tmpfs":
                real_write = os.write

                def write(fd: int, data: bytes) -> int:
                    if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory.resolve())):
                        raise OSError(fault, os.strerror(int(fault)))
                    return real_write(fd, data)

                monkeypatch.setattr(os, "write", write)
            for name, replace in (("kept", True), ("new", False)):
                r = c.post("/vectors", json={"name": name, "vector": big, "replace": replace})
                assert r.status_code == 507, r.text
                assert r.headers["content-type"].startswith("application/problem+json")
                problem = r.json()
                assert problem["title"] == "Insufficient storage" and problem["field"] == "vector"
                assert repr(name) in problem["detail"] and "disk" in problem["detail"], problem
                # Nothing half-written is left, and the old entry is the old one, on disk and in the answers.
                assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
                listed = c.get("/vectors").json()["vectors"]
                assert [(v["name"], v["shape"]) for v in listed] == [("kept", [16])]
                got = c.get("/vectors/kept").json()["vector"]
                np.testing.assert_array_equal(np.asarray(got["data"], dtype=np.float32), old)
            monkeypatch.undo()
            assert c.post("/vectors", json={"name": "small", "vector": [1.0, 2.0]}).status_code == 201  # room again
        with TestClient(app_with(options={"vectors_directory": str(directory)})) as c:  # what a restart reads
            assert sorted(v["name"] for v in c.get("/vectors").json()["vectors"]) == ["kept", "small"]


@pytest.mark.parametrize(("site", "positions"), [(2, "last"), ("blocks.1.hook_mlp_out", "mean")])
def test_contrast_is_the_in_process_mean_difference(tiny_models, site, positions) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_models["llama"])
    net = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    kept: dict[str, torch.Tensor] = {}
    handle = None
    if site != 2:
        handle = net.model.layers[1].mlp.register_forward_hook(lambda m, a, out: kept.update(h=out.detach()))

    def state(text: str) -> torch.Tensor:
        with torch.inference_mode():
            out = net(**tok(text, return_tensors="pt"), output_hidden_states=True)
        h = (out.hidden_states[2] if site == 2 else kept["h"])[0].double()
        return h[-1] if positions == "last" else h.mean(0)

    pos = torch.stack([state(t) for t in POSITIVE])
    neg = torch.stack([state(t) for t in NEGATIVE])
    if handle is not None:
        handle.remove()
    want = pos.mean(0) - neg.mean(0)
    unit = want / want.norm()
    with TestClient(app_with()) as c:
        body = {"model": path, "site": site, "positive": POSITIVE, "negative": NEGATIVE, "positions": positions}
        r = c.post("/vectors/contrast", json={**body, "name": "mood"})
        assert r.status_code == 200, r.text
        answer = r.json()
        np.testing.assert_allclose(np.asarray(answer["vector"]["data"]), want.numpy(), atol=1e-5, rtol=0)
        assert abs(answer["norm"] - float(want.norm())) < 1e-5
        assert abs(answer["separation"]["positive_mean_projection"] - float((pos @ unit).mean())) < 1e-5
        assert abs(answer["separation"]["negative_mean_projection"] - float((neg @ unit).mean())) < 1e-5
        assert answer["stored"]["name"] == "mood" and answer["stored"]["site"] == str(site)

        # Steering by the stored name is steering by its numbers.
        ask = {"model": path, "prompt": "Today I feel", "max_tokens": 10, "temperature": 0}
        by_name = c.post("/generate", json={**ask, "interventions": [{"site": site, "op": "add", "vector": "mood"}]})
        literal = {"site": site, "op": "add", "vector": answer["vector"]}
        by_value = c.post("/generate", json={**ask, "interventions": [literal]})
        assert by_name.status_code == 200, by_name.text
        assert by_name.json()["token_ids"] == by_value.json()["token_ids"]
        extract = {"model": path, "text": "hello there", "hidden_state_layers": [site, -1], "positions": "all"}
        named, valued = (
            arrays(c.post("/extract", json={**extract, "interventions": [edit]}).json(), "sequence_hidden_states")
            for edit in ({"site": site, "op": "add", "vector": "mood"}, literal)
        )
        for key in named:
            np.testing.assert_array_equal(named[key], valued[key])
        missing = c.post("/generate", json={**ask, "interventions": [{"site": site, "op": "add", "vector": "nope"}]})
        assert missing.status_code == 422 and missing.json()["field"] == "interventions[0].vector"


def test_stores_sharing_a_directory_keep_its_budget_and_whole_files_under_concurrent_writes(tmp_path: Path) -> None:
    """Two stores over one directory (as two processes: each opens the lock file itself, and ``flock`` sets such
    opens apart as it does processes) write at once: uploads each within the budget but together over it store
    exactly what the budget holds, and uploads of one name racing its deletion leave it whole or absent, never torn.
    """
    import threading

    from loom_interp.stores import NotFound

    from loom_kernel import InsufficientStorage

    def vector(i: int) -> torch.Tensor:
        return torch.full((256,), float(i))

    cost = TensorStore("vector", 10**6).put("a0", vector(0), {"model": "m"})[0].nbytes
    stores = [TensorStore("vector", 10 * cost, tmp_path) for _ in range(2)]
    outcomes: list[str] = []

    def run(*work: tuple[TensorStore, object]) -> None:
        start = threading.Barrier(len(work))

        def go(store: TensorStore, job: object) -> None:
            start.wait()
            job(store)  # type: ignore[operator]

        threads = [threading.Thread(target=go, args=w) for w in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def fill(tag: str) -> object:
        def job(store: TensorStore) -> None:
            for i in range(8):
                try:
                    store.put(f"{tag}{i}", vector(i), {"model": "m"})
                    outcomes.append("stored")
                except InsufficientStorage:
                    outcomes.append("507")

        return job

    def churn(value: float | None) -> object:
        def job(store: TensorStore) -> None:
            for _ in range(20):
                with contextlib.suppress(NotFound):
                    if value is None:
                        store.delete("same")
                    else:
                        store.put("same", torch.full((64,), value), {}, replace=True)

        return job

    run((stores[0], fill("a")), (stores[1], fill("b")))
    fresh = TensorStore("vector", 10 * cost, tmp_path)
    assert outcomes.count("stored") == len(fresh.names()) == 10 and fresh.used == 10 * cost
    for name in fresh.names()[:2]:
        fresh.delete(name)
    run((stores[0], churn(1.0)), (stores[1], churn(2.0)), (stores[0], churn(None)))
    fresh = TensorStore("vector", 10 * cost, tmp_path)
    assert fresh.used <= 10 * cost and not list(tmp_path.glob(".*.tmp"))
    assert len(fresh.items) == len(list(tmp_path.glob(f"*{SUFFIX}")))  # every file there reads whole
    assert "same" not in fresh.names() or float(fresh.get("same").tensor[0]) in (1.0, 2.0)
