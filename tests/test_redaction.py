from trainpipe.redaction import redact_text, redact_uri


def test_password_is_masked_in_uris():
    assert redact_uri("postgresql+psycopg2://ml:s3cret@db:5432/mlflow") == (
        "postgresql+psycopg2://ml:***@db:5432/mlflow")


def test_secret_query_values_are_masked():
    out = redact_uri("https://h/x.csv?X-Amz-Signature=abc&part=1&token=zzz")
    assert "abc" not in out and "zzz" not in out and "part=1" in out


def test_plain_values_pass_through():
    assert redact_uri("s3://bucket/raw/train.csv") == "s3://bucket/raw/train.csv"
    assert redact_uri(42) == 42


def test_free_text_is_redacted():
    msg = "could not connect to postgresql://u:hunter2@h/db: refused"
    assert "hunter2" not in redact_text(msg)
