import subprocess
import sys
import textwrap
from urllib.parse import unquote, urlsplit

import psycopg2.extensions
import pytest
import requests.utils
import urllib3.util
from sqlalchemy.engine import make_url

from trainpipe.redaction import MASK, redact_text, redact_uri, shorten


def test_password_is_masked_in_uris():
    assert redact_uri("postgresql+psycopg2://ml:s3cret@db:5432/mlflow") == (
        "postgresql+psycopg2://ml:***@db:5432/mlflow")


def test_secret_query_values_are_masked():
    out = redact_uri("https://h/x.csv?X-Amz-Signature=abc&part=1&token=zzz")
    assert "abc" not in out and "zzz" not in out and "part=1" in out


def test_plain_values_pass_through():
    assert redact_uri("s3://bucket/raw/train.csv") == "s3://bucket/raw/train.csv"
    assert redact_uri("http://127.0.0.1:5000/#/experiments/1") == (
        "http://127.0.0.1:5000/#/experiments/1")
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert redact_uri(42) == 42


def test_free_text_is_redacted():
    msg = "could not connect to postgresql://u:hunter2@h/db: refused"
    assert "hunter2" not in redact_text(msg)


# Passwords with characters a URI should have percent-encoded: each parser takes a
# different part of them as the password, and every such part must be masked.
RAW_PASSWORDS = [
    ("http://bob:pa@ssw0rdSECRET@host", "http://bob:***@host"),
    ("postgresql://u:ab/cdSECRET9@host/db", "postgresql://u:***@host/db"),
    ("postgresql+psycopg2://u:x/y@zSECRET@host:5432/db", "postgresql+psycopg2://u:***@host:5432/db"),
    ("http://bob@corp.example:pwSECRET@host:5000", "http://bob@corp.example:***@host:5000"),
    ("postgresql://u:q?uery#fragSECRET@host/db?sslmode=require",
     "postgresql://u:***@host/db?sslmode=require"),
    ("https://u:pct%40encodedSECRET@host/x", "https://u:***@host/x"),
    ("postgresql://u:sp aceSECRET@host/db", "postgresql://u:***@host/db"),
]


def parsed_passwords(uri: str) -> set[str]:
    """What urllib, requests (and urllib3 under it), SQLAlchemy and libpq take as the
    password of `uri` (a parser that rejects the URI takes nothing)."""
    readers = [
        lambda: urlsplit(uri).password,
        lambda: requests.utils.get_auth_from_url(uri)[1],
        lambda: (urllib3.util.parse_url(uri).auth or "").partition(":")[2],
        lambda: make_url(uri).password,
        lambda: psycopg2.extensions.parse_dsn(uri).get("password"),
    ]
    found = set()
    for read in readers:
        try:
            password = read()
        except Exception:  # noqa: BLE001 - this parser refuses the URI: it takes no password
            continue
        if password:
            found |= {str(password), unquote(str(password))}
    return found


@pytest.mark.parametrize(("uri", "masked"), RAW_PASSWORDS)
def test_raw_characters_in_a_password_are_masked_for_every_parser(uri, masked):
    passwords = parsed_passwords(uri)
    assert passwords, "no parser took a password: the case tests nothing"
    assert redact_uri(uri) == masked
    shown = [redact_uri(uri)]
    if " " not in uri:  # in free text a URI ends at whitespace
        shown += [redact_text(f"cannot reach {uri}: refused (contact bob@example.com)"),
                  redact_text(f"model=lightgbm tracking.uri={uri} seed=3"),
                  redact_text(f'{{"uri": "{uri}", "ok": false}}')]
        assert shown[1] == f"cannot reach {masked}: refused (contact bob@example.com)"
        assert shown[2] == f"model=lightgbm tracking.uri={masked} seed=3"
    for text in shown:
        assert "SECRET" not in text, text
        assert not [p for p in passwords if p in text], (text, passwords)


def test_shorten_cuts_long_values_and_masks_what_the_cut_splits(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "awssecret-0123456789abcdef")
    assert shorten("a" * 1000, 10) == "a" * 10 + "…"
    assert shorten("short", 10) == "short"
    assert shorten(12.5, 10) == "12.5"
    assert shorten("postgresql://u:hunter2@h/db", 80) == "postgresql://u:***@h/db"
    # the cut falls inside a password: no part of it is shown
    assert shorten("postgresql://u:" + "x" * 200 + "@h/db", 30) == "postgresql://u:***…"
    assert shorten("http://bob:pa@ssw0rdSECRET@host", 24) == "http://bob:***…"
    assert shorten("login password=hunter2hunter2", 20) == "login password=***…"
    # a credential variable's value cut in two: its beginning is masked too
    assert shorten("key is awssecret-0123456789abcdef, ok", 17) == "key is ***…"


PATHOLOGICAL = {
    "a 1 MB word, with a '?'": "'a' * N + '?'",
    "many '://'": "'a://' * (N // 4)",
    "many 'scheme://user:' without '@'": "'a://b:' * (N // 6)",
    "many '@'": "'@' * N",
    "a user, then many '@'": "'http://u:' + '@' * N",
    "many '='": "'=' * N",
    "many 'a='": "'a=' * (N // 2)",
    "many 'password'": "'password' * (N // 8)",
    "many 'password='": "'password=' * (N // 9)",
    "'password' then spaces": "'password' + ' ' * N + 'x'",
    "many queries": "'a://b?' * (N // 6)",
    "a query of '&'": "'a://b?' + '&' * N",
    "a long scheme-like run": "'a.' * (N // 2) + '://'",
    "many URIs with secrets": "'x://u:p@h/?a=b&password=c ' * (N // 26)",
}


def test_redaction_is_linear_on_a_megabyte_and_pathological_inputs():
    """Each input is 1 MB: quadratic redaction takes hours on each (48 s on 100 kB), linear
    takes well under a second. Run in a subprocess so that a regression fails by its
    timeout instead of hanging the suite."""
    script = textwrap.dedent(f"""
        from trainpipe.redaction import redact_text, redact_uri, shorten
        N = 1_000_000
        for name, make in {PATHOLOGICAL!r}.items():
            text = eval(make)
            redact_text(text), redact_uri(text), shorten(text, 80)
            print("ok", name, flush=True)
    """)
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        done = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"redaction did not finish within 240 s; finished: {done!r}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(PATHOLOGICAL)


def test_a_masked_text_stays_masked():
    once = redact_text("see http://bob:pa@ss@host and password=x")
    assert redact_text(once) == once == f"see http://bob:{MASK}@host and password={MASK}"
