"""`split-link` against the kernel's `tbf`, across two hosts: the same transfer at the same rate.

tests/test_link.py holds `split-link` to its set rate on loopback, measured by the relay's own
clock and sockets. Here the yardstick is the kernel: two hosts (network namespaces on a bridge,
tests/netns.py), a TCP transfer from the edge to a sink on the cloud's address, once through a
`split-link` process on the edge and once straight, shaped by a `tbf` qdisc on the edge's eth0 at
the same rate (benchmarks/link_vs_tbf.py, which prints the same comparison at several rates). The
two must deliver within 10% of each other, the issue's bound.

What they are expected to differ by: tbf counts every byte of a frame (Ethernet, IP and TCP
headers, 66 of a full frame's 1514 with TCP timestamps), split-link counts payload, so at the same
set rate tbf delivers 1448/1514 = 0.956 of split-link's payload rate. Each is also held to 10% of
what it should deliver on its own: split-link the set rate, tbf the set rate's payload share.
The rate is low (4 Mbit/s, 3 MB: about 6 s a transfer) and the sink reads the kernel's byte count
with the clock, so that a loaded CPU does not bend the measurement; the relay delivers by an ideal
clock (deploy/link.py), and tbf's bucket holds 200 ms of the rate, so that a late kernel send path
does not cost it rate (benchmarks/link_vs_tbf.py, `compare`, says what a 16 KB bucket lost here).

Needs root and iproute2's `ip` and `tc`: skipped elsewhere, with the reason.
"""

from __future__ import annotations

import shutil

import pytest

from benchmarks.link_vs_tbf import ADDRESSES, compare
from netns import hosts_or_skip

RATE_MBPS, MEGABYTES = 4.0, 3.0


@pytest.fixture
def hosts(tmp_path):
    tc = "" if shutil.which("tc") else "iproute2's `tc` is not installed"
    with hosts_or_skip(ADDRESSES, tmp_path, prefix="slk", reason=tc) as made:
        yield made


@pytest.mark.slow
def test_split_link_and_tbf_deliver_within_10_percent_of_each_other_across_two_hosts(hosts):
    row = compare(hosts["edge"], hosts["cloud"], RATE_MBPS, MEGABYTES)
    assert abs(row["ratio"] - 1) <= 0.10, row
    assert abs(row["split_link_mbps"] / RATE_MBPS - 1) <= 0.10, row
    assert abs(row["tbf_mbps"] / (RATE_MBPS * row["tbf_payload_share"]) - 1) <= 0.10, row
