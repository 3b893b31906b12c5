"""Secrets kept out of sight: a storage or tracking URL's password is never printed, logged or written."""

from __future__ import annotations

import re
from typing import Iterable

_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|secret|token|sslpassword)=)[^&\s'\"]*")
# A URL inside free text (an error message that repeats a --set or a value it refused): it ends at
# white space or a quote, as it does when a message quotes it. Its scheme starts a run of scheme
# characters, never inside one: tried at every position of a long run, the match took quadratic time
# (minutes for a 100,000-character key in an error line).
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# Control characters would split one error line into several (or fake one); shown escaped instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _userinfo(rest: str) -> tuple[str, str, str] | None:
    """(user, password, the rest from the host on) of the part of a URL after ``://``, or None.

    The password runs to the last ``@`` before the query: a password with ``/``, ``@`` or ``?`` in it
    (not escaped, as it should be) is still the password, and SQLAlchemy reads everything up to
    the first of those ``@`` as one, the host from there on. The query starts at the first ``?``
    after an ``@``: one before it is the password's."""
    first_at = rest.find("@")
    query = rest.find("?", max(first_at, 0))
    authority = rest[:query] if query >= 0 else rest
    if "@" not in authority:
        return None
    userinfo, host = rest[:authority.rindex("@")], rest[authority.rindex("@") + 1:]
    user, colon, password = userinfo.partition(":")
    if not colon or "/" in user:  # no password, or an '@' in a path (sqlite:////tmp/a@b/x.db)
        return None
    return user, password, host


def redact(url: str) -> str:
    """A storage URL with its passwords (``user:secret@``, ``?password=``) shown as ``***``: what every
    message, tag, artifact and log line shows of a storage."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        parts = _userinfo(rest)
        if parts is not None:
            url = f"{scheme}://{parts[0]}:***@{parts[2]}"
    return _SECRET_QUERY.sub(r"\1***", url)


def _secrets(url: str) -> set[str]:
    """The password of ``url`` as written and unescaped, and the pieces of it a driver may repeat
    (it reads a password with an '@' only up to that '@', and the rest as the host)."""
    from urllib.parse import unquote

    parts = _userinfo(url.split("://", 1)[1]) if "://" in url else None
    if parts is None or not parts[1]:
        return set()
    password = parts[1]
    found = {password, unquote(password)}
    found |= {piece for piece in re.split(r"[@/:]", password) if len(piece) >= 3}
    return found


# Passwords of the URLs this process was given (arguments, our environment variables, the spec) that
# hold a character which ends a URL in free text (a space, a quote): a message quoting such a URL shows
# :func:`scrub` a URL cut short, with no '@' to find the password by. Other passwords are found in
# their URLs; masking them everywhere would also mask ordinary words ("postgres") that equal one.
_GIVEN: set[str] = set()
_ENDS_A_URL = re.compile(r"[\s'\"<>]")
_SHORTEST_REMEMBERED = 4  # "a b" would mask "a batch" in every line


def remember_passwords(values: Iterable[object]) -> None:
    """Note the password of every URL among ``values`` (strings holding ``://``; others are skipped)
    that a space or a quote would cut out of its URL, so that :func:`scrub` masks it wherever a line
    repeats it."""
    for value in values:
        if isinstance(value, str) and "://" in value:
            _GIVEN.update(secret for secret in _secrets(value)
                          if _ENDS_A_URL.search(secret) and len(secret) >= _SHORTEST_REMEMBERED)


def redact_in(text: str, url: str) -> str:
    """``text`` (a driver's or MLflow's message about ``url``) with the URL as :func:`redact` shows it,
    and its password nowhere else either."""
    secrets = sorted(_secrets(url), key=len, reverse=True)

    def masked(part: str) -> str:
        for secret in secrets:
            part = part.replace(secret, "***")
        return part

    # The URL itself as redact() shows it, untouched by the masking: a password that equals its user
    # name or a piece of its scheme ('postgres') would otherwise mask those too.
    return redact(url).join(masked(part) for part in text.split(url))


def scrub(line: str) -> str:
    """A line for the terminal: every URL in it redacted, every password this process was given
    (:func:`remember_passwords`) masked, and control characters (a newline in a key
    or a value it repeats) escaped, so that one error stays one line."""
    for secret in sorted(_GIVEN, key=len, reverse=True):  # first: its URL is then whole, and redacted below
        line = line.replace(secret, "***")
    line = _URL_IN_TEXT.sub(lambda match: redact_in(match.group(0), match.group(0)), line)
    return _CONTROL.sub(lambda match: repr(match.group(0))[1:-1], line)
