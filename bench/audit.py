"""The audit log and logins (DESIGN.md §8): what they cost.

Appends `--rows` audit rows one transaction each (as every audited action does) into a fresh
SQLite file, or a fresh PostgreSQL schema with `--backend postgres`, then walks the chain with
`verify`, and times an argon2 password check (what every login pays).

    python bench/audit.py [--rows 5000] [--backend postgres] [--pg-url postgresql://postgres@127.0.0.1/test]

Prints one JSON line: appends_per_s, verify_rows_per_s, login_verify_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import psycopg
from _common import emit

from central.identity import users
from central.identity.audit import AuditLog
from central.storage import open_storage
from runtime.logs import configure_logging


async def run(db_url: str, rows: int) -> dict[str, float]:
    async with open_storage(db_url) as storage:
        audit = AuditLog(storage)
        t0 = time.perf_counter()
        for i in range(rows):
            await audit.append("bench", "bench.step", f"step:{i}", {"i": i, "note": "值班"})
        append_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        verdict = await audit.verify()
        verify_s = time.perf_counter() - t0
        assert verdict.ok and verdict.rows == rows, verdict
    digest = users.hash_password("bench-password-123")
    t0 = time.perf_counter()
    for _ in range(5):
        users.verify_password(digest, "bench-password-123")
    login_ms = (time.perf_counter() - t0) / 5 * 1000
    return {"appends_per_s": round(rows / append_s), "verify_rows_per_s": round(rows / verify_s),
            "login_verify_ms": round(login_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    configure_logging("central", json=True, level="warning")
    if args.backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(run(f"sqlite:///{Path(tmp) / 'central.db'}", args.rows))
    else:
        schema = f"fl_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            url = f"{args.pg_url}?options=-csearch_path%3D{schema}"
            result = asyncio.run(run(url, args.rows))
        finally:
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    emit(bench="audit", backend=args.backend, rows=args.rows, **result)


if __name__ == "__main__":
    main()
