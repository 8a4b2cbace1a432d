"""LoRA links as users paste them (Hugging Face pages, Civitai pages) rewritten to direct download URLs."""

# The forms (Replicate's LoRA models accept the same ones; see docs/lora.md):
#   https://huggingface.co/<org>/<repo>                 -> the repo's single top-level .safetensors file (listed
#                                                           through the hub's API; several or none: refused, listed)
#   https://huggingface.co/<org>/<repo>/tree/<rev>      -> the same at that revision
#   huggingface.co/<org>/<repo>/<file>                  -> .../resolve/main/<file>
#   https://huggingface.co/<org>/<repo>/blob/<rev>/<file> and /resolve/<rev>/<file> -> .../resolve/<rev>/<file>
#   hf://<org>/<repo>[@<rev>]/<file>                    -> .../resolve/<rev>/<file> (no file: as a repo link)
#   https://civitai.com/api/download/models/<id>[?...]  -> unchanged (a ?token= stays; SD's CIVITAI_TOKEN is a header)
#   civitai.com/models/<id>[/<slug>]?modelVersionId=<v> -> https://civitai.com/api/download/models/<v>
# Hugging Face links go to HF_ENDPOINT (huggingface_hub's own mirror setting), Civitai links to SD_CIVITAI_ENDPOINT.
# The result is an ordinary URL: the caller runs it through the user-URL policy (sd_core/user_urls.py), which checks
# the REWRITTEN URL, and sd_core/user_downloads.py fetches it (pinned address, redirects re-checked, limits).

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit
from urllib.parse import quote as url_quote

from .errors import InvalidRequest, quote
from .settings import Settings
from .user_urls import CheckedURL

HF_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
CIVITAI_HOSTS = frozenset({"civitai.com", "www.civitai.com"})
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/%-]{0,199}$")
_ID = re.compile(r"^[0-9]{1,12}$")
LISTING_MAX_BYTES = 4 * 1024 * 1024
SHOWN_FILES = 10


@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face repository link without a file: its single .safetensors file is looked up (listing)."""

    repo: str  # org/name
    revision: str = "main"


def _refuse(message: str, field: str) -> InvalidRequest:
    return InvalidRequest(message, field=field)


def _with_scheme(source: str) -> str:
    """`huggingface.co/...` / `civitai.com/...` pasted without a scheme -> https://..."""
    head = source.split("/", 1)[0].lower()
    if "://" not in source and "/" in source and head in HF_HOSTS | CIVITAI_HOSTS:
        return "https://" + source
    return source


def _repo(org: str, name: str, source: str, field: str) -> str:
    if not (_REPO_PART.match(org) and _REPO_PART.match(name)) or ".." in f"{org}/{name}":
        raise _refuse(f"not a Hugging Face repository: {quote(source)}", field)
    return f"{org}/{name}"


def _file_path(parts: list[str], source: str, field: str) -> str:
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise _refuse(f"no file in {quote(source)}: name the LoRA .safetensors file", field)
    return "/".join(parts)


def _revision(value: str, source: str, field: str) -> str:
    if not _REVISION.match(value) or ".." in value:
        raise _refuse(f"not a revision: {quote(value)} in {quote(source)}", field)
    return value


def hf_file_url(repo: str, revision: str, path: str, settings: Settings, query: str = "") -> str:
    """The hub's direct download URL of one file (``<HF_ENDPOINT>/<repo>/resolve/<rev>/<path>``)."""
    endpoint = settings.hf_endpoint.rstrip("/")
    rev = url_quote(revision, safe="")  # refs/pr/1 -> refs%2Fpr%2F1, as the hub writes it
    return f"{endpoint}/{repo}/resolve/{rev}/{path}" + (f"?{query}" if query else "")


def _hugging_face(url: str, source: str, settings: Settings, field: str) -> str | HubRepo:
    parts = urlsplit(url)
    segments = parts.path.split("/")[1:]
    while segments and segments[-1] == "":  # a trailing slash
        segments.pop()
    if segments and segments[0] in ("datasets", "spaces", "api"):
        return url  # not a model repository link: fetched as the URL it is
    if len(segments) < 2:
        raise _refuse(f"expected huggingface.co/<org>/<repo>[/<file>], got {quote(source)}", field)
    repo = _repo(segments[0], segments[1], source, field)
    rest = segments[2:]
    if not rest:
        return HubRepo(repo)
    if rest[0] == "tree":
        if len(rest) == 2:
            return HubRepo(repo, _revision(rest[1], source, field))
        raise _refuse(f"{quote(source)} names a folder; give the link of the LoRA .safetensors file", field)
    if rest[0] in ("blob", "resolve") and len(rest) >= 3:
        return hf_file_url(repo, _revision(rest[1], source, field), _file_path(rest[2:], source, field), settings,
                           parts.query)
    return hf_file_url(repo, "main", _file_path(rest, source, field), settings, parts.query)


def _hf_scheme(source: str, settings: Settings, field: str) -> str | HubRepo:
    segments = source.split("://", 1)[1].split("/")
    if len(segments) < 2:
        raise _refuse(f"expected hf://<org>/<repo>[@<revision>][/<file>], got {quote(source)}", field)
    name, _, revision = segments[1].partition("@")
    repo = _repo(segments[0], name, source, field)
    revision = _revision(revision, source, field) if revision else "main"
    rest = segments[2:]
    if not rest or rest == [""]:
        return HubRepo(repo, revision)
    return hf_file_url(repo, revision, _file_path(rest, source, field), settings)


def _civitai(url: str, source: str, settings: Settings, field: str) -> str:
    parts = urlsplit(url)
    endpoint = settings.civitai_endpoint.rstrip("/")
    segments = [s for s in parts.path.split("/") if s]
    if segments[:3] == ["api", "download", "models"] and len(segments) == 4 and _ID.match(segments[3]):
        return f"{endpoint}/api/download/models/{segments[3]}" + (f"?{parts.query}" if parts.query else "")
    if segments[:1] == ["models"] and len(segments) in (2, 3) and _ID.match(segments[1]):
        version = parse_qs(parts.query).get("modelVersionId", [""])[0]
        if _ID.match(version):
            return f"{endpoint}/api/download/models/{version}"
        raise _refuse(f"{quote(source)} names a Civitai model, not one of its versions: open the version you want "
                      "and paste its link (…?modelVersionId=<id>) or its download link "
                      "(civitai.com/api/download/models/<id>)", field)
    raise _refuse(f"not a Civitai LoRA link: {quote(source)}; expected civitai.com/api/download/models/<id> or "
                  "civitai.com/models/<id>?modelVersionId=<id>", field)


def rewrite_lora_link(source: str, settings: Settings, *, field: str) -> str | HubRepo:
    """The direct URL a pasted LoRA link means; other sources (names, s3://, other URLs) come back unchanged.

    Pure (no network): a Hugging Face repository link without a file comes back as a :class:`HubRepo`, which
    :func:`direct_lora_url` lists.
    """
    if source.lower().startswith("hf://"):
        return _hf_scheme(source, settings, field)
    url = _with_scheme(source)
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower() if parts.scheme.lower() in ("http", "https") else ""
    except ValueError:
        return source  # the URL policy refuses it with its own message
    if host in HF_HOSTS and parts.port is None and parts.username is None:
        return _hugging_face(url, source, settings, field)
    if host in CIVITAI_HOSTS and parts.port is None and parts.username is None:
        return _civitai(url, source, settings, field)
    return source


def repo_lora_file(repo: HubRepo, settings: Settings, *, field: str) -> str:
    """The download URL of a repository's single top-level .safetensors file (the hub's tree API, fetched under
    the user-URL policy); none or several: refused, naming them (as Replicate's LoRA models do)."""
    from .user_downloads import download_user_url

    endpoint = settings.hf_endpoint.rstrip("/")
    listing = f"{endpoint}/api/models/{repo.repo}/tree/{url_quote(repo.revision, safe='')}"
    body = download_user_url(listing, field=field, max_bytes=LISTING_MAX_BYTES, settings=settings)
    try:
        entries = json.loads(body)
        files = sorted(entry["path"] for entry in entries
                       if entry.get("type") == "file" and str(entry.get("path", "")).lower().endswith(".safetensors"))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise _refuse(f"huggingface.co/{repo.repo}: the hub's file listing could not be read", field) from None
    if len(files) == 1:
        return hf_file_url(repo.repo, repo.revision, files[0], settings)
    if not files:
        raise _refuse(f"huggingface.co/{repo.repo} has no .safetensors file at its top level; give the link of the "
                      "LoRA file itself", field)
    shown = ", ".join(quote(name, 80) for name in files[:SHOWN_FILES]) + (", …" if len(files) > SHOWN_FILES else "")
    raise _refuse(f"huggingface.co/{repo.repo} has {len(files)} .safetensors files ({shown}); give the link of one: "
                  f"huggingface.co/{repo.repo}/<file>", field)


def direct_lora_url(source: str, settings: Settings, *, field: str) -> str:
    """``source`` with a pasted link rewritten to its direct download URL (a repository link: its LoRA file)."""
    rewritten = rewrite_lora_link(source, settings, field=field)
    if isinstance(rewritten, HubRepo):
        return repo_lora_file(rewritten, settings, field=field)
    return rewritten


def credential_headers(checked: CheckedURL, settings: Settings) -> dict[str, str]:
    """Headers a download of ``checked`` carries: SD's CIVITAI_TOKEN, only to the Civitai endpoint itself (never to
    the CDN it redirects to) and only when the URL brings no ``token`` of its own."""
    token = settings.civitai_token
    endpoint = urlsplit(settings.civitai_endpoint)
    if not token or checked.scheme != endpoint.scheme.lower():
        return {}
    default_port = 443 if checked.scheme == "https" else 80
    same_host = (checked.host == (endpoint.hostname or "").lower()
                 and (checked.port or default_port) == (endpoint.port or default_port))
    if not same_host or "token" in parse_qs(urlsplit(checked.url).query):
        return {}
    return {"Authorization": f"Bearer {token}"}


def credential_identity(url: str, settings: Settings) -> str:
    """Who a download of the user URL ``url`` authenticates as: a hash of its token / signing parameters and of the
    worker's CIVITAI_TOKEN when :func:`credential_headers` sends it; "" without credentials. Cached user downloads
    are keyed by it (docs/lora.md): a file fetched with a credential is never served to a request without it."""
    from .storage.uris import credential_params

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    checked = CheckedURL(url=url, scheme=parts.scheme.lower(), host=(parts.hostname or "").lower(), port=port)
    header = credential_headers(checked, settings).get("Authorization", "")
    query = credential_params(url)
    if not (header or query):
        return ""
    return hashlib.sha256(f"{query}\0{header}".encode()).hexdigest()[:32]
