"""core.recovery: the codes' shape, what counts as one, and the keyed hash."""

from __future__ import annotations

from otpgate.core import recovery


def test_codes_are_ten_distinct_groups_of_base32() -> None:
    codes = recovery.generate()
    assert len(codes) == 10 == len(set(codes))
    for code in codes:
        groups = code.split("-")
        assert [len(g) for g in groups] == [4, 4, 4]
        assert set("".join(groups)) <= set(recovery.ALPHABET)


def test_normalise_accepts_what_people_type_and_nothing_else() -> None:
    assert recovery.normalise("k7qm-2xhw-ra4d") == "k7qm2xhwra4d"
    assert recovery.normalise(" K7QM 2XHW RA4D ") == "k7qm2xhwra4d"
    for not_a_code in ("123456", "12345678", "k7qm-2xhw-ra4", "k7qm-2xhw-ra4d1", "k7qm-2xhw-ra40",
                       "k7qm-2xhw-ra4é", ""):  # fmt: skip
        assert recovery.normalise(not_a_code) is None, not_a_code


def test_the_mac_binds_key_account_and_code() -> None:
    key, other_key = b"k" * 32, b"q" * 32
    base = recovery.mac(key, "alice", 1000, "k7qm2xhwra4d")
    assert len(base) == 32
    assert base == recovery.mac(key, "alice", 1000, "k7qm2xhwra4d")
    assert base != recovery.mac(other_key, "alice", 1000, "k7qm2xhwra4d")
    assert base != recovery.mac(key, "bob", 1000, "k7qm2xhwra4d")
    assert base != recovery.mac(key, "alice", 1001, "k7qm2xhwra4d")
    assert base != recovery.mac(key, "alice", 1000, "k7qm2xhwra4e")
