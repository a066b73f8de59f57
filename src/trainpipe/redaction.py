"""Keep secrets out of everything that leaves the process: logs, params, tags, errors.

Three kinds of secret are masked wherever they appear:
- the password in a URI's user info (`postgresql://ml:s3cret@db/mlflow`) and secret-looking
  query values (`?X-Amz-Signature=...`, `?password=...`);
- `key=value` / `key: value` pairs whose key names a secret (`password=...`,
  `aws_secret_access_key = ...`, `PGPASSWORD=...`), as in DSNs and config dumps;
- the current values of the environment variables that hold credentials
  (`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `PGPASSWORD`, `MLFLOW_TRACKING_PASSWORD`, ...)
  wherever they appear verbatim.
"""

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Environment variables whose values are credentials: never shown, wherever they turn up.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "PGPASSWORD",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AZURE_STORAGE_ACCESS_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "MINIO_ROOT_PASSWORD", "MINIO_SECRET_KEY")
_MIN_SECRET = 6  # shorter env values would mask ordinary words
_SECRET_QUERY_KEYS = re.compile(r"pass|secret|token|key|signature|credential|auth", re.I)
# user:password@ inside any URI-looking text, e.g. postgresql+psycopg2://u:p@host/db
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s/]*)@")
# password=..., aws_secret_access_key: ..., PGPASSWORD=... (DSNs, env dumps, config text)
_KEY_VALUE = re.compile(
    r"(?P<key>\b\w*(?:password|passwd|pwd|secret_access_key|secret_key|session_token"
    r"|access_token|client_secret|api_key)\b)(?P<sep>\s*[=:]\s*)(?P<quote>['\"]?)"
    r"(?P<value>[^\s'\",;&]+)",
    re.I,
)
_URI = re.compile(r"[a-zA-Z][\w+.-]*://[^\s'\"<>`]+")


def redact_uri(uri: str) -> str:
    """Return `uri` with any password and secret-looking query values masked."""
    if not isinstance(uri, str) or "://" not in uri:
        return _mask_env_secrets(uri) if isinstance(uri, str) else uri
    uri = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", uri)
    parts = urlsplit(uri)
    if parts.query:
        query = [
            (k, MASK if _SECRET_QUERY_KEYS.search(k) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        uri = urlunsplit(parts._replace(query=urlencode(query, safe="*")))
    return _mask_env_secrets(uri)


def redact_text(text: str) -> str:
    """Mask secrets inside free text (error messages, logs, tracebacks, param values)."""
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    if "?" in text:  # secret query values of URIs inside the text
        text = _URI.sub(lambda m: redact_uri(m.group(0)) if "?" in m.group(0) else m.group(0),
                        text)
    text = _KEY_VALUE.sub(lambda m: f"{m['key']}{m['sep']}{m['quote']}{MASK}", text)
    return _mask_env_secrets(text)


def secret_values() -> list[str]:
    """The credentials currently in the environment (longest first), for masking."""
    values = {os.environ.get(name, "") for name in SECRET_ENV}
    return sorted((v for v in values if len(v) >= _MIN_SECRET), key=len, reverse=True)


def _mask_env_secrets(text: str) -> str:
    for value in secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text
