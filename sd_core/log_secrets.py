"""A logging filter that removes URL credentials and query strings from every log line (`errors.scrub`)."""

from __future__ import annotations

import logging

from .errors import scrub


class ScrubSecrets(logging.Filter):
    """Rewrites each record's message with :func:`scrub` (a presigned URL's signature, ``user:password@``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:  # tracebacks carry exception messages too
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Scrub every record that reaches the handlers of ``logger`` (default: the root logger), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, ScrubSecrets) for f in handler.filters):
            handler.addFilter(ScrubSecrets())
