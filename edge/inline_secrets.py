"""Secrets never sit inline in a config file: header or query names that carry a credential,
and URLs with ``user:password@`` or such a query parameter, are refused at load. The HTTP
sink and the audit archive use these checks; a refusal never repeats the secret."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

__all__ = ["check_http_url", "check_url", "looks_secret"]

# Names (headers, query parameters) that carry a credential. Compared lower-case with "-"
# read as "_": a name that is one of _SECRET_NAMES, ends in "_key" or contains a word.
_SECRET_NAMES = frozenset({"key", "sig", "pwd", "auth"})
_SECRET_WORDS = ("token", "secret", "password", "passwd", "apikey", "api_key", "signature",
                 "credential", "authorization", "cookie")


def looks_secret(name: str) -> bool:
    """True for a header or query parameter name that carries a credential
    (``Authorization``, ``X-API-Key``, ``X-Auth-Token``, ``api_key``, ``sig`` …)."""
    n = name.strip().lower().replace("-", "_")
    return n in _SECRET_NAMES or n.endswith("_key") or any(w in n for w in _SECRET_WORDS)


def check_url(url: str, hint: str) -> None:
    """ValueError when ``url`` carries a credential: ``user:password@`` (or a user name)
    before the host, or a query parameter that looks like a secret; ``hint`` says where
    the secret goes instead. The message never repeats the secret."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError(f"credentials are not allowed inline in a URL; {hint}")
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if looks_secret(name):
            raise ValueError(f"query parameter {name!r} looks like a secret; secrets are not "
                             f"allowed inline, {hint}")


def check_http_url(url: str, hint: str) -> str:
    """``url`` when it is an http(s) URL without inline credentials, else ValueError
    (credentials first: the scheme message repeats the URL)."""
    check_url(url, hint)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, got {url!r}")
    return url
