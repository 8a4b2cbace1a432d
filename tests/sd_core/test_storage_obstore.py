"""The obstore transfer engine (SD_FETCH_ENGINE): same bytes, checks and errors as boto3's, hashed as they arrive."""

from __future__ import annotations

import errno
import hashlib
import os
import ssl
import stat

import pytest

from sd_core.errors import FetchError
from sd_core.settings import Settings
from sd_core.storage import fetch
from sd_core.storage.s3 import S3Source, s3_client
from sd_core.storage.s3_obstore import store_config

pytest.importorskip("obstore")

MiB = 1024 * 1024


def settings_for(tmp_path, endpoint, **overrides) -> Settings:
    values = dict(cache_dir=tmp_path / "cache", s3_endpoint_url=endpoint, fetch_part_mb=0.25, fetch_concurrency=4,
                  fetch_retries=1, fetch_timeout_s=10.0, cache_max_gb=10.0, fetch_engine="obstore")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def no_boto3_reads(monkeypatch):
    """Fails the test if boto3 moves a byte of an object (its metadata calls stay allowed)."""
    def refuse(*args, **kwargs):
        raise AssertionError("boto3 read an object's bytes: the obstore engine was not used")

    monkeypatch.setattr(S3Source, "_read_range_boto3", refuse)


def test_obstore_engine_fetches_the_same_bytes_verified(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path,
                                                        no_boto3_reads):
    data = os.urandom(3 * MiB + 12345)  # 13 ranged parts, the last one short
    s3_server.client().put_object(Bucket=s3_bucket, Key="w/model.bin", Body=data)
    settings = settings_for(tmp_path, s3_proxy.endpoint_url)
    path = fetch(f"s3://{s3_bucket}/w/model.bin", settings, sha256=hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    gets = [r for r in s3_proxy.requests if r.method == "GET" and r.range]
    assert len(gets) == 13 and all(r.range.startswith("bytes=") for r in gets)
    assert all("X-Amz-Signature=" in r.path for r in gets)  # presigned reads into one buffer (signed_get.py)
    # a folder too (each object's etag sent as If-Match, checked by the store)
    s3_server.client().put_object(Bucket=s3_bucket, Key="w/sub/b.txt", Body=b"small")
    folder = fetch(f"s3://{s3_bucket}/w/", settings_for(tmp_path / "2", s3_server.endpoint_url))
    assert (folder / "model.bin").read_bytes() == data and (folder / "sub" / "b.txt").read_bytes() == b"small"


def _counting(monkeypatch, name: str, keep=lambda fd, n: True) -> list[int]:
    """Counts the bytes of every os.<name> call (e.g. splice, preadv) that keep(fd, n) selects."""
    seen, real = [], getattr(os, name)

    def counting(fd, *args, **kwargs):
        n = real(fd, *args, **kwargs)
        if keep(args[0] if name == "splice" else fd, n):
            seen.append(n)
        return n

    monkeypatch.setattr(os, name, counting)
    return seen


def _is_file(fd: int, n: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def test_plain_http_parts_are_spliced_into_the_file_and_hashed_where_they_lie(s3_server, s3_env, s3_bucket, tmp_path,
                                                                             monkeypatch):
    """Over plain http each part's body goes socket → pipe → cache file inside the kernel, never through Python, and
    the sha256 is computed from the file's pages (mapped) without copying a byte back: with 4 parts in flight."""
    from sd_core.storage import signed_get

    monkeypatch.setattr(signed_get, "SPLICE", True)
    data = os.urandom(2 * MiB + 777)
    s3_server.client().put_object(Bucket=s3_bucket, Key="h.bin", Body=data)
    into_file = _counting(monkeypatch, "splice", _is_file)  # (pipe → file moves; socket → pipe ones not counted)
    read_back = _counting(monkeypatch, "preadv")
    path = fetch(f"s3://{s3_bucket}/h.bin", settings_for(tmp_path, s3_server.endpoint_url),
                 sha256=hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    assert sum(into_file) > 0.9 * len(data)  # (the rest: what http.client buffered with each part's headers)
    assert sum(read_back) == 0


def test_a_filesystem_refusing_splice_gets_the_bytes_through_memory(s3_server, s3_env, s3_bucket, tmp_path,
                                                                    monkeypatch):
    """A cache on a filesystem without splice support (EINVAL): the bytes already in the pipe and the rest of the
    part go through memory, later parts use readinto; the object is whole and verified."""
    from sd_core.storage import signed_get

    monkeypatch.setattr(signed_get, "SPLICE", True)
    data = os.urandom(MiB + 4321)
    s3_server.client().put_object(Bucket=s3_bucket, Key="e.bin", Body=data)
    real = os.splice
    refused = []

    def refusing(src, dst, count, *args, **kwargs):
        if _is_file(dst, 0):
            refused.append(count)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(os, "splice", refusing)
    path = fetch(f"s3://{s3_bucket}/e.bin", settings_for(tmp_path, s3_server.endpoint_url),
                 sha256=hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    assert refused and signed_get.SPLICE is False


def test_an_https_store_is_read_verified(s3_server, s3_env, s3_bucket, tmp_path, monkeypatch):
    """Real S3 is https: with the store's CA in AWS_CA_BUNDLE the HEAD (obstore) and every part (signed_get, its one
    TLS context) verify the server, the bytes arrive whole (read through a buffer: TLS cannot be spliced). Without
    that CA the fetch fails with the endpoint named and nothing is cached."""
    data = os.urandom(MiB + 99)
    s3_server.client().put_object(Bucket=s3_bucket, Key="tls.bin", Body=data)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.https_endpoint_url)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(s3_server.ca_file))
    spliced = _counting(monkeypatch, "splice")
    settings = settings_for(tmp_path, s3_server.https_endpoint_url)
    path = fetch(f"s3://{s3_bucket}/tls.bin", settings, sha256=hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data and spliced == []
    monkeypatch.delenv("AWS_CA_BUNDLE")
    with pytest.raises(FetchError) as error:
        fetch(f"s3://{s3_bucket}/tls.bin", settings_for(tmp_path / "2", s3_server.https_endpoint_url, fetch_retries=0))
    assert s3_server.https_endpoint_url in error.value.message and "not trusted" in error.value.message
    assert error.value.field == "AWS_CA_BUNDLE"
    assert not list((tmp_path / "2" / "cache").rglob("tls.bin"))


def test_changed_and_missing_objects_are_explained_like_boto3s(s3_server, s3_env, s3_bucket, tmp_path, monkeypatch):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="c.bin", Body=os.urandom(MiB))
    uri = f"s3://{s3_bucket}/c.bin"
    source_stat = S3Source.stat

    def stat_then_change(self):
        obj = source_stat(self)
        client.put_object(Bucket=s3_bucket, Key="c.bin", Body=os.urandom(MiB))  # a new version: ETag differs
        return obj

    monkeypatch.setattr(S3Source, "stat", stat_then_change)
    with pytest.raises(FetchError, match="changed in the store during the download"):
        fetch(uri, settings_for(tmp_path, s3_server.endpoint_url))

    def stat_then_delete(self):
        obj = source_stat(self)
        client.delete_object(Bucket=s3_bucket, Key="c.bin")
        return obj

    monkeypatch.setattr(S3Source, "stat", stat_then_delete)
    with pytest.raises(FetchError, match="object not found") as info:
        fetch(uri, settings_for(tmp_path / "2", s3_server.endpoint_url))
    assert "X-Amz" not in str(info.value) and s3_server.secret_key not in str(info.value)


def test_store_config_follows_boto3s_addressing(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    loopback = store_config(s3_client(endpoint_url="http://127.0.0.1:8333", region="us-east-1"), "b", "k/x.bin")
    assert loopback == {"region": "us-east-1", "allow_http": True, "endpoint": "http://127.0.0.1:8333",
                        "virtual_hosted_style_request": False}
    aws = store_config(s3_client(region="eu-west-3"), "my-bucket", "x.bin")
    assert aws["region"] == "eu-west-3" and aws["allow_http"] is False
    assert aws["virtual_hosted_style_request"] and aws["endpoint"] == "https://my-bucket.s3.eu-west-3.amazonaws.com"
    path_style = store_config(s3_client(endpoint_url="https://minio.example:9000/prefix", region="us-east-1",
                                        path_style=True), "b", "x.bin")
    assert path_style["endpoint"] == "https://minio.example:9000/prefix"
    assert not path_style["virtual_hosted_style_request"] and not path_style["allow_http"]


def test_engine_setting_is_checked(s3_server, s3_env, s3_bucket, tmp_path, monkeypatch):
    s3_server.client().put_object(Bucket=s3_bucket, Key="e.bin", Body=b"x" * 1000)
    with pytest.raises(FetchError, match="SD_FETCH_ENGINE must be auto, obstore or boto3"):
        fetch(f"s3://{s3_bucket}/e.bin", settings_for(tmp_path, s3_server.endpoint_url, fetch_engine="rust"))
    assert Settings.from_env({"SD_FETCH_ENGINE": "boto3"}).fetch_engine == "boto3"
    path = fetch(f"s3://{s3_bucket}/e.bin", settings_for(tmp_path / "b", s3_server.endpoint_url,
                                                         fetch_engine="boto3"))
    assert path.read_bytes() == b"x" * 1000


ENV_CASES = [
    ({"AWS_DEFAULT_REGION": "us-east-1"}, None, "my-bucket"),
    ({"AWS_DEFAULT_REGION": "eu-west-3"}, None, "my-bucket"),
    ({"AWS_DEFAULT_REGION": "eu-west-3"}, None, "my.dotted.bucket"),
    ({}, None, "plain"),
    ({"AWS_DEFAULT_REGION": "us-west-2", "AWS_ENDPOINT_URL": "http://minio:9000"}, None, "bucket"),
    ({"AWS_ENDPOINT_URL_S3": "https://acct.r2.cloudflarestorage.com"}, None, "my-bucket"),
    ({"AWS_DEFAULT_REGION": "auto"}, "https://acct.r2.cloudflarestorage.com/", "weights"),
    ({"AWS_ENDPOINT_URL": "http://10.0.0.5:8333"}, "http://127.0.0.1:8333", "b"),
]


@pytest.mark.parametrize(("env", "endpoint", "bucket"), ENV_CASES)
def test_env_config_is_what_boto3_itself_uses(env, endpoint, bucket, monkeypatch, tmp_path):
    """The boto3-free fast path (keys in the environment) addresses and signs exactly like boto3's own client."""
    from sd_core.storage.s3_obstore import env_config

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    base = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "tok",
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for name, value in {**base, **env}.items():
        monkeypatch.setenv(name, value)
    settings = Settings(cache_dir=tmp_path, s3_endpoint_url=endpoint)
    fast = env_config(settings, bucket)
    if env.get("AWS_DEFAULT_REGION") == "auto":
        assert fast is None  # (a region name botocore would pass through: boto3 decides)
        return
    boto = store_config(s3_client(settings), bucket, "k/x.bin")
    assert fast == {**boto, "access_key_id": "AKIDEXAMPLE", "secret_access_key": "secret", "token": "tok"}


def test_env_config_defers_to_boto3_for_profiles_and_config_files(monkeypatch, tmp_path):
    from sd_core.storage.s3_obstore import env_config

    keys = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_CONFIG_FILE": os.devnull}
    settings = Settings(cache_dir=tmp_path)
    assert env_config(settings, "b", keys) is not None
    assert env_config(settings, "b", {**keys, "AWS_PROFILE": "dev"}) is None
    assert env_config(settings, "b", {"AWS_SECRET_ACCESS_KEY": "b", "AWS_CONFIG_FILE": os.devnull}) is None
    config = tmp_path / "config"
    config.write_text("[default]\ns3 =\n  addressing_style = virtual\n")
    assert env_config(settings, "b", {**keys, "AWS_CONFIG_FILE": str(config)}) is None


def test_fast_path_stat_and_list_match_boto3s(s3_server, s3_env, s3_bucket, tmp_path, monkeypatch):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="d/a.bin", Body=b"a" * 100)
    client.put_object(Bucket=s3_bucket, Key="d/sub/b.bin", Body=b"b" * 7)
    from sd_core.storage.uris import parse_uri

    fast = S3Source(parse_uri(f"s3://{s3_bucket}/d/a.bin"), settings_for(tmp_path, s3_server.endpoint_url))
    slow = S3Source(parse_uri(f"s3://{s3_bucket}/d/a.bin"), settings_for(tmp_path, s3_server.endpoint_url,
                                                                          fetch_engine="boto3"))
    assert fast.stat() == slow.stat()
    assert "client" not in fast.__dict__  # answered without creating a boto3 client
    folder = f"s3://{s3_bucket}/d/"
    fast = S3Source(parse_uri(folder), settings_for(tmp_path, s3_server.endpoint_url))
    slow = S3Source(parse_uri(folder), settings_for(tmp_path, s3_server.endpoint_url, fetch_engine="boto3"))
    assert sorted(fast.list(), key=lambda o: o.rel) == sorted(slow.list(), key=lambda o: o.rel)
    assert "client" not in fast.__dict__


def test_a_cold_fetch_imports_no_boto3(s3_server, s3_env, s3_bucket, tmp_path):
    """A worker's first fetch with keys in the environment creates no boto3 client (~0.5 s of CPU at a cold start)."""
    import subprocess
    import sys
    from pathlib import Path

    data = os.urandom(MiB)
    s3_server.client().put_object(Bucket=s3_bucket, Key="cold/w.bin", Body=data)
    code = ("import sys; from sd_core.settings import Settings; from sd_core.storage import fetch; "
            f"p = fetch('s3://{s3_bucket}/cold/w.bin', Settings.from_env()); "
            "print(p); print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))")
    env = {**os.environ, "SD_CACHE_DIR": str(tmp_path / "cache"), "SD_FETCH_ENGINE": "obstore"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    path, modules = result.stdout.splitlines()[-2:]
    assert Path(path).read_bytes() == data
    assert modules == "[]"


def test_a_fetch_only_process_imports_no_request_schema():
    # The fetch path's process start (preload, scripts/ops/warm_cache.py, the fetch benchmark) is CPU paid per cold
    # start: the pydantic request schema (~0.25 s of CPU) is not part of it. sd_core's names still resolve on demand.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "from sd_core.storage import fetch\n"
            "import sd_core.storage.s3_obstore\n"
            "print(sorted(m for m in ('pydantic', 'sd_core.schema', 'boto3', 'botocore') if m in sys.modules))\n"
            "from sd_core import GenerationRequest, parse_request\n"
            "print(GenerationRequest.__name__, parse_request.__name__)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["[]", "GenerationRequest parse_request"], proc.stdout


def test_behind_a_proxy_obstore_streams_the_same_bytes(s3_server, s3_env, s3_bucket, s3_proxy, tmp_path, monkeypatch,
                                                      no_boto3_reads):
    """Presigned reads go straight to the endpoint: with a proxy in the environment obstore's client (which honours
    it) moves the bytes instead, the same bytes and checks."""
    data = os.urandom(MiB + 7)
    s3_server.client().put_object(Bucket=s3_bucket, Key="p.bin", Body=data)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # (the endpoint is http://: not used for it)
    path = fetch(f"s3://{s3_bucket}/p.bin", settings_for(tmp_path, s3_proxy.endpoint_url),
                 sha256=hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    gets = [r for r in s3_proxy.requests if r.method == "GET" and r.range]
    assert gets and not any("X-Amz-Signature=" in r.path for r in gets)


def test_signed_reads_refuse_what_would_write_outside_the_part():
    """A store answering a ranged GET with the whole object (200) is retried, nothing written; a final status is
    Final; neither error holds the URL (its query is a signature)."""
    from sd_core.storage import signed_get
    from sd_core.storage.objects import Transient
    from tests.fixtures.http_files import FileHandler, serving

    class Handler(FileHandler):
        def do_GET(self):
            if self.path.startswith("/missing"):
                self.send_body(404, b"no")
            elif self.path.startswith("/whole"):
                self.send_body(200, b"x" * 100)  # Range ignored
            else:
                self.send_file(bytes(range(100)))

    written = []
    with serving(Handler) as server:
        signed_get.read_signed(f"{server.url}/ok?X-Amz-Signature=abc", 10, 19, '"e"', written.append, 5.0)
        assert b"".join(bytes(view) for view in written) == bytes(range(10, 20))
        written.clear()
        with pytest.raises(Transient, match="^HTTP 200$"):
            signed_get.read_signed(f"{server.url}/whole?X-Amz-Signature=abc", 10, 19, None, written.append, 5.0)
        with pytest.raises(signed_get.Final, match="^HTTP 404$"):
            signed_get.read_signed(f"{server.url}/missing?X-Amz-Signature=abc", 0, 9, None, written.append, 5.0)
    assert written == []
    assert signed_get.usable({}) and not signed_get.usable({"https_proxy": "http://proxy:3128"})


def test_every_part_shares_one_tls_context():
    """Loading the roots costs tens of milliseconds: built once per CA bundle, not per part's connection."""
    from sd_core.storage import signed_get

    assert signed_get.tls_context(None) is signed_get.tls_context(None)
    assert signed_get.tls_context(None).verify_mode == ssl.CERT_REQUIRED and signed_get.tls_context(None).check_hostname
