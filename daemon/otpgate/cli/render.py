"""What a command's result looks like: text for people, JSON (--json) for scripts.

JSON objects come from the protobuf messages (json_format), so their keys are the
.proto field names in declaration order, with three adjustments that keep the
shapes the CLI has always printed: enum values as short lower-case names
("optional", not "ENROLLMENT_POLICY_OPTIONAL"), 64-bit integers as numbers (not
strings), and an `optional` field that is not set as null.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from collections.abc import Sequence
from typing import Any, TextIO

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from otpgate.cli import qr
from otpgate.cli.client import CODE_NOT_ACCEPTED, Verification
from otpgate.cli.commands import (
    AuditShown,
    ConfigShown,
    ConfigUpdated,
    Confirmed,
    DoctorReport,
    Imported,
    KeyRotated,
    RecoveryCodesMade,
    Result,
    SecretUnset,
    SshWired,
    Unlocked,
    UriShown,
    UserShown,
    UsersListed,
    Verified,
)
from otpgate.ssh.setup import FileChange
from otpgate.v1 import otpgate_pb2 as pb

_64_BIT = (descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64)


def message_dict(message: Message) -> dict[str, Any]:
    """A message as a JSON object (see the module's docstring)."""
    raw = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    shaped: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:  # declaration order: the documented order
        value = getattr(message, field.name)
        if field.message_type is not None:
            shaped[field.name] = (
                [message_dict(m) for m in value] if field.is_repeated else message_dict(value)
            )
        elif field.name not in raw:
            shaped[field.name] = None  # an `optional` field that is not set
        elif field.enum_type is not None:
            shaped[field.name] = _enum_name(field.enum_type, raw[field.name])
        elif field.cpp_type in _64_BIT:
            shaped[field.name] = [int(v) for v in value] if field.is_repeated else int(value)
        else:
            shaped[field.name] = raw[field.name]
    return shaped


def _enum_name(enum: Any, name: str) -> str:
    # EnrollmentPolicy values are ENROLLMENT_POLICY_...: drop the type's own prefix.
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return name.removeprefix(prefix).lower()


def unified_diff(change: FileChange) -> str:
    """The change as `diff -u` would show it (/dev/null for a file that is not there)."""
    return "".join(
        difflib.unified_diff(
            _lines(change.old or ""),
            _lines(change.new or ""),
            change.path if change.old is not None else "/dev/null",
            change.path if change.new is not None else "/dev/null",
        )
    )


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def _json(data: Any, out: TextIO, *, indent: int | None = 2) -> None:
    print(json.dumps(data, indent=indent), file=out)


def _pairs(pairs: Sequence[tuple[str, Any]], out: TextIO) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        if isinstance(value, bool):
            value = str(value).lower()
        print(f"{key:<{width}}  {value}", file=out)


@functools.singledispatch
def render(result: Result, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    raise TypeError(f"no rendering for {type(result).__name__}")


@render.register
def _(result: ConfigShown, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    data = message_dict(result.config)
    if as_json:
        _json(data, out)
        return
    ssh = data.pop("services")["ssh"]
    effective = data.pop("effective_issuer")
    data["issuer"] = data["issuer"] or f"{effective} (daemon default)"
    for key in ("exempt_networks", "exempt_groups", "required_groups"):
        data[key] = ",".join(data[key]) or "none"
    data["enrollment_deadline"] = (
        f"{data['enrollment_deadline']} (end of the day, UTC)"
        if data["enrollment_deadline"]
        else "none"
    )
    pairs = list(data.items())
    pairs.insert(2, ("services.ssh", ssh))
    _pairs(pairs, out)


@render.register
def _(result: ConfigUpdated, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _json(message_dict(result.config), out)
    else:
        print("updated", file=out)


@render.register
def _(result: UriShown, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        if result.user is not None:
            _json(message_dict(result.user), out)
        else:
            _json({"provisioning_uri": result.uri}, out)
        return
    print(result.uri, file=out)
    if result.qr_file is None:
        qr.emit(result.uri, result.qr, out)
    else:
        print(f"QR code written to {result.qr_file} (mode 0600: it holds the secret)", file=err)
    if result.user is not None and result.user.pending_expires_in:
        minutes = max(1, result.user.pending_expires_in // 60)
        before = (
            "the current secret keeps working until then; "
            if (result.user.twofactor_auth_configured)
            else ""
        )
        print(
            f"pending: confirm within {minutes} minutes with a code from it: otpgate confirm "
            f"{result.user.username} CODE ({before}renew-secret --now replaces at once)",
            file=err,
        )


_REASONS = {
    "replayed": "replayed (already used; wait for the next code)",
    "not_enrolled": "not enrolled",
    "invalid_or_replayed": f"not accepted: {CODE_NOT_ACCEPTED}",
}


@render.register
def _(result: Verified, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    verdict: Verification = result.verification
    if as_json:
        data = dataclasses.asdict(verdict)
        if verdict.recovery_codes_left is None:  # said only when a recovery code was used
            del data["recovery_codes_left"]
        _json(data, out, indent=None)
        return
    print("true" if verdict.valid else "false", file=out)
    if verdict.result == "locked":
        if verdict.locked_seconds:
            print(f"account locked for {verdict.locked_seconds} s", file=err)
        else:
            print("account locked after too many wrong codes", file=err)
    elif verdict.result in _REASONS:
        print(f"reason: {_REASONS[verdict.result]}", file=err)
    if verdict.recovery_codes_left is not None:
        print(f"recovery code accepted: {verdict.recovery_codes_left} left", file=err)


@render.register
def _(result: SecretUnset, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _json(message_dict(result.user), out)
    else:
        print(f"2FA secret of {result.user.username} removed", file=out)


@render.register
def _(result: Confirmed, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _json(message_dict(result.user), out)
    else:
        name = result.user.username
        print(f"new 2FA secret of {name} confirmed (any earlier one no longer works)", file=out)
        print(f"{name} has no recovery codes now: otpgate recovery-codes {name}", file=err)


@render.register
def _(result: Imported, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        data = {
            "dry_run": result.dry_run,
            "usernames": result.usernames,
            "accounts": result.accounts,
            "skipped": result.skipped,
            "notes": result.notes,
        }
        _json(data, out)
    else:
        verb = "would import" if result.dry_run else "imported"
        for line in result.accounts:
            print(f"{verb} {line}", file=out)
        for line in result.skipped:
            print(line, file=out)
        for note in result.notes:
            print(f"note: {note}", file=err)
    if not result.dry_run:
        print(
            f"{result.path} still holds the secrets in plain text: remove it now "
            "(otpgate never removes it)",
            file=err,
        )


@render.register
def _(result: AuditShown, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _json([message_dict(e) for e in result.events], out)
        return
    import time

    if not result.events:
        print("no events match", file=err)
    for e in result.events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        who = " ".join(part for part in (e.path, e.caller) if part) or "otpgated"
        line = f"{when}  {e.host}  {who}  {e.event}  {e.username or '-'}  {e.detail}"
        print(line.rstrip(), file=out)
    if result.more:
        print(f"(the newest {len(result.events)} shown: --limit N for more)", file=err)


@render.register
def _(result: KeyRotated, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    reply = result.reply
    if as_json:
        _json(message_dict(reply), out)
        return
    if not reply.old_key_loaded and not reply.old_key_ids:
        print(
            f"nothing to rotate: otpgated holds only its key {reply.key_id}; restart it with "
            "the new key as key_file and this one as old_key_file first",
            file=out,
        )
        return
    print(f"re-sealed {reply.resealed} under key {reply.key_id}", file=out)
    if reply.old_key_ids:
        print(
            f"still sealed with {', '.join(reply.old_key_ids)}: run rotate-key again; keep the "
            "old key until it says done",
            file=out,
        )
    else:
        print(
            "done: nothing needs the old key any more; put the new key where key_file "
            "points by default, drop old_key_file, restart otpgated",
            file=out,
        )


@render.register
def _(result: Unlocked, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _json(message_dict(result.user), out)
    else:
        print(f"{result.user.username} unlocked", file=out)


@render.register
def _(result: RecoveryCodesMade, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _json({"username": result.username, "codes": result.codes}, out)
        return
    for code in result.codes:
        print(code, file=out)
    print(
        f"{len(result.codes)} recovery codes for {result.username}: keep them apart from "
        "the phone; each works once instead of a code; they are not shown again, and any "
        "earlier set no longer works",
        file=err,
    )


@render.register
def _(result: UserShown, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    data = message_dict(result.user)
    if as_json:
        if result.access is not None:  # told to admins only
            data["access"] = message_dict(result.access)
        _json(data, out)
        return
    twofactor = data.pop("twofactor_config")
    data["groups"] = ",".join(str(g) for g in data["groups"])
    if data["locked_seconds"]:
        # The store counts wrong codes afresh once a lock begins: a bare 0 beside the
        # lock would read as "no wrong codes".
        data["failed_attempts"] = f"{data['failed_attempts']} (counted afresh since the lock)"
        data["locked_seconds"] = f"{data['locked_seconds']} (locked after too many wrong codes)"
    enrolled = data["twofactor_auth_configured"]
    data["twofactor_interval"] = twofactor["interval"] if enrolled else "none (not enrolled)"
    data["twofactor_otp_digits"] = twofactor["otp_digits"] if enrolled else "none (not enrolled)"
    if result.access is not None:
        data["access"] = result.access.explanation
        data["access_groups"] = _access_groups(result.access)
    _pairs(list(data.items()), out)


def _access_groups(access: pb.ExplainAccessResponse) -> str:
    """Whether the group rules apply to the account, whatever the address."""
    parts = []
    if access.required_groups:
        parts.append(f"required group {','.join(access.required_groups)}: always asked")
    if access.exempt_groups:
        overridden = " (overridden)" if access.required_groups else ""
        parts.append(f"exempt group {','.join(access.exempt_groups)}{overridden}")
    return "; ".join(parts) or "in no exempt or required group"


@render.register
def _(result: UsersListed, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _json([message_dict(u) for u in result.users], out)
        return
    rows = [("USERNAME", "UID", "DIGITS", "INTERVAL", "FAILED", "LOCKED_S")]
    rows += [_list_row(u) for u in result.users]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.ljust(width) for cell, width in cells).rstrip(), file=out)


def _list_row(user: pb.UserEntry) -> tuple[str, str, str, str, str, str]:
    twofactor = user.twofactor_config
    return (
        user.username,
        str(user.uid),
        str(twofactor.otp_digits),
        str(twofactor.interval),
        str(user.failed_attempts),
        str(user.locked_seconds),
    )


@render.register
def _(result: DoctorReport, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        problems = [dataclasses.asdict(p) for p in result.problems]
        _json({"ok": not result.problems, "flow": result.flow, "problems": problems}, out)
        return
    for problem in result.problems:
        print(f"{problem.area}: {problem.message}" if problem.area else problem.message, file=out)
    if not result.problems:
        print(f"ok: no problems found (flow: {result.flow})", file=out)


@render.register
def _(result: SshWired, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    report = result.report
    if as_json:
        changes = [
            {"action": c.action, "path": c.path, "diff": unified_diff(c)} for c in report.changes
        ]
        _json({"dry_run": report.dry_run, "changes": changes, "reloaded": report.reloaded}, out)
        return
    if not report.dry_run:
        for line in report:
            print(line, file=out)
        return
    # A dry run shows what would be written: each file's diff against today's.
    print(report[0], file=out)
    for change in report.changes:
        diff = unified_diff(change)
        print(f"{change.action} {change.path}" + ("" if diff else " (no change)"), file=out)
        out.write(diff)
