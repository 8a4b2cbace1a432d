"""Downloads of URLs that come from users (init images, LoRA links): size-limited and time-limited."""

from __future__ import annotations

import requests

from .errors import InvalidRequest

TIMEOUT_S = (10, 60)  # connect, read


def download_user_url(url: str, *, field: str, max_bytes: int) -> bytes:
    """GET a user-supplied http(s) URL into memory, refusing bodies larger than ``max_bytes``."""
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT_S) as response:
            if response.status_code != 200:
                raise InvalidRequest(f"download failed: HTTP {response.status_code}", field=field)
            chunks, total = [], 0
            for chunk in response.iter_content(1 << 16):
                total += len(chunk)
                if total > max_bytes:
                    raise InvalidRequest(f"download larger than the limit of {max_bytes} bytes", field=field)
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as exc:
        raise InvalidRequest(f"download failed ({type(exc).__name__})", field=field) from None
