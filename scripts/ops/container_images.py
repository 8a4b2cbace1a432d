"""Build and push the RunPod image from a developer machine, through any Docker-API engine (the docker SDK).

    python scripts/ops/container_images.py build -t sd-serverless-runpod:dev
    python scripts/ops/container_images.py build -t sd-serverless-runpod:cpu \
        --torch-index-url https://download.pytorch.org/whl/cpu
    python scripts/ops/container_images.py push -t ghcr.io/OWNER/sd-serverless-runpod:dev --username OWNER \
        --password-stdin

The engine is the one the docker SDK finds: DOCKER_HOST (and DOCKER_TLS_VERIFY / DOCKER_CERT_PATH), else the local
Docker socket. podman serves the same API: ``podman system service --time=0 unix:///tmp/podman.sock &`` and
``DOCKER_HOST=unix:///tmp/podman.sock``. Without a reachable engine the commands stop with exit status 2 and say
which address they tried. Registry credentials come from --username plus the password on stdin, else from what the
engine already holds (``docker login``). GitHub Actions does the same build and push in
.github/workflows/runpod-image.yml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = "Dockerfile.runpod"
DEFAULT_TAG = "sd-serverless-runpod:dev"
EXIT_NO_ENGINE = 2


class ImageError(RuntimeError):
    """A build or push step failed; the message says which."""


class NoEngine(ImageError):
    """No Docker-API engine answered."""


def connect():
    """A docker APIClient for the engine from the environment, or NoEngine saying which address was tried."""
    import docker
    from docker.errors import DockerException

    try:
        address = docker.utils.kwargs_from_env().get("base_url") or "unix:///var/run/docker.sock (default)"
    except DockerException as exc:  # e.g. DOCKER_TLS_VERIFY without certificates
        raise NoEngine(f"Docker settings in the environment are unusable: {exc}") from exc
    try:
        client = docker.APIClient(**docker.utils.kwargs_from_env(), version="auto", timeout=600)
        client.ping()
    except DockerException as exc:
        raise NoEngine(
            f"no Docker-API engine reachable at {address}: {exc}. Start Docker, or point DOCKER_HOST at another "
            "engine (podman: `podman system service --time=0 unix:///tmp/podman.sock &` then "
            "`export DOCKER_HOST=unix:///tmp/podman.sock`)."
        ) from exc
    return client


def split_tag(reference: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``); no tag means ``latest``."""
    name, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        return reference, "latest"
    return name, tag


def parse_build_args(pairs: list[str]) -> dict[str, str]:
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ImageError(f"--build-arg {pair!r}: expected KEY=VALUE")
        args[key] = value
    return args


def build(client, tags: list[str], build_args: dict[str, str], *, no_cache: bool = False,
          platform: str | None = None, context: Path = REPO) -> str:
    """Build Dockerfile.runpod (context: the repository, filtered by .dockerignore), tag it; return the image id."""
    print(f"building {DOCKERFILE} as {', '.join(tags)}", flush=True)
    image_id = None
    stream = client.build(path=str(context), dockerfile=DOCKERFILE, tag=tags[0], buildargs=build_args,
                          nocache=no_cache, platform=platform, rm=True, forcerm=True, decode=True)
    for chunk in stream:
        if "error" in chunk:
            raise ImageError(f"build failed: {chunk['error'].strip()}")
        if "stream" in chunk:
            sys.stdout.write(chunk["stream"])
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
    if image_id is None:
        image_id = client.inspect_image(tags[0])["Id"]
    for reference in tags[1:]:
        repository, tag = split_tag(reference)
        client.tag(image_id, repository, tag)
    size = client.inspect_image(image_id).get("Size", 0)
    print(f"built {image_id[:19]} ({size / 1e9:.2f} GB): {', '.join(tags)}", flush=True)
    return image_id


def push(client, tags: list[str], auth: dict[str, str] | None) -> None:
    """Push each tag; the engine's stream reports errors in-band, so every chunk is checked."""
    for reference in tags:
        repository, tag = split_tag(reference)
        print(f"pushing {repository}:{tag}", flush=True)
        last_status = None
        for chunk in client.push(repository, tag=tag, auth_config=auth, stream=True, decode=True):
            if "error" in chunk:
                raise ImageError(f"push of {repository}:{tag} failed: {chunk['error'].strip()}")
            status = chunk.get("status")
            if status and status != last_status and "progress" not in chunk:
                print(f"  {status}", flush=True)
                last_status = status
        print(f"pushed {repository}:{tag}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help=f"build {DOCKERFILE}")
    build_cmd.add_argument("-t", "--tag", action="append", help=f"image reference, repeatable (default {DEFAULT_TAG})")
    build_cmd.add_argument("--base-image", help="BASE_IMAGE build argument (default: the Dockerfile's CUDA base)")
    build_cmd.add_argument("--torch-index-url", help="TORCH_INDEX_URL build argument (default: PyPI's CUDA torch)")
    build_cmd.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="more build args")
    build_cmd.add_argument("--platform", help="e.g. linux/amd64 (default: the engine's)")
    build_cmd.add_argument("--no-cache", action="store_true", help="do not use the layer cache")
    build_cmd.add_argument("--push", action="store_true", help="push the tags after the build")
    push_cmd = sub.add_parser("push", help="push image tags to their registries")
    push_cmd.add_argument("-t", "--tag", action="append", required=True, help="image reference, repeatable")
    for cmd in (build_cmd, push_cmd):
        cmd.add_argument("--username", help="registry user (with --password-stdin)")
        cmd.add_argument("--password-stdin", action="store_true", help="read the registry password/token from stdin")
    args = parser.parse_args(argv)

    tags = args.tag or [DEFAULT_TAG]
    auth = None
    if args.username:
        if not args.password_stdin:
            parser.error("--username needs --password-stdin (a password on the command line would leak)")
        auth = {"username": args.username, "password": sys.stdin.readline().rstrip("\n")}
    try:
        client = connect()
        if args.command == "build":
            build_args = parse_build_args(args.build_arg)
            if args.base_image:
                build_args["BASE_IMAGE"] = args.base_image
            if args.torch_index_url:
                build_args["TORCH_INDEX_URL"] = args.torch_index_url
            build(client, tags, build_args, no_cache=args.no_cache, platform=args.platform)
            if args.push:
                push(client, tags, auth)
        else:
            push(client, tags, auth)
    except NoEngine as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ENGINE
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
