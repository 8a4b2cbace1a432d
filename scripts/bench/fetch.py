"""Benchmark `fetch`: weights fetching in one run, our fetch vs boto3's download_file defaults vs a loopback ceiling.

    python -m scripts.bench fetch                                 # 1 GiB object, 3 rounds
    python -m scripts.bench fetch --size 64MiB --rounds 1         # (the entry point runs python -m scripts.bench.fetch)

It starts a local SeaweedFS (the tests' fixture, on free loopback ports), uploads one random object of --size, and
serves the same file with nginx. Every round then measures, each into a fresh destination (page cache flushed to
disk in between, never inside a timing):

- ``sd fetch``           sd_core.storage.fetch(s3://...) into an empty cache (client creation, HEAD, parallel ranged
                         GETs into a pre-allocated file, publish) — what a cold start pays without a pinned sha256
- ``sd fetch + sha256``  the same with the manifest's sha256 verified (hashing overlaps the download)
- ``boto3 defaults``     boto3.client("s3").download_file(...) with its default TransferConfig
- ``sd fetch via nginx`` our http(s) path against nginx (our client when the server is not the bottleneck)
- ``ceiling: curl``      one curl downloading the file from nginx (sendfile) to disk
- ``ceiling: 16 curl ranges``  16 parallel ranged curl GETs from nginx, each piped by dd into its offset of one file;
                         the faster of the two ceiling rows is the loopback/disk ceiling the ratios use

and prints the median and best MB/s (1 MB = 10^6 bytes) per method with the ratios ours/boto3 and ours/ceiling
(targets: >= 2x and >= 0.8x). The order of the methods rotates from round to round; on a machine shared with other
work, "best" approximates the unloaded speed and "median" the typical one. nginx and curl come from Debian
(``apt-get install -y nginx curl``); without them the ceiling rows are skipped. Everything it starts is stopped by
PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.common import run_module

MB = 1_000_000
UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": MB, "mb": MB, "mib": 1 << 20, "g": 10**9,
         "gb": 10**9, "gib": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1GiB, 64MiB, 500MB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = 64 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(block, left))
            h.update(data)
            f.write(data)
            left -= len(data)
    return h.hexdigest()


class Nginx:
    """nginx serving one folder on a free loopback port (sendfile on, Range supported), stopped by PID."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir = root, workdir
        from tests.fixtures.s3 import free_ports

        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Nginx:
        w = self.workdir
        (w / "tmp").mkdir(parents=True, exist_ok=True)
        conf = w / "nginx.conf"
        temps = " ".join(f"{kind}_temp_path {w}/tmp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                     "scgi"))
        conf.write_text(f"""daemon off;
worker_processes 2;
pid {w}/nginx.pid;
error_log {w}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on;
  {temps}
  server {{ listen 127.0.0.1:{self.port}; root {self.root}; }}
}}
""")
        self.proc = subprocess.Popen([shutil.which("nginx"), "-c", str(conf), "-e", str(w / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["curl", "-s", "-o", os.devnull, f"http://127.0.0.1:{self.port}/"]).returncode == 0:
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("nginx did not start")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


def parallel_curl(url: str, out: Path, size: int, n: int = 16) -> None:
    """n ranged curl GETs in parallel, each piped by dd into its offset of one pre-sized file (all native code)."""
    with open(out, "wb") as f:
        f.truncate(size)
    part = -(-size // n)
    procs = []
    for i in range(n):
        a, b = i * part, min(size, (i + 1) * part) - 1
        if a > b:
            break
        cmd = (f"curl -sf -r {a}-{b} {url} | dd of={out} bs=1M seek={a} oflag=seek_bytes conv=notrunc "
               "status=none")
        procs.append(subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd]))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"parallel curl failed: {codes}")


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its children) of fn()."""
    os.sync()  # flush earlier rounds' dirty pages so they do not slow this one
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu() - c0


def bench(args, work: Path) -> dict:
    """The `fetch` benchmark of the entry point: this module in a fresh process, in its own temp folder (nginx needs
    one it can read)."""
    argv = list(args.extra)
    if args.smoke:
        argv = ["--size", "8MiB", "--rounds", "1", *argv]
    elif args.quick:
        argv = ["--size", "256MiB", "--rounds", "1", *argv]
    return run_module("scripts.bench.fetch", argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="object size (default 1GiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp folder, deleted at the end)")
    parser.add_argument("--concurrency", type=int, help="SD_FETCH_CONCURRENCY for our fetch")
    parser.add_argument("--part-mb", type=float, help="SD_FETCH_PART_MB for our fetch")
    args = parser.parse_args(argv)

    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="bench_fetch_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, scratch)
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args, scratch: Path) -> int:
    import boto3
    from boto3.s3.transfer import TransferConfig

    from sd_core.settings import Settings
    from sd_core.storage import fetch
    from tests.fixtures.s3 import SeaweedFS

    size = args.size
    src_dir = scratch / "www"
    src_dir.mkdir(exist_ok=True)
    for d in (scratch, src_dir):
        d.chmod(0o755)  # nginx workers run as an unprivileged user
    src = src_dir / "weights.bin"
    print(f"preparing a {size / MB:.1f} MB random object ...", flush=True)
    digest = make_file(src, size)
    have_nginx = bool(shutil.which("nginx") and shutil.which("curl"))
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def record(name: str, timing: tuple[float, float]) -> None:
        seconds, cpu_seconds = timing
        results.setdefault(name, []).append(size / MB / seconds)
        cpu.setdefault(name, []).append(cpu_seconds / (size / 2**30))
        print(f"  {name:<24} {size / MB / seconds:8.1f} MB/s  ({seconds:.2f}s, client CPU {cpu_seconds:.2f}s)",
              flush=True)

    with SeaweedFS(scratch / "weed") as s3, (Nginx(src_dir, scratch / "nginx") if have_nginx
                                              else contextlib.nullcontext()) as nginx:
        os.environ.update(s3.env)
        bucket = s3.make_bucket("bench")
        s3.client().upload_file(str(src), bucket, "weights.bin",
                                Config=TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8))
        uri = f"s3://{bucket}/weights.bin"
        overrides = {}
        if args.concurrency:
            overrides["fetch_concurrency"] = args.concurrency
        if args.part_mb:
            overrides["fetch_part_mb"] = args.part_mb
        base = Settings.from_env()
        print(f"our settings: concurrency {overrides.get('fetch_concurrency', base.fetch_concurrency)}, part "
              f"{overrides.get('fetch_part_mb', base.fetch_part_mb)} MiB; cpus: {os.cpu_count()}; "
              f"load average: {os.getloadavg()[0]:.2f}", flush=True)

        def settings(tag: str) -> Settings:
            cache = scratch / f"cache-{tag}"
            shutil.rmtree(cache, ignore_errors=True)
            return Settings(cache_dir=cache, s3_endpoint_url=s3.endpoint_url, cache_max_gb=1000.0,
                            fetch_progress_s=3600, **overrides)

        def clean(tag: str) -> None:
            shutil.rmtree(scratch / f"cache-{tag}", ignore_errors=True)

        out = scratch / "out.bin"
        def boto_default() -> None:
            client = boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url)
            client.download_file(bucket, "weights.bin", str(out))

        def measure(name: str) -> None:
            if name == "sd fetch":
                st = settings("sd")
                record(name, timed(lambda: fetch(uri, st)))
                clean("sd")
            elif name == "sd fetch + sha256":
                st = settings("sha")
                record(name, timed(lambda: fetch(uri, st, sha256=digest)))
                clean("sha")
            elif name == "boto3 defaults":
                record(name, timed(boto_default))
                out.unlink()
            elif name == "sd fetch via nginx":
                st = settings("http")
                record(name, timed(lambda: fetch(url, st)))
                clean("http")
            elif name == "ceiling: curl":
                record(name, timed(lambda: subprocess.run(["curl", "-sf", "-o", str(out), url], check=True)))
                out.unlink()
            elif name == "ceiling: 16 curl ranges":
                record(name, timed(lambda: parallel_curl(url, out, size)))
                out.unlink()

        url = f"http://127.0.0.1:{nginx.port}/weights.bin" if nginx is not None else ""
        methods = ["sd fetch", "sd fetch + sha256", "boto3 defaults"]
        if nginx is not None:
            methods += ["sd fetch via nginx", "ceiling: curl", "ceiling: 16 curl ranges"]
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for name in methods[r % len(methods):] + methods[: r % len(methods)]:  # rotate: spread load drift
                measure(name)

    median = {name: statistics.median(v) for name, v in results.items()}
    best = {name: max(v) for name, v in results.items()}
    print(f"\n{size / MB:.1f} MB object, {args.rounds} round(s), MB/s (1 MB = 10^6 bytes); load average now "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    print(f"  {'method':<24} {'median':>8} {'best':>8} {'CPU s/GiB':>10}   runs")
    for name in median:
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        print(f"  {name:<24} {median[name]:8.1f} {best[name]:8.1f} {statistics.median(cpu[name]):10.2f}   [{runs}]")
    print("  (CPU s/GiB: the client's own CPU time — this process's threads, or curl/dd — not the server's)")
    for label, stat in (("median", median), ("best", best)):
        ours, boto = stat["sd fetch"], stat["boto3 defaults"]
        line = (f"{label:>6}: ours/boto3 {ours / boto:.2f}x (target >= 2x), "
                f"ours+sha256/boto3 {stat['sd fetch + sha256'] / boto:.2f}x")
        if "ceiling: curl" in stat:
            ceiling = max(stat["ceiling: curl"], stat["ceiling: 16 curl ranges"])
            line += (f"; ceiling {ceiling:.0f} MB/s: ours/ceiling {ours / ceiling:.2f}x (target >= 0.8x), "
                     f"ours+sha256/ceiling {stat['sd fetch + sha256'] / ceiling:.2f}x, "
                     f"ours via nginx/ceiling {stat['sd fetch via nginx'] / ceiling:.2f}x")
        print(line)
    if "ceiling: curl" not in median:
        print("ceiling: skipped (apt-get install -y nginx curl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
