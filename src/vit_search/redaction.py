"""Secrets kept out of sight: a storage or tracking URL's password is never printed, logged or written."""

from __future__ import annotations

import re

_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|secret|token|sslpassword)=)[^&]*")


def redact(url: str) -> str:
    """A storage URL with its passwords (``user:secret@``, ``?password=``) shown as ``***``: what every
    message, tag, artifact and log line shows of a storage."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:  # user:password@host; the password may hold '@' or ':' itself
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        url = f"{scheme}://{netloc}{slash}{path}"
    return _SECRET_QUERY.sub(r"\1***", url)


def redact_in(text: str, url: str) -> str:
    """``text`` (a driver's or MLflow's message about ``url``) with the URL as :func:`redact` shows it,
    and its password nowhere else either."""
    from urllib.parse import unquote, urlsplit

    text = text.replace(url, redact(url))
    try:
        password = urlsplit(url).password
    except ValueError:  # a port that is no number: the URL is shown redacted above, nothing more to find
        password = None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text
