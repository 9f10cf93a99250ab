"""Key rotation through a real daemon: killed with SIGKILL half-way, every secret
still opens; run again, it finishes; then the old key can go, and every login,
recovery code and pending secret works under the new key alone."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import pyotp

from otpgate.core.crypto import Keyring, account_binding, create_key_file, key_id_of
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser

FILLER = 3000  # rows enough for a rotation to be caught half-way


def _fill(daemon: Daemon, key: bytes) -> None:
    keyring = Keyring(key)
    db = sqlite3.connect(daemon.database)
    rows = []
    for i in range(FILLER):
        name, uid = f"rot{i:05d}", 4_000_000 + i
        secret = base64.b32encode(os.urandom(20)).rstrip(b"=")
        sealed = keyring.seal(secret, account_binding(name, uid))
        rows.append((name, uid, sealed.key_id, sealed.nonce, sealed.ciphertext, 6, 30, 0))
    with db:
        db.executemany(
            "INSERT INTO secrets (username, uid, key_id, nonce, ciphertext, otp_digits, "
            "interval, created_at) VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )
    db.close()


def _key_ids(daemon: Daemon) -> dict[str, int]:
    db = sqlite3.connect(f"file:{daemon.database}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key_id, count(*) FROM secrets GROUP BY key_id").fetchall()
    finally:
        db.close()
    return dict(rows)


def _all_open(daemon: Daemon, keyring: Keyring) -> int:
    from otpgate.core.crypto import Sealed

    db = sqlite3.connect(f"file:{daemon.database}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT username, uid, key_id, nonce, ciphertext FROM secrets "
            "UNION ALL SELECT username, uid, key_id, nonce, ciphertext FROM pending_secrets"
        ).fetchall()
    finally:
        db.close()
    for name, uid, key_id, nonce, ct in rows:
        keyring.open(Sealed(key_id, nonce, ct), account_binding(name, uid))  # raises if not
    return len(rows)


def test_rotation_killed_half_way_then_finished(
    make_daemon: Callable[..., Daemon], user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    daemon = make_daemon()
    admin = daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(window=3), timeout=5)
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    codes = admin.MakeRecoveryCodes(pb.MakeRecoveryCodesRequest(username=user.name), timeout=5)
    newcomer = make_user()
    pending = admin.RenewSecret(
        pb.RenewSecretRequest(username=newcomer.name, pending=True), timeout=5
    )
    daemon.stop()
    old_key_path = daemon.key_file
    old_key = base64.b64decode(old_key_path.read_text())
    _fill(daemon, old_key)

    new_key_path = daemon.root / "etc" / "new.key"
    new_key = create_key_file(str(new_key_path))
    daemon.extra_args += ["--key-file", str(new_key_path), "--old-key-file", str(old_key_path)]
    daemon.start()
    step = int(time.time()) // 30
    verify = pb.VerifyTokenRequest(username=user.name, token=totp.at(step * 30 - 60))
    assert daemon.admin().VerifyToken(verify, timeout=5).valid  # both keys open

    failed: list[BaseException] = []

    def rotate() -> None:
        try:
            daemon.admin().RotateKey(pb.RotateKeyRequest(), timeout=120)
        except grpc.RpcError as exc:  # the kill cuts it off
            failed.append(exc)

    worker = threading.Thread(target=rotate)
    worker.start()
    new_id, old_id = key_id_of(new_key), key_id_of(old_key)
    deadline = time.monotonic() + 60
    while _key_ids(daemon).get(new_id, 0) < FILLER // 10:
        assert time.monotonic() < deadline, _key_ids(daemon)
        time.sleep(0.01)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    daemon.proc = None
    worker.join(timeout=30)
    split = _key_ids(daemon)
    assert split.get(old_id, 0) > 0 and split.get(new_id, 0) > 0, split  # half-way
    both = Keyring(new_key).with_older(old_key)
    assert _all_open(daemon, both) == FILLER + 2

    daemon.start()
    finished = subprocess.run(
        [sys.executable, "-m", "otpgate.cli.main", "--socket", daemon.admin_socket,
         "--timeout", "120", "rotate-key"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "done: nothing needs the old key" in finished.stdout
    assert _key_ids(daemon) == {new_id: FILLER + 1}
    daemon.stop()

    # The old key goes: otpgated starts on the new one alone, and everything works.
    daemon.extra_args = ["--key-file", str(new_key_path)]
    daemon.start()
    assert _all_open(daemon, Keyring(new_key)) == FILLER + 2
    admin = daemon.admin()
    verify.token = totp.at(step * 30 + 30)
    assert admin.VerifyToken(verify, timeout=5).valid
    verify.token = codes.codes[0]
    assert admin.VerifyToken(verify, timeout=5).recovery_codes_left == 9
    confirming = pyotp.parse_uri(pending.twofactor_config.provisioning_uri).now()
    confirmed = admin.ConfirmSecret(
        pb.ConfirmSecretRequest(username=newcomer.name, token=confirming), timeout=5
    )
    assert confirmed.twofactor_auth_configured
    assert "key_rotated" in daemon.log()
    # Run again with one key only: nothing to rotate, and it says so.
    again = subprocess.run(
        [sys.executable, "-m", "otpgate.cli.main", "--socket", daemon.admin_socket, "rotate-key"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0 and "nothing to rotate" in again.stdout
