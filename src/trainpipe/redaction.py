"""Keep secrets out of everything that leaves the process: logs, params, tags, errors.

Three kinds of secret are masked wherever they appear:
- the password in a URI's user info (`postgresql://ml:s3cret@db/mlflow`) and secret-looking
  query values (`?X-Amz-Signature=...`, `?password=...`);
- `key=value` / `key: value` pairs whose key names a secret (`password=...`,
  `aws_secret_access_key = ...`, `PGPASSWORD=...`), as in DSNs and config dumps;
- the current values of the environment variables that hold credentials
  (`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `PGPASSWORD`, `MLFLOW_TRACKING_PASSWORD`, ...)
  wherever they appear verbatim.

A password may hold characters a URI should have percent-encoded (`@`, `/`, `?`, `#`), and
the programs that read URIs disagree on where it ends: urllib and requests take the
authority up to the first `/`, `?` or `#` and the user info up to its last `@`;
SQLAlchemy takes the password up to the first `@`, across any `/`. So the user info is
masked from the first `:` after `scheme://user` to the last `@` of the URI (a URI in free
text ends at whitespace): the union of what each of them takes as the password.

Every function here runs in time linear in its input (no regular expression that can
backtrack over the whole text); `shorten` costs what its `limit` costs, whatever the size
of the value: call it on values of unknown size (a data cell) before they go into a message.
"""

import os
import re
from urllib.parse import unquote_plus

MASK = "***"
ELLIPSIS = "…"
# Environment variables whose values are credentials: never shown, wherever they turn up.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "PGPASSWORD",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AZURE_STORAGE_ACCESS_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "MINIO_ROOT_PASSWORD", "MINIO_SECRET_KEY")
_MIN_SECRET = 6  # shorter env values would mask ordinary words
_MIN_CUT_SECRET = 3  # a cut after 1 or 2 characters of a secret shows nothing of use
_SECRET_QUERY_KEYS = re.compile(r"pass|secret|token|key|signature|credential|auth", re.I)
# password=..., aws_secret_access_key: ..., PGPASSWORD=... (DSNs, env dumps, config text)
_KEY_VALUE = re.compile(
    r"(?P<key>\b\w*(?:password|passwd|pwd|secret_access_key|secret_key|session_token"
    r"|access_token|client_secret|api_key)\b)(?P<sep>\s*[=:]\s*)(?P<quote>['\"]?)"
    r"(?P<value>[^\s'\",;&]+)",
    re.I,
)
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_MAX_SCHEME = 64  # "postgresql+psycopg2" is 19: a longer run is text, not a scheme
_STARTS_WITH_URI = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]{0,63}://")
_SPACE = re.compile(r"\s")
_END_OF_USER = re.compile(r"[:/\s]")  # the user name ends at ':' (a password follows) or '/'
_END_OF_QUERY = re.compile(r"[\s'\"<>`#]")


def redact_uri(uri: str) -> str:
    """Return `uri` with any password and secret-looking query values masked.

    A string that starts with `scheme://` is one URI to its end (its password may hold
    spaces); any other string is searched for URIs as free text is."""
    if not isinstance(uri, str):
        return uri
    return _mask_env_secrets(_mask_uris(uri, whole=bool(_STARTS_WITH_URI.match(uri))))


def redact_text(text: str) -> str:
    """Mask secrets inside free text (error messages, logs, tracebacks, param values)."""
    if not isinstance(text, str):
        return text
    return _mask_env_secrets(_mask_key_values(_mask_uris(text)))


def shorten(value: object, limit: int = 80) -> str:
    """`value` as redacted text of `limit` characters at most (plus masks and a final '…'
    when cut), for showing values of any size in messages: only the first `limit`
    characters are looked at, so a 1 MB cell costs what 80 characters cost.

    A secret that the cut splits is masked whole: a URI password, a `password=` value or
    a credential variable's value that would go on past the cut is masked to the end."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return redact_text(text)
    window = text[:max(0, limit)]
    return _mask_env_secrets(_mask_key_values(_mask_uris(window, cut=True)), cut=True) + ELLIPSIS


def secret_values() -> list[str]:
    """The credentials currently in the environment (longest first), for masking."""
    values = {os.environ.get(name, "") for name in SECRET_ENV}
    return sorted((v for v in values if len(v) >= _MIN_SECRET), key=len, reverse=True)


# ------------------------------------------------------------------------------------ URIs


def _mask_uris(text: str, whole: bool = False, cut: bool = False) -> str:
    """Mask the user info and secret query values of every URI in `text`.

    whole: `text` is one URI to its end (else a URI ends at whitespace).
    cut: `text` was cut from a longer one: a password reaching its end is masked to the end.
    Linear: each '://' is looked at once, the scheme before it is at most _MAX_SCHEME
    characters, and the text is consumed URI after URI."""
    out = []
    pos = 0
    while (sep := text.find("://", pos)) >= 0:
        start = sep
        while start > max(pos, sep - _MAX_SCHEME) and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        if start == sep:  # '://' without a scheme: not a URI
            out.append(text[pos:sep + 3])
            pos = sep + 3
            continue
        end = len(text) if whole else _find(_SPACE, text, sep + 3)
        out.append(text[pos:start])
        out.append(_mask_uri(text[start:end], cut=cut and end == len(text)))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _mask_uri(uri: str, cut: bool) -> str:
    authority = uri.index("://") + 3
    query_from = authority
    end_of_user = _END_OF_USER.search(uri, authority)
    if end_of_user and end_of_user.group() == ":":
        colon = end_of_user.start()
        at = uri.rfind("@", colon)
        if cut:  # the password may go on past the cut, '@'s included
            return uri[:colon + 1] + MASK
        if at >= 0:
            uri = f"{uri[:colon + 1]}{MASK}{uri[at:]}"
            query_from = colon + 1 + len(MASK)
    question = uri.find("?", query_from)
    if question < 0:
        return uri
    end = _find(_END_OF_QUERY, uri, question + 1)
    pairs = [_mask_query_pair(pair) for pair in uri[question + 1:end].split("&")]
    return f"{uri[:question + 1]}{'&'.join(pairs)}{uri[end:]}"


def _mask_query_pair(pair: str) -> str:
    key, eq, _ = pair.partition("=")
    if eq and _SECRET_QUERY_KEYS.search(unquote_plus(key)):
        return f"{key}={MASK}"
    return pair


def _find(pattern: re.Pattern, text: str, pos: int) -> int:
    found = pattern.search(text, pos)
    return found.start() if found else len(text)


# ------------------------------------------------------------------ pairs and variables


def _mask_key_values(text: str) -> str:
    return _KEY_VALUE.sub(lambda m: f"{m['key']}{m['sep']}{m['quote']}{MASK}", text)


def _mask_env_secrets(text: str, cut: bool = False) -> str:
    secrets = secret_values()
    for value in secrets:
        if value in text:
            text = text.replace(value, MASK)
    if cut:  # the text ends with the beginning of a secret: mask that beginning
        for value in secrets:
            for length in range(min(len(value) - 1, len(text)), _MIN_CUT_SECRET - 1, -1):
                if text.endswith(value[:length]):
                    text = text[:-length] + MASK
                    break
    return text
