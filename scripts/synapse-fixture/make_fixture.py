#!/usr/bin/env python3
"""Regenerates keyclaim-import's Synapse fixtures from a real Synapse.

Installs `matrix-synapse` from PyPI into a virtualenv, runs it locally (SQLite,
and with --postgres also a throwaway PostgreSQL cluster), and drives it over
HTTP like clients do: shared-secret registration, password logins with fixed
device IDs, `POST /_matrix/client/v3/keys/upload` and `/keys/claim`. The
database then holds claimed keys, keys from several uploads at different
times, re-uploads, used and unused fallback keys, several algorithms, and a
few rows Synapse accepts but keyclaim's validation does not (R2.2, R2.3).

It then records, from Synapse itself, what Synapse would hand out next: the
database is copied, a second Synapse runs on the copy, and every (device,
algorithm) is claimed one key at a time until the fallback key (or nothing)
comes back. The answers are written as JSON beside the fixture.

Outputs (in --out, by default crates/keyclaim-import/tests/fixtures):
  synapse.db                   the two key tables of the SQLite database
                               (Synapse's own DDL and rows; the other tables
                               are dropped to keep the file small)
  synapse.expected.json        sync state and next claims per device (SQLite)
  synapse-postgres.sql         with --postgres: pg_dump of the two key tables
  synapse-postgres.expected.json

Usage: python3 scripts/synapse-fixture/make_fixture.py [--postgres] [--out DIR]
       [--workdir DIR] [--synapse-version X.Y.Z]
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SYNAPSE_VERSION = "1.163.2"
SERVER = "fixture.test"
SECRET = "keyclaim-fixture-registration-secret"
PASSWORD = "fixture-password"
PG_BIN = "/usr/lib/postgresql/15/bin"
TABLES = ("e2e_one_time_keys_json", "e2e_fallback_keys_json")
SC = "signed_curve25519"
PQ = "org.example.pq_kem"  # any algorithm name is allowed; a second signed one
# A device ID Synapse accepts at login (up to 512 characters) but keyclaim
# does not (R2.2: at most 255 bytes).
LONG_DEVICE = "L" * 300


def log(msg):
    print(f"make_fixture: {msg}", file=sys.stderr, flush=True)


# --- the virtualenv --------------------------------------------------------

def ensure_venv(args):
    """Re-runs this script inside a virtualenv that has Synapse installed."""
    venv = os.path.abspath(args.venv or os.path.join(args.workdir, "venv"))
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        log(f"creating a virtualenv in {venv}")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pkgs = [f"matrix-synapse=={args.synapse_version}"]
    if args.postgres:
        pkgs.append("psycopg2-binary")
    log(f"installing {' '.join(pkgs)}")
    subprocess.run([py, "-m", "pip", "install", "-q", *pkgs], check=True)
    argv = [py, os.path.abspath(__file__), *sys.argv[1:]]
    if not args.venv:
        argv += ["--venv", venv]
    if "--workdir" not in sys.argv:
        argv += ["--workdir", args.workdir]
    os.execv(py, argv)


# --- a Synapse process -----------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory, database):
    """Generates Synapse's config and overrides what the fixture needs."""
    import yaml  # installed with Synapse

    os.makedirs(directory, exist_ok=True)
    cfg_path = os.path.join(directory, "homeserver.yaml")
    if not os.path.exists(cfg_path):
        subprocess.run(
            [sys.executable, "-m", "synapse.app.homeserver",
             "--server-name", SERVER, "--config-path", cfg_path,
             "--data-directory", directory,
             "--generate-config", "--report-stats=no"],
            check=True, cwd=directory, stdout=subprocess.DEVNULL)
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    port = free_port()
    lots = {"per_second": 10000, "burst_count": 10000}
    cfg.update({
        "listeners": [{
            "port": port, "type": "http", "tls": False,
            "bind_addresses": ["127.0.0.1"], "x_forwarded": False,
            "resources": [{"names": ["client"], "compress": False}],
        }],
        "database": database,
        "registration_shared_secret": SECRET,
        "enable_registration": False,
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "rc_login": {"address": lots, "account": lots, "failed_attempts": lots},
        "rc_registration": lots,
        "rc_message": lots,
        "federation_domain_whitelist": [],
    })
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    log_cfg = cfg.get("log_config")
    if log_cfg and os.path.exists(log_cfg):
        with open(log_cfg) as f:
            text = f.read()
        with open(log_cfg, "w") as f:
            f.write(text.replace("level: INFO", "level: WARNING"))
    return cfg_path, port


class Synapse:
    def __init__(self, directory, database):
        self.cfg, self.port = write_config(directory, database)
        self.base = f"http://127.0.0.1:{self.port}"
        self.out = open(os.path.join(directory, "synapse.out"), "ab")
        log(f"starting Synapse on port {self.port} ({database['name']})")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", self.cfg],
            cwd=directory, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"Synapse exited early; see {directory}/synapse.out")
            try:
                self.request("GET", "/_matrix/client/versions")
                return
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline:
                    self.stop()
                    raise SystemExit("Synapse did not answer within 120 s")
                time.sleep(0.2)

    def request(self, method, path, body=None, token=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise SystemExit(f"{method} {path}: {e.code} {e.read()[:500]!r}")

    def register(self, localpart):
        nonce = self.request("GET", "/_synapse/admin/v1/register")["nonce"]
        mac = hmac.new(SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(),
                                 PASSWORD.encode(), b"notadmin"]))
        self.request("POST", "/_synapse/admin/v1/register", {
            "nonce": nonce, "username": localpart, "password": PASSWORD,
            "admin": False, "mac": mac.hexdigest()})

    def login(self, localpart, device_id):
        return self.request("POST", "/_matrix/client/v3/login", {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": PASSWORD, "device_id": device_id,
            "initial_device_display_name": f"fixture {device_id[:20]}",
        })["access_token"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


# --- deterministic key material ----------------------------------------------

def b64(data):
    return base64.b64encode(data).decode().rstrip("=")


def signed_key(user, device, key_id, fallback=False, canonical=False):
    seed = f"{user}|{device}|{key_id}".encode()
    obj = {
        "key": b64(hashlib.sha256(seed).digest()),
        "signatures": {user: {f"ed25519:{device}": b64(hashlib.sha512(seed).digest())}},
    }
    if fallback:
        obj["fallback"] = True
    return dict(sorted(obj.items())) if canonical else obj


def unsigned_key(user, device, key_id):
    return b64(hashlib.sha256(f"unsigned|{user}|{device}|{key_id}".encode()).digest())


class Device:
    def __init__(self, syn, localpart, device_id):
        self.syn = syn
        self.user = f"@{localpart}:{SERVER}"
        self.device = device_id
        self.token = syn.login(localpart, device_id)

    def upload(self, otks=(), fallbacks=(), unsigned=(), canonical=False):
        """One /keys/upload; key IDs in sorted order, as clients send them."""
        body = {}
        if otks or unsigned:
            keys = {k: signed_key(self.user, self.device, k) for k in otks}
            keys.update({k: unsigned_key(self.user, self.device, k) for k in unsigned})
            body["one_time_keys"] = dict(sorted(keys.items()))
        if fallbacks:
            body["fallback_keys"] = {
                k: signed_key(self.user, self.device, k, fallback=True, canonical=canonical)
                for k in sorted(fallbacks)}
        answer = self.syn.request("POST", "/_matrix/client/v3/keys/upload", body, self.token)
        # Uploads at distinct milliseconds: Synapse orders by upload time only.
        time.sleep(0.01)
        return answer

    def sync_state(self):
        s = self.syn.request("GET", "/_matrix/client/v3/sync?timeout=0", token=self.token)
        return {
            "one_time_key_counts": s.get("device_one_time_keys_count", {}),
            "unused_fallback_key_types": sorted(s.get("device_unused_fallback_key_types", [])),
        }


def claim(syn, token, user, device, algorithm):
    answer = syn.request("POST", "/_matrix/client/v3/keys/claim",
                         {"one_time_keys": {user: {device: algorithm}}}, token)
    return answer.get("one_time_keys", {}).get(user, {}).get(device, {})


def scenario(syn):
    """Drives Synapse like clients would; returns the devices it made."""
    for user in ("alice", "bob", "carol", "mallory", "claimer"):
        syn.register(user)
    claimer = Device(syn, "claimer", "CLAIMER")

    def take(dev, algorithm, n):
        for _ in range(n):
            claim(syn, claimer.token, dev.user, dev.device, algorithm)

    devices = []
    # Three uploads; the second one's key IDs sort before the first's, so
    # upload time (not key ID) decides; then claims, a re-upload of a stored
    # key (ignored: keeps its time), of a claimed key (stored again, newest),
    # unsigned curve25519 keys, an unused fallback key.
    a1 = Device(syn, "alice", "ALICE1")
    devices.append(a1)
    a1.upload(otks=[f"{SC}:K{i}" for i in range(5, 10)], fallbacks=[f"{SC}:FB1"])
    a1.upload(otks=[f"{SC}:K{i}" for i in range(0, 5)], unsigned=["curve25519:C0", "curve25519:C1"])
    take(a1, SC, 3)  # K5, K6, K7
    take(a1, "curve25519", 1)
    a1.upload(otks=[f"{SC}:K8", f"{SC}:K5", f"{SC}:N0", f"{SC}:M1"])
    # All one-time keys claimed, then the fallback key handed out (used),
    # then the same fallback key uploaded again. Synapse compares the stored
    # text with the canonical JSON of the new upload: with members sent in
    # canonical order (ALICE3) they match and the key stays used; sent in
    # another order (ALICE2) they differ and the key is stored as unused.
    for name, canonical in (("ALICE2", False), ("ALICE3", True)):
        a = Device(syn, "alice", name)
        devices.append(a)
        a.upload(otks=[f"{SC}:A0", f"{SC}:A1"], fallbacks=[f"{SC}:FBA"], canonical=canonical)
        take(a, SC, 3)
        a.upload(fallbacks=[f"{SC}:FBA"], canonical=canonical)
    # Two algorithms with fallback keys; the signed_curve25519 one is used,
    # then replaced by a new (unused) one; the other stays unused.
    b1 = Device(syn, "bob", "BOB1")
    devices.append(b1)
    b1.upload(otks=[f"{SC}:B{i}" for i in range(4)] + [f"{PQ}:P{i}" for i in range(3)],
              fallbacks=[f"{SC}:FBOLD", f"{PQ}:PFB"])
    take(b1, SC, 5)
    b1.upload(otks=[f"{SC}:B9"], fallbacks=[f"{SC}:FBNEW"])
    take(b1, PQ, 1)
    # Only a fallback key, handed out once.
    b2 = Device(syn, "bob", "BOB2")
    devices.append(b2)
    b2.upload(fallbacks=[f"{SC}:ONLYFB"])
    take(b2, SC, 1)
    # Many keys over several uploads, some claimed in between.
    c1 = Device(syn, "carol", "CAROL1")
    devices.append(c1)
    for u in range(3):
        c1.upload(otks=[f"{SC}:U{u}K{i:02}" for i in range(20)])
        take(c1, SC, 7)
    c1.upload(fallbacks=[f"{SC}:CFB"])
    # Every one-time key claimed, fallback key not yet handed out.
    c2 = Device(syn, "carol", "CAROL2")
    devices.append(c2)
    c2.upload(otks=[f"{SC}:X0", f"{SC}:X1"], fallbacks=[f"{SC}:XFB"])
    take(c2, SC, 2)
    # Rows Synapse accepts but keyclaim skips: an empty algorithm and an
    # empty key name (R2.3), a key name over 255 bytes (R2.3), next to valid
    # keys; and a device ID over 255 bytes (R2.2).
    m1 = Device(syn, "mallory", "MALLORY1")
    devices.append(m1)
    m1.upload(otks=[f"{SC}:OK0", f"{SC}:OK1", ":NOALG", f"{SC}:", f"{SC}:{'n' * 300}"],
              fallbacks=[f"{SC}:MFB"])
    m2 = Device(syn, "mallory", LONG_DEVICE)
    devices.append(m2)
    m2.upload(otks=[f"{SC}:LONG0"], fallbacks=[f"{SC}:LONGFB"])
    return devices, claimer


def next_claims(syn, token, rows, otk_ts):
    """Claims every (device, algorithm) of `rows` one key at a time until
    Synapse answers its fallback key or nothing; the answers in order, each
    one-time key with its upload time (`ts_added_ms`) as the database held it."""
    out = {}
    for (user, device), algorithms in rows.items():
        per = {}
        for algorithm in sorted(algorithms):
            seq = []
            for _ in range(1000):
                got = claim(syn, token, user, device, algorithm)
                if not got:
                    break
                ((key_id, key),) = got.items()
                is_fallback = isinstance(key, dict) and key.get("fallback") is True
                entry = {"key_id": key_id, "key": key, "fallback": is_fallback}
                if not is_fallback:
                    entry["ts_added_ms"] = otk_ts[(user, device, key_id)]
                seq.append(entry)
                if is_fallback:
                    break
            per[algorithm] = seq
        out[(user, device)] = per
    return out


def device_algorithms(rows):
    """(user, device) -> algorithms, from (user, device, algorithm) rows."""
    out = {}
    for user, device, algorithm in rows:
        out.setdefault((user, device), set()).add(algorithm)
    return out


def expected_json(version, database, devices, sync, claims):
    return {
        "synapse_version": version,
        "database": database,
        "note": "written by scripts/synapse-fixture/make_fixture.py from Synapse's own answers",
        "devices": [
            {
                "user_id": d.user,
                "device_id": d.device,
                "sync": sync[(d.user, d.device)],
                "next_claims": claims.get((d.user, d.device), {}),
            }
            for d in devices
        ],
    }


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")


# --- SQLite ------------------------------------------------------------------

def run_sqlite(args, out):
    work = os.path.join(args.workdir, "sqlite")
    shutil.rmtree(work, ignore_errors=True)
    db = os.path.join(work, "homeserver.db")
    syn = Synapse(work, {"name": "sqlite3", "args": {"database": db}})
    try:
        devices, claimer = scenario(syn)
        sync = {(d.user, d.device): d.sync_state() for d in devices}
        claimer_token = claimer.token
    finally:
        syn.stop()
    fixture = os.path.join(out, "synapse.db")
    extract_sqlite(db, fixture)

    copy_dir = os.path.join(args.workdir, "sqlite-copy")
    shutil.rmtree(copy_dir, ignore_errors=True)
    os.makedirs(copy_dir)
    for name in os.listdir(work):
        src = os.path.join(work, name)
        if os.path.isfile(src):
            shutil.copy(src, copy_dir)
    copy_db = os.path.join(copy_dir, "homeserver.db")
    rows, otk_ts = key_rows_sqlite(copy_db)
    syn = Synapse(copy_dir, {"name": "sqlite3", "args": {"database": copy_db}})
    try:
        claims = next_claims(syn, claimer_token, device_algorithms(rows), otk_ts)
    finally:
        syn.stop()
    write_json(os.path.join(out, "synapse.expected.json"),
               expected_json(args.synapse_version, "sqlite", devices, sync, claims))
    log(f"wrote {fixture} ({os.path.getsize(fixture)} bytes)")


def key_rows_sqlite(db):
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT user_id, device_id, algorithm FROM e2e_one_time_keys_json UNION "
            "SELECT user_id, device_id, algorithm FROM e2e_fallback_keys_json").fetchall()
        ts = con.execute("SELECT user_id, device_id, algorithm, key_id, ts_added_ms "
                         "FROM e2e_one_time_keys_json").fetchall()
        return rows, otk_times(ts)
    finally:
        con.close()


def otk_times(rows):
    """(user, device, full key ID) -> ts_added_ms."""
    return {(u, d, f"{a}:{k}"): int(t) for u, d, a, k, t in rows}


def extract_sqlite(src, dst):
    """Copies the two key tables (Synapse's DDL, indexes and rows, rowids
    kept) into a new small database."""
    if os.path.exists(dst):
        os.remove(dst)
    con = sqlite3.connect(dst)
    con.execute("ATTACH DATABASE ? AS src", (src,))
    for table in TABLES:
        (ddl,) = con.execute(
            "SELECT sql FROM src.sqlite_master WHERE type = 'table' AND name = ?",
            (table,)).fetchone()
        con.execute(ddl)
        for (idx,) in con.execute(
                "SELECT sql FROM src.sqlite_master WHERE type = 'index' AND tbl_name = ? "
                "AND sql IS NOT NULL", (table,)).fetchall():
            con.execute(idx)
        cols = [r[1] for r in con.execute(f"PRAGMA src.table_info({table})")]
        col_list = ", ".join(cols)
        con.execute(f"INSERT INTO main.{table} (rowid, {col_list}) "
                    f"SELECT rowid, {col_list} FROM src.{table} ORDER BY rowid")
    con.commit()
    con.execute("DETACH DATABASE src")
    con.execute("VACUUM")
    con.close()


# --- PostgreSQL --------------------------------------------------------------

def as_postgres(cmd, **kw):
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, **kw)


class Cluster:
    def __init__(self, directory):
        self.dir = directory
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
        self.port = free_port()
        as_postgres([f"{PG_BIN}/initdb", "-D", f"{directory}/data", "-U", "postgres",
                     "-A", "trust", "--no-sync", "-E", "UTF8"], stdout=subprocess.DEVNULL)
        as_postgres([f"{PG_BIN}/pg_ctl", "-D", f"{directory}/data", "-l", f"{directory}/log",
                     "-w", "-o", f"-p {self.port} -k {directory} -c listen_addresses=127.0.0.1 "
                     "-c fsync=off", "start"], stdout=subprocess.DEVNULL)

    def psql(self, sql, db="postgres"):
        return as_postgres([f"{PG_BIN}/psql", "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
                            "-At", "-c", sql], capture_output=True, text=True).stdout

    def database(self, name):
        return {"name": "psycopg2", "args": {
            "user": "postgres", "host": "127.0.0.1", "port": self.port,
            "database": name, "cp_min": 1, "cp_max": 5}}

    def stop(self):
        as_postgres([f"{PG_BIN}/pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "stop"],
                    stdout=subprocess.DEVNULL)


def run_postgres(args, out):
    cluster = Cluster(os.path.join(args.workdir, "pg"))
    try:
        # Synapse requires a UTF8 database with C collation.
        cluster.psql("CREATE DATABASE synapse ENCODING 'UTF8' LC_COLLATE 'C' "
                     "LC_CTYPE 'C' TEMPLATE template0")
        work = os.path.join(args.workdir, "pg-synapse")
        shutil.rmtree(work, ignore_errors=True)
        syn = Synapse(work, cluster.database("synapse"))
        try:
            devices, claimer = scenario(syn)
            sync = {(d.user, d.device): d.sync_state() for d in devices}
        finally:
            syn.stop()
        dump = as_postgres(
            [f"{PG_BIN}/pg_dump", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
             "--no-owner", "--no-privileges", "--inserts", "--rows-per-insert=50",
             *[a for t in TABLES for a in ("-t", t)], "synapse"],
            capture_output=True, text=True).stdout
        fixture = os.path.join(out, "synapse-postgres.sql")
        with open(fixture, "w") as f:
            f.write(f"-- The key tables of a PostgreSQL database written by Synapse "
                    f"{args.synapse_version}\n-- (pg_dump; schema qualifiers removed so "
                    f"that it loads into any search_path).\n")
            f.write(unqualify(dump))
        cluster.psql("CREATE DATABASE synapse_copy TEMPLATE synapse")
        copy_work = os.path.join(args.workdir, "pg-synapse-copy")
        shutil.rmtree(copy_work, ignore_errors=True)
        shutil.copytree(work, copy_work)
        rows = [tuple(line.split("|")) for line in cluster.psql(
            "SELECT user_id, device_id, algorithm FROM e2e_one_time_keys_json UNION "
            "SELECT user_id, device_id, algorithm FROM e2e_fallback_keys_json",
            db="synapse_copy").splitlines() if line]
        # Key IDs here hold no '|' (psql's field separator).
        ts = [tuple(line.split("|")) for line in cluster.psql(
            "SELECT user_id, device_id, algorithm, key_id, ts_added_ms "
            "FROM e2e_one_time_keys_json", db="synapse_copy").splitlines() if line]
        syn = Synapse(copy_work, cluster.database("synapse_copy"))
        try:
            claims = next_claims(syn, claimer.token, device_algorithms(rows), otk_times(ts))
        finally:
            syn.stop()
        write_json(os.path.join(out, "synapse-postgres.expected.json"),
                   expected_json(args.synapse_version, "postgres", devices, sync, claims))
        log(f"wrote {fixture} ({os.path.getsize(fixture)} bytes)")
    finally:
        cluster.stop()


def unqualify(dump):
    lines = []
    for line in dump.splitlines():
        if line.startswith("SELECT pg_catalog.set_config('search_path'"):
            continue
        if line.startswith("\\restrict") or line.startswith("\\unrestrict"):
            continue
        lines.append(line.replace("public.", ""))
    return "\n".join(lines) + "\n"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(repo, "crates/keyclaim-import/tests/fixtures"))
    p.add_argument("--workdir", default=None, help="scratch space (default: a new temp dir)")
    p.add_argument("--venv", default=None, help="virtualenv to use (default: WORKDIR/venv)")
    p.add_argument("--postgres", action="store_true",
                   help=f"also run Synapse on a throwaway PostgreSQL from {PG_BIN}")
    p.add_argument("--synapse-version", default=SYNAPSE_VERSION)
    args = p.parse_args()
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="synapse-fixture-")
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    if args.postgres and os.geteuid() == 0:
        os.chmod(args.workdir, 0o755)
    ensure_venv(args)
    os.makedirs(args.out, exist_ok=True)
    run_sqlite(args, args.out)
    if args.postgres:
        run_postgres(args, args.out)


if __name__ == "__main__":
    main()
