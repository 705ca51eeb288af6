import random

from mqvpn.client import _authority, backoff_delays


def test_backoff_doubles_from_5_to_60_with_jitter():
    delays = backoff_delays(5.0, rng=random.Random(1))
    got = [next(delays) for _ in range(8)]
    nominal = [5, 10, 20, 40, 60, 60, 60, 60]
    for d, n in zip(got, nominal):
        assert 0.75 * n <= d <= 1.25 * n
    assert len({round(d, 6) for d in got}) == len(got)  # jittered: no two reconnects in lockstep


def test_authority_brackets_ipv6():
    assert _authority(("2001:db8::1", 443)) == "[2001:db8::1]:443"
    assert _authority(("[2001:db8::1]", 8443)) == "[2001:db8::1]:8443"
    assert _authority(("vpn.example.com", 443)) == "vpn.example.com:443"
