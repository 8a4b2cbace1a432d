#!/usr/bin/env python
"""Upload a checkpoint, diffusers folder, config folder or LoRA to a bucket and write its manifest entry.

Destinations are ``s3://bucket/prefix`` (credentials and endpoint: the AWS_* variables / config, SD_S3_ENDPOINT_URL)
or a local folder (plain path or file://). Every file's sha256 is computed before it is uploaded, and the manifest
(``models/<name>.yaml`` unless --manifest says otherwise) is created or updated, then validated with
``sd_core.manifests.ModelManifest``. Fields the command does not own (description, defaults, other LoRAs) are kept.

Examples::

    # a diffusers folder -> format: diffusers, uri: s3://weights/sd15/, files: {relpath: sha256}
    python scripts/ops/upload_weights.py model ./sd15-diffusers s3://weights/sd15/ --name sd15 --architecture sd15

    # one .safetensors + the config-only diffusers folder it needs -> format: single_file, sha256, config_uri
    python scripts/ops/upload_weights.py model ./dreamshaper.safetensors s3://weights/dreamshaper/ \\
        --name dreamshaper --architecture sd15 --config ./sd15-config

    # a LoRA that belongs to a model (added to, or replaced in, that model's `loras`)
    python scripts/ops/upload_weights.py lora ./pixel.safetensors s3://weights/loras/ --model sd15 --scale 0.8

    # just upload and print the checksums (no manifest)
    python scripts/ops/upload_weights.py file ./anything s3://weights/misc/

--relative-to BASE writes URIs relative to BASE (e.g. the SD_WEIGHTS_URI the workers use) when they lie under it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sd_core.errors import SDError  # noqa: E402
from sd_core.settings import Settings  # noqa: E402
from sd_core.storage import file_sha256, parse_uri, redact, s3_client  # noqa: E402

log = logging.getLogger("sd_core.upload")


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def _local_files(src: Path) -> list[tuple[str, Path]]:
    if src.is_file():
        return [(src.name, src)]
    files = sorted((p.relative_to(src).as_posix(), p) for p in src.rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"error: {src} holds no files")
    return files


class Uploader:
    """Puts local files at a destination URI (s3:// or a local folder)."""

    def __init__(self, settings: Settings, create_bucket: bool = False):
        self.settings = settings
        self.create_bucket = create_bucket
        self._client = None
        self._buckets_checked: set[str] = set()

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self.settings)
        return self._client

    def put(self, path: Path, uri: str) -> None:
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            self._put_s3(path, loc.host, loc.path)
        elif loc.scheme == "file":
            dest = Path(loc.path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        else:
            raise SystemExit(f"error: cannot upload to {redact(uri)}: use s3://bucket/prefix or a local folder")

    def _put_s3(self, path: Path, bucket: str, key: str) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import ClientError

        if bucket not in self._buckets_checked:
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("404", "NoSuchBucket") and self.create_bucket:
                    self.client.create_bucket(Bucket=bucket)
                elif code in ("404", "NoSuchBucket"):
                    raise SystemExit(f"error: bucket {bucket!r} does not exist (pass --create-bucket)") from None
                else:
                    raise SystemExit(f"error: cannot use bucket {bucket!r}: {code} (check the AWS_* credentials)") \
                        from None
            self._buckets_checked.add(bucket)
        mib = 1024 * 1024
        config = TransferConfig(multipart_threshold=64 * mib, multipart_chunksize=64 * mib,
                                max_concurrency=self.settings.fetch_concurrency)
        self.client.upload_file(str(path), bucket, key, Config=config)
        size = self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if size != path.stat().st_size:
            raise SystemExit(f"error: s3://{bucket}/{key} has {size} bytes after upload, expected "
                             f"{path.stat().st_size}")


def upload_tree(uploader: Uploader, src: Path, dest: str) -> tuple[str, dict[str, str], int]:
    """Upload a file or folder. Returns (uri, {relpath: sha256}, total bytes); a folder's uri ends with '/'."""
    files = _local_files(src)
    if src.is_file():
        uri = _join(dest, src.name) if dest.endswith("/") else dest
        targets = [(src.name, src, uri)]
    else:
        uri = dest if dest.endswith("/") else dest + "/"
        targets = [(rel, p, _join(uri, rel)) for rel, p in files]
    sums: dict[str, str] = {}
    total = 0
    for rel, path, target in targets:
        t0 = time.monotonic()
        sums[rel] = file_sha256(path)
        uploader.put(path, target)
        size = path.stat().st_size
        total += size
        log.info("uploaded %s -> %s (%.1f MB, %.2fs, sha256 %s)", path, redact(target), size / 1e6,
                 time.monotonic() - t0, sums[rel][:12])
    return uri, sums, total


def _relative(uri: str, base: str | None) -> str:
    if not base:
        return uri
    prefix = base.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


# --- manifests ---
def read_manifest(path: Path) -> tuple[list[str], dict]:
    """The leading comment lines and the YAML mapping of a manifest (empty when it does not exist yet)."""
    if not path.exists():
        return [], {}
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if line.startswith("#"):
            header.append(line)
        else:
            break
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} is not a YAML mapping")
    return header, data


def write_manifest(path: Path, header: list[str], data: dict) -> None:
    """Validate with ModelManifest, then write atomically (the header comments are kept)."""
    from pydantic import ValidationError

    from sd_core.manifests import ModelManifest

    try:
        ModelManifest.model_validate(data)
    except ValidationError as exc:
        raise SystemExit(f"error: the manifest for {path} would not validate:\n{exc}") from None
    order = ["name", "description", "architecture", "format", "uri", "config_uri", "config_files", "sha256", "size",
             "files", "defaults", "loras"]
    ordered = {k: data[k] for k in order if k in data and data[k] is not None}
    ordered.update({k: v for k, v in data.items() if k not in ordered and v is not None})
    text = "\n".join(header) + ("\n" if header else "")
    text += yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def manifest_path(args, settings: Settings, name: str) -> Path:
    if args.manifest:
        return Path(args.manifest)
    return Path(args.models_dir or settings.models_dir) / f"{name}.yaml"


def cmd_model(args, settings: Settings) -> dict:
    src = Path(args.src)
    path = manifest_path(args, settings, args.name)
    header, data = read_manifest(path)
    uploader = Uploader(settings, args.create_bucket)
    data["name"] = args.name
    if args.architecture:
        data["architecture"] = args.architecture
    if args.description is not None:
        data["description"] = args.description
    if not data.get("architecture"):
        raise SystemExit("error: --architecture is required for a new manifest (sd15, sd2 or sdxl)")
    uri, sums, total = upload_tree(uploader, src, args.dest)
    data["uri"] = _relative(uri, args.relative_to)
    data["size"] = total
    if src.is_dir():
        data["format"] = "diffusers"
        data["files"] = sums
        data.pop("sha256", None)
        data.pop("config_uri", None)
        data.pop("config_files", None)
    else:
        data["format"] = "single_file"
        data["sha256"] = sums[src.name]
        data.pop("files", None)
        if args.config:
            parent = args.dest if args.dest.endswith("/") else args.dest.rsplit("/", 1)[0] + "/"
            config_dest = args.config_dest or _join(parent, "config/")
            config_uri, config_sums, _ = upload_tree(uploader, Path(args.config), config_dest)
            data["config_uri"] = _relative(config_uri, args.relative_to)
            data["config_files"] = config_sums  # a flipped byte in a config changes the model as surely
        elif not data.get("config_uri"):
            raise SystemExit("error: a single-file checkpoint needs --config DIR (its diffusers config folder)")
    if not header:
        header = [f"# Written by scripts/ops/upload_weights.py on {time.strftime('%Y-%m-%d')}."]
    write_manifest(path, header, data)
    return {"manifest": str(path), "uri": data["uri"], "size": total, "files": sums}


def cmd_lora(args, settings: Settings) -> dict:
    src = Path(args.src)
    if not src.is_file():
        raise SystemExit(f"error: a LoRA is one file; {src} is not")
    path = manifest_path(args, settings, args.model)
    if not path.exists():
        raise SystemExit(f"error: no manifest {path} for model {args.model!r}: upload the model first")
    header, data = read_manifest(path)
    uri, sums, total = upload_tree(Uploader(settings, args.create_bucket), src, args.dest)
    name = args.lora_name or src.stem
    entry = {"name": name, "uri": _relative(uri, args.relative_to), "sha256": sums[src.name], "size": total,
             "scale": args.scale}
    if args.trigger:
        entry["trigger"] = args.trigger
    loras = [lora for lora in data.get("loras") or [] if lora.get("name") != name]
    data["loras"] = loras + [entry]
    write_manifest(path, header, data)
    return {"manifest": str(path), "lora": entry}


def cmd_file(args, settings: Settings) -> dict:
    uri, sums, total = upload_tree(Uploader(settings, args.create_bucket), Path(args.src), args.dest)
    return {"uri": uri, "size": total, "files": sums}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("src", help="local file or folder")
        p.add_argument("dest", help="s3://bucket/prefix/ or a local folder; a trailing '/' keeps the source name")
        p.add_argument("--create-bucket", action="store_true", help="create the S3 bucket when it is missing")
        p.add_argument("--relative-to", metavar="BASE", help="write URIs relative to BASE (e.g. SD_WEIGHTS_URI)")
        p.add_argument("--manifest", help="manifest path (default: <models dir>/<name>.yaml)")
        p.add_argument("--models-dir", help="folder of manifests (default: SD_MODELS_DIR)")

    m = sub.add_parser("model", help="a diffusers folder or a single-file checkpoint (+ its config folder)")
    common(m)
    m.add_argument("--name", required=True)
    m.add_argument("--architecture", choices=["sd15", "sd2", "sdxl"])
    m.add_argument("--description")
    m.add_argument("--config", help="single file: the diffusers config folder (no weights) to upload with it")
    m.add_argument("--config-dest", help="where the config folder goes (default: <dest folder>/config/)")
    lo = sub.add_parser("lora", help="a LoRA file, recorded in a model's manifest")
    common(lo)
    lo.add_argument("--model", required=True, help="the model whose manifest lists the LoRA")
    lo.add_argument("--lora-name", help="name requests use (default: the file name without extension)")
    lo.add_argument("--scale", type=float, default=1.0)
    lo.add_argument("--trigger")
    f = sub.add_parser("file", help="upload only; print the sha256 of every file")
    common(f)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    try:
        result = {"model": cmd_model, "lora": cmd_lora, "file": cmd_file}[args.command](args, settings)
    except SDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(exc, (Boto3Error, BotoCoreError, ClientError)):
            raise
        print(f"error: upload failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
