"""Log redaction: URL credentials, query strings, auth headers and signatures removed from every log record, ours and
third-party libraries' (urllib3, botocore, s3transfer, huggingface_hub, requests) at any level, DEBUG included."""

from __future__ import annotations

import logging
import re

from .errors import scrub

# A request target after a path, as urllib3 logs it (`"GET /api/download/models/1?token=… HTTP/1.1" 200`): the URL's
# scheme and host are elsewhere in the line, so errors.scrub's URL pattern does not see it.
_PATH_QUERY = re.compile(r"(?P<path>(?:^|(?<=[\s\"'(\[=]))/[^\s?#\"']*)\?[^\s\"')\]]+")
# Credentials as headers, parameters or botocore's signing lines print them: the name stays, the value goes.
_NAMED_SECRET = re.compile(
    r"(?P<name>\b(?:authorization|x-amz-security-token|x-amz-signature|x-amz-credential|signature|credential|token|"
    r"access_token|api_key|apikey|aws_secret_access_key|aws_session_token|awsaccesskeyid|sig|password|secret)"
    r"['\"]?\s*[:=]\s*(?:b?['\"])?)[^'\"\s,&;}\]]+",
    re.IGNORECASE)
_BEARER = re.compile(r"\b(?P<name>(?:Bearer|Basic|AWS4-HMAC-SHA256)\s+)[^\s'\",}]+", re.IGNORECASE)
_SIGNATURE_LINE = re.compile(r"(?P<name>Signature:\s*)[0-9a-fA-F]{16,}")  # botocore.auth: "Signature:\n<hex>"
LIBRARY_LOGGERS = ("urllib3", "urllib3.connectionpool", "botocore", "s3transfer", "huggingface_hub", "requests",
                   "boto3", "filelock")


def scrub_log(text: str) -> str:
    """``text`` as it may reach a log: :func:`sd_core.errors.scrub` (URLs), then request targets' query strings,
    credential headers and parameters, bearer tokens and signatures."""
    text = scrub(text)
    text = _PATH_QUERY.sub(lambda m: m["path"] + "?…", text)
    text = _SIGNATURE_LINE.sub(lambda m: m["name"] + "…", text)
    text = _BEARER.sub(lambda m: m["name"] + "…", text)
    return _NAMED_SECRET.sub(lambda m: m["name"] + "…", text)


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: logging reports it itself later
        return
    cleaned = scrub_log(message)
    if cleaned != message:
        record.msg, record.args = cleaned, ()


class ScrubSecrets(logging.Filter):
    """Rewrites each record's message with :func:`scrub_log` (a presigned URL's signature, ``user:password@``,
    ``?token=``, ``Authorization:``), and its traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        if record.exc_info and not record.exc_text:  # tracebacks carry exception messages too
            record.exc_text = scrub_log(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub_log(record.exc_text)
        return True


_FACTORY_INSTALLED = False


def _install_record_factory() -> None:
    """Every record, from any logger (a library's own DEBUG lines included) and for any handler (also those a
    platform SDK adds later), is scrubbed when it is made."""
    global _FACTORY_INSTALLED
    if _FACTORY_INSTALLED:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _scrub_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _FACTORY_INSTALLED = True


def install(logger: logging.Logger | None = None) -> None:
    """Scrub every log record: at creation (all loggers, all levels), at the handlers of ``logger`` (default: the
    root logger) and at the libraries' own loggers, once each."""
    _install_record_factory()
    targets: list[logging.Filterer] = list((logger or logging.getLogger()).handlers)
    if logger is None:
        targets += [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for target in targets:
        if not any(isinstance(f, ScrubSecrets) for f in target.filters):
            target.addFilter(ScrubSecrets())
