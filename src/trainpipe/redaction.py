"""Keep secrets out of everything that leaves the process: logs, params, tags, errors."""

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_QUERY_KEYS = re.compile(r"pass|secret|token|key|signature|credential|auth", re.I)
# user:password@ inside any URI-looking text, e.g. postgresql+psycopg2://u:p@host/db
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s/]*)@")


def redact_uri(uri: str) -> str:
    """Return `uri` with any password and secret-looking query values masked."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    uri = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", uri)
    parts = urlsplit(uri)
    if parts.query:
        query = [
            (k, MASK if _SECRET_QUERY_KEYS.search(k) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        uri = urlunsplit(parts._replace(query=urlencode(query, safe="*")))
    return uri


def redact_text(text: str) -> str:
    """Mask passwords in every URI found inside free text (error messages, logs)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
