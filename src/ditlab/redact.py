"""Credentials out of anything ditlab prints, writes or logs.

A tracking URI (`postgresql://user:pass@db/mlflow`, `https://user:pass@mlflow.example`) or a git
remote (`https://user:token@github.com/...`) may carry a password. ditlab connects with the URI as
given but shows, stores (result.json, evaluation.json, tracking.json) and logs (MLflow tags) only
its redacted form: the password, and the values of query parameters that name a secret, become
`***`; a user name beside a password stays, so a reader still sees whose login it is (a
user name alone is masked: that is how tokens are usually written).
"""

from __future__ import annotations

import re

MASK = "***"
# Query parameters whose values are secrets (?password=..., ?sslpassword=..., ?X-Amz-Signature=...).
SECRET_PARAM = re.compile(r"pass|secret|token|key|signature|credential|auth", re.IGNORECASE)
QUERY_PAIR = re.compile(r"(?P<lead>[?&;](?P<name>[^=&;#]*)=)(?P<value>[^&;#\s]*)")
# A URL in free text (an error message, a log line), and one that carries a user name or password.
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@]+@")


def redact_uri(uri: str) -> str:
    """`uri` with its password (or a lone user name, often a token) and the values of secret
    query parameters replaced by ***; a URI without them comes back unchanged, character for
    character."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    netloc = re.match(r"[^/?#]*", rest).group(0)
    tail = rest[len(netloc):]
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if has_password else f"{MASK}@{host}"
    tail = QUERY_PAIR.sub(lambda m: m["lead"] + MASK if SECRET_PARAM.search(m["name"]) else m[0], tail)
    return f"{scheme}://{netloc}{tail}"


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (redact_uri)."""
    return URL.sub(lambda m: redact_uri(m[0]), text)
