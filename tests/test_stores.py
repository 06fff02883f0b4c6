"""The real stores the production profile runs on, as the tests start them (tests/stores.py): a PostgreSQL 15
server that only a password opens, and moto's S3 server."""

from __future__ import annotations

import os
import stat

import pytest


def test_postgres_answers_sql_with_its_password_only(postgres):
    import sqlalchemy as sa

    url = postgres.create_database("t_stores")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (n bigint PRIMARY KEY, s text)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'one'), (2, 'two')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT s FROM t ORDER BY n")).scalars().all() == ["one", "two"]
            assert conn.execute(sa.text("SHOW server_version")).scalar().startswith("15.")
    finally:
        engine.dispose()
    # scram-sha-256 on loopback: a local process without the password is refused
    wrong = sa.create_engine(url.replace(postgres.password, "not-the-password"))
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        wrong.connect()
    wrong.dispose()
    data = postgres.base / "data"
    st = os.stat(data)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid != 0  # the postgres user's alone
    assert not (postgres.base / "pw").exists()  # the password file initdb read is gone


def test_moto_s3_stores_and_returns_an_object(moto_s3):
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="onepath-test")
    s3.put_object(Bucket="onepath-test", Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket="onepath-test", Key="a/b.txt")["Body"].read() == b"hello"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="onepath-test")["Contents"]] == ["a/b.txt"]
