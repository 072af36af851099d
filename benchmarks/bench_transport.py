"""Transport benchmark: our protocol vs a bare pyzmq send/recv vs imagezmq, same run, same frames.

    python benchmarks/bench_transport.py [--out out/bench/transport.json] [--frames 1000] [--size 1024]

1. Header cost: encode (JSON header + contiguous view) and decode (JSON parse + full validation +
   Frame) of one frame message, in memory, next to a plain copy of the same pixels.
2. Hop latency, between two processes over ipc and tcp loopback: our message (header + zero-copy
   payload, validated and decoded into a Frame on arrival) vs the bare pyzmq recipe
   (send_json + send(copy=False) / recv_json + recv(copy=False) + frombuffer). One-way latency is the
   receiver's monotonic clock at "decoded" minus the sender's at "about to send" (one host, one
   CLOCK_MONOTONIC); blocks of the two kinds alternate so both see the same machine load.
3. Throughput on 1024x1024 uint16 frames: imagezmq's default REQ/REP (ImageSender/ImageHub over
   tcp, as its users run it, a reply per frame) vs (a) our transport alone between two processes
   (ROUTER -> DEALER, credit window 2, every frame validated and decoded) over tcp and ipc, and with
   the shared-memory payload path (window 4: each frame copied into a ring slot released by the
   receiver's credit, the header on the socket, every reference and generation checked), and (b)
   our pipeline as shipped (source -> worker -> hub, a no-op model, policy "all": every frame
   delivered and validated) as processes over ipc and tcp, as processes with the optional
   shared-memory payload path, and as threads over inproc. Frames per second after a warm-up.
   Every row is measured --rounds times; each of our measurements is paired with an imagezmq
   measurement taken just before it (same frames, same machine load), and the ratio is per pair:
   the JSON keeps every round, the table shows the median and the spread (min..max).

imagezmq is needed for part 3 only (``pip install imagezmq`` into .venv: benchmark-only dependency);
without it that row is skipped. Writes JSON to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime.frames import Frame
from edge_runtime.pipeline import protocol
from edge_runtime.pipeline.builtins import BuiltinProcessor, SyntheticSource
from edge_runtime.pipeline.nodes import free_tcp_ports
from edge_runtime.pipeline.supervisor import run_pipeline
from edge_runtime.telemetry import summarize

TIMEOUT_MS = 10000


def frames_for(size: int) -> tuple[SyntheticSource, list[np.ndarray]]:
    source = SyntheticSource(count=None, shape=(size, size), dtype="uint16")
    return source, source._images()


def _reap(proc: Any) -> None:
    """Wait for a benchmark peer process to finish; kill it if it hangs."""
    proc.join(5)
    if proc.is_alive():
        proc.kill()


# --------------------------------------------------------------------------- 1. header cost


def header_cost(images: list[np.ndarray], n: int) -> dict[str, Any]:
    frames = [Frame(pixels=img, modality="XR", bits_stored=12, seq=i, stamps={"capture": 1, "source_send": 2})
              for i, img in enumerate(images)]
    enc, dec, copy = [], [], []
    for i in range(n):
        f = frames[i % len(frames)]
        t0 = time.perf_counter_ns()
        parts = protocol.encode_frame(f)
        t1 = time.perf_counter_ns()
        protocol.decode(parts)
        t2 = time.perf_counter_ns()
        f.pixels.copy()
        t3 = time.perf_counter_ns()
        enc.append((t1 - t0) / 1000)
        dec.append((t2 - t1) / 1000)
        copy.append((t3 - t2) / 1000)
    return {"unit": "us", "header_bytes": len(protocol.encode_frame(frames[0])[0]), "encode": summarize(enc),
            "decode_validate": summarize(dec), "pixel_copy_for_scale": summarize(copy)}


# --------------------------------------------------------------------------- 2. hop latency


def _echo(endpoint: str) -> None:
    """Receive frames; reply with the one-way latency (ns). Control parts b'ours'/b'bare'/b'stop'."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.linger = 0
    sock.bind(endpoint)
    kind = "ours"
    try:
        while sock.poll(TIMEOUT_MS):
            if kind == "ours":
                msg = sock.recv_multipart(copy=False)
                if len(msg) == 1:
                    kind = msg[0].bytes.decode()
                    sock.send(b"ok")
                    if kind == "stop":
                        return
                    continue
                frame = protocol.decode(msg).frame
                now = time.monotonic_ns()
                sent = frame.stamps["source_send"] if frame is not None else now
            else:
                first = sock.recv(copy=False)
                if not sock.getsockopt(zmq.RCVMORE):
                    kind = first.bytes.decode()
                    sock.send(b"ok")
                    if kind == "stop":
                        return
                    continue
                md = json.loads(first.bytes)
                buf = sock.recv(copy=False)
                np.frombuffer(buf.buffer, dtype=md["dtype"]).reshape(md["shape"])
                now = time.monotonic_ns()
                sent = md["t"]
            sock.send(struct.pack("<q", now - sent))
    finally:
        sock.close(linger=0)
        ctx.term()


def hop_latency(images: list[np.ndarray], endpoint: str, n: int, block: int = 50) -> dict[str, Any]:
    spawn = mp.get_context("spawn")
    server = spawn.Process(target=_echo, args=(endpoint,), daemon=True)
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.linger = 0
    sock.connect(endpoint)
    frames = [Frame(pixels=img, bits_stored=12, seq=i) for i, img in enumerate(images)]
    out: dict[str, dict[str, list[float]]] = {k: {"one_way": [], "rtt": []} for k in ("ours", "bare")}

    def control(word: bytes) -> None:
        sock.send(word)
        if not sock.poll(TIMEOUT_MS):
            raise TimeoutError("echo server did not answer")
        sock.recv()

    try:
        control(b"ours")  # also waits for the server to be up
        for b in range(max(1, n // block) + 1):  # block 0 is warm-up, discarded
            for kind in (("ours", "bare") if b % 2 else ("bare", "ours")):
                control(kind.encode())
                for i in range(block):
                    img = images[i % len(images)]
                    t0 = time.monotonic_ns()
                    if kind == "ours":
                        f = frames[i % len(frames)]
                        f.stamps["source_send"] = t0
                        protocol.send(sock, protocol.encode_frame(f))
                    else:
                        sock.send_json({"dtype": str(img.dtype), "shape": img.shape, "t": t0}, zmq.SNDMORE)
                        sock.send(img, copy=False)
                    if not sock.poll(TIMEOUT_MS):
                        raise TimeoutError("no echo")
                    one_way = struct.unpack("<q", sock.recv())[0]
                    rtt = time.monotonic_ns() - t0
                    if b > 0:
                        out[kind]["one_way"].append(one_way / 1000)
                        out[kind]["rtt"].append(rtt / 1000)
        control(b"stop")
    finally:
        sock.close(linger=0)
        ctx.term()
        _reap(server)
    res: dict[str, Any] = {"unit": "us", "endpoint": endpoint.split("://")[0]}
    for kind, series in out.items():
        res[kind] = {m: summarize(v) for m, v in series.items()}
    res["ratio_p50_one_way"] = round(res["ours"]["one_way"]["p50"] / res["bare"]["one_way"]["p50"], 3)
    res["ratio_p99_one_way"] = round(res["ours"]["one_way"]["p99"] / res["bare"]["one_way"]["p99"], 3)
    res["ratio_p50_rtt"] = round(res["ours"]["rtt"]["p50"] / res["bare"]["rtt"]["p50"], 3)
    return res


# --------------------------------------------------------------------------- 3. throughput


def _imagezmq_hub(endpoint: str, n: int) -> None:
    import imagezmq

    hub = imagezmq.ImageHub(open_port=endpoint)
    try:
        for _ in range(n):
            if not hub.zmq_socket.poll(TIMEOUT_MS):
                return
            hub.recv_image()
            hub.send_reply(b"OK")
    finally:
        hub.zmq_socket.close(linger=0)


def imagezmq_throughput(images: list[np.ndarray], n: int) -> dict[str, Any]:
    import imagezmq

    port = free_tcp_ports(1)[0]
    warm = 20
    spawn = mp.get_context("spawn")
    hub = spawn.Process(target=_imagezmq_hub, args=(f"tcp://127.0.0.1:{port}", n + warm), daemon=True)
    hub.start()
    sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}")  # default: REQ/REP
    sender.zmq_socket.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)  # our harness must not hang; imagezmq's would
    per = []
    try:
        for i in range(warm):
            sender.send_image("warm", images[i % len(images)])
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter_ns()
            sender.send_image("frame", images[i % len(images)])
            per.append((time.perf_counter_ns() - t) / 1000)
        elapsed = time.perf_counter() - t0
    finally:
        sender.zmq_socket.close(linger=0)
        _reap(hub)
    return {"fps": round(n / elapsed, 1), "frames": n, "per_frame_us": summarize(per),
            "imagezmq_version": getattr(imagezmq, "__version__", "?")}


def _credit_worker(endpoint: str, window: int, shm: bool = False) -> None:
    """The worker side of the credit protocol, bare: decode + validate each frame, hand back credit.
    With ``shm`` the pixels are read from the source's shared-memory slots (docs/PROTOCOL.md 3.1)."""
    shm_map = protocol.ShmMap() if shm else None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    done = 0
    try:
        protocol.send(sock, protocol.encode_control("credit", worker="bench", done=0, window=window))
        while sock.poll(TIMEOUT_MS):
            m = protocol.decode(sock.recv_multipart(copy=False), shm=shm_map)
            if m.type != "frame":
                return
            if m.shm is not None and shm_map is not None and not shm_map.intact(m.shm):
                raise RuntimeError("a shared-memory slot was rewritten while in use")
            done += 1
            protocol.send(sock, protocol.encode_control("credit", worker="bench", done=done, window=window))
    finally:
        sock.close(linger=0)
        ctx.term()
        if shm_map is not None:
            shm_map.close()


def credit_throughput(images: list[np.ndarray], endpoint: str, n: int, window: int,
                      shm: bool = False) -> dict[str, Any]:
    """Our transport alone between two processes: ROUTER source, DEALER worker, credit window; with
    ``shm`` each frame is copied into a free slot of a shared-memory ring (ShmRing, released when
    the worker's credit covers it) and only the header travels, as the pipeline's --shared-memory."""
    spawn = mp.get_context("spawn")
    worker = spawn.Process(target=_credit_worker, args=(endpoint, window, shm), daemon=True)
    ring = protocol.ShmRing(images[0].nbytes, window) if shm else None
    held: list[int] = []  # ring slots in flight, oldest first
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(endpoint)
    worker.start()
    frames = [Frame(pixels=img, bits_stored=12, seq=i) for i, img in enumerate(images)]
    warm = 20
    sent = done = 0
    t0 = 0.0
    try:
        while done < n + warm:
            if not router.poll(TIMEOUT_MS):
                raise TimeoutError("no credit from the bench worker")
            ident, header = router.recv_multipart()
            done = protocol.decode([header]).header["done"]
            if done == warm:
                t0 = time.perf_counter()
            while ring is not None and len(held) > sent - done:  # the worker is done with these
                ring.release(held.pop(0))
            while sent - done < window and sent < n + warm:
                f = frames[sent % len(frames)]
                f.seq = sent
                ref = None
                if ring is not None:
                    slot = ring.alloc()
                    if slot is None:
                        raise RuntimeError("no free shared-memory slot within the credit window")
                    held.append(slot)
                    ref = ring.write(slot, f.pixels)
                f.stamps["source_send"] = time.monotonic_ns()
                protocol.send(router, [ident, *protocol.encode_frame(f, ref)])
                sent += 1
        elapsed = time.perf_counter() - t0
        protocol.send(router, [ident, *protocol.encode_control("event", node="bench", event="end")])
    finally:
        router.close(linger=0)
        ctx.term()
        _reap(worker)
        if ring is not None:
            ring.close()
    return {"fps": round(n / elapsed, 1), "frames": n, "window": window, "transport": endpoint.split("://")[0],
            "shared_memory": shm}


def pipeline_throughput(source: SyntheticSource, n: int, mode: str, transport: str, window: int,
                        shared_memory: bool = False) -> dict[str, Any]:
    from dataclasses import replace

    report = run_pipeline(replace(source, count=n), BuiltinProcessor("noop"), n_workers=1, mode=mode,
                          transport=transport, policy="all", window=window, shared_memory=shared_memory)
    if report.results != n or any(report.drops.values()) or report.rejected:
        raise RuntimeError(f"the pipeline lost frames: {report.results}/{n} results, drops {report.drops}, "
                           f"rejected {report.rejected}")
    sink = sorted(r["stamps"]["sink_recv"] for r in report.records)
    warm = min(20, len(sink) // 5)
    sink = sink[warm:]
    fps = (len(sink) - 1) / ((sink[-1] - sink[0]) / 1e9) if len(sink) > 1 else 0.0
    return {"fps": round(fps, 1), "frames": report.results, "mode": mode, "transport": transport, "window": window,
            "shared_memory": shared_memory, "e2e_ms": report.stats["e2e_ms"], "drops": report.drops}


WINDOW = 4  # credit window of the throughput rows (policy "all"): enough to keep the pipe full


def throughput(source: SyntheticSource, images: list[np.ndarray], n: int, rounds: int,
               tmp: str) -> dict[str, Any]:
    """Every row ``rounds`` times, each of ours right after an imagezmq run (same load); ratios per pair."""
    rows: dict[str, Any] = {
        "ours_transport_tcp_w2": lambda: credit_throughput(images, f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}", n, 2),
        "ours_transport_ipc_w2": lambda: credit_throughput(images, f"ipc://{tmp}/credit", n, 2),
        "ours_transport_ipc_shm_w4": lambda: credit_throughput(images, f"ipc://{tmp}/credit", n, WINDOW, True),
        "ours_process_ipc": lambda: pipeline_throughput(source, n, "process", "ipc", WINDOW),
        "ours_process_tcp": lambda: pipeline_throughput(source, n, "process", "tcp", WINDOW),
        "ours_process_ipc_shm": lambda: pipeline_throughput(source, n, "process", "ipc", WINDOW, True),
        "ours_thread_inproc": lambda: pipeline_throughput(source, n, "thread", "inproc", WINDOW),
    }
    try:
        import imagezmq  # noqa: F401
        have_imagezmq = True
    except ImportError:
        print("  imagezmq not installed: no ratios (pip install imagezmq)")
        have_imagezmq = False
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ["imagezmq_reqrep_tcp", *rows]}
    for r in range(rounds):
        order = list(rows)[r % len(rows):] + list(rows)[:r % len(rows)]  # rotate: no row always goes first
        for i, name in enumerate(order):
            # within a pair, imagezmq goes first in every other pair: neither side always runs after the other
            first_ours = (r + i) % 2 == 1
            ours = rows[name]() if first_ours else None
            base = imagezmq_throughput(images, n) if have_imagezmq else None
            if ours is None:
                ours = rows[name]()
            ours["load1"] = round(os.getloadavg()[0], 2)
            if base is not None:
                runs["imagezmq_reqrep_tcp"].append(base)
                ours["imagezmq_fps_paired"] = base["fps"]
                ours["x_imagezmq"] = round(ours["fps"] / base["fps"], 2)
            runs[name].append(ours)
            print(f"  round {r + 1}/{rounds} {name:<22} {ours['fps']:>8.1f} fps"
                  + (f"  imagezmq {base['fps']:.1f} fps  x{ours['x_imagezmq']:.2f}" if base else ""), flush=True)
    out: dict[str, Any] = {}
    for name, series in runs.items():
        if not series:
            continue
        fps = [s["fps"] for s in series]
        row: dict[str, Any] = {"fps": round(float(np.median(fps)), 1), "fps_min": min(fps), "fps_max": max(fps),
                               "rounds": series}
        ratios = [1.0] * len(series) if name == "imagezmq_reqrep_tcp" else [
            s["x_imagezmq"] for s in series if "x_imagezmq" in s]
        if ratios:
            row.update(x_imagezmq=round(float(np.median(ratios)), 2), x_imagezmq_min=min(ratios),
                       x_imagezmq_max=max(ratios))
        out[name] = row
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "transport.json")
    parser.add_argument("--frames", type=int, default=1000, help="frames per measurement")
    parser.add_argument("--size", type=int, default=1024, help="frame side (uint16 frames)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each throughput row")
    args = parser.parse_args(argv)
    source, images = frames_for(args.size)
    mb = images[0].nbytes / 2**20
    print(f"frames: {args.size}x{args.size} uint16 ({mb:.1f} MiB), {len(images)} distinct, {args.frames} per run")
    result: dict[str, Any] = {"frame": {"shape": [args.size, args.size], "dtype": "uint16", "mib": round(mb, 2)},
                              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                                          "load1_at_start": round(os.getloadavg()[0], 2)}}
    print("1/3 header cost ...", flush=True)
    result["header_cost"] = header_cost(images, min(args.frames, 500))
    with __import__("tempfile").TemporaryDirectory(prefix="bench-") as tmp:
        print("2/3 hop latency over ipc and tcp ...", flush=True)
        result["hop_ipc"] = hop_latency(images, f"ipc://{tmp}/hop", args.frames)
        result["hop_tcp"] = hop_latency(images, f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}", args.frames)
    print("3/3 throughput ...", flush=True)
    with __import__("tempfile").TemporaryDirectory(prefix="bench-") as tmp:
        thr = throughput(source, images, args.frames, args.rounds, tmp)
    result["throughput"] = thr
    result["machine"]["load1_at_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    hc = result["header_cost"]
    print(f"\nheader ({hc['header_bytes']} B JSON): encode p50 {hc['encode']['p50']:.1f} us, "
          f"decode+validate p50 {hc['decode_validate']['p50']:.1f} us; copying the pixels once: "
          f"{hc['pixel_copy_for_scale']['p50']:.0f} us")
    print(f"\n{'hop latency (us)':<22}{'ours p50':>10}{'ours p99':>10}{'bare p50':>10}{'bare p99':>10}{'p50 x':>8}")
    for key in ("hop_ipc", "hop_tcp"):
        h = result[key]
        print(f"{'one-way ' + h['endpoint']:<22}{h['ours']['one_way']['p50']:>10.0f}{h['ours']['one_way']['p99']:>10.0f}"
              f"{h['bare']['one_way']['p50']:>10.0f}{h['bare']['one_way']['p99']:>10.0f}{h['ratio_p50_one_way']:>8.2f}")
    print(f"\nthroughput, {args.rounds} rounds (load1 {result['machine']['load1_at_start']} at start, "
          f"{result['machine']['load1_at_end']} at end)")
    print(f"{'':<24}{'fps median':>11}{'fps min..max':>18}{'x imagezmq':>12}{'x min..max':>14}")
    for name, row in thr.items():
        spread = f"{row['fps_min']:.0f}..{row['fps_max']:.0f}"
        ratio = f"{row['x_imagezmq_min']:.2f}..{row['x_imagezmq_max']:.2f}" if "x_imagezmq" in row else ""
        print(f"{name:<24}{row['fps']:>11.1f}{spread:>18}{row.get('x_imagezmq', float('nan')):>12.2f}{ratio:>14}")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
