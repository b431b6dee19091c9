"""The demo path end to end through the real CLI: accepted, already_redeemed, malformed."""

from conftest import read_json_lines


def test_scan_twice_then_junk_gives_accepted_already_redeemed_malformed(loaded_box):
    # debounce is 2 s, so the repeat is sent as a different "scanner" line later:
    # here we use the CLI twice to keep the test free of timing.
    first = loaded_box.cli("run", "--json", input=b"DEMO-0001\n")
    assert first.returncode == 0, first.stderr.decode()
    second = loaded_box.cli("run", "--json", input=b"DEMO-0001\nju\x01nk\n")
    assert second.returncode == 0, second.stderr.decode()
    verdicts = read_json_lines(first.stdout) + read_json_lines(second.stdout)
    assert [v["verdict"] for v in verdicts] == ["accepted", "rejected", "rejected"]
    assert verdicts[1]["reason"] == "already_redeemed"
    assert verdicts[2]["reason"] == "malformed"
    assert [v["box_seq"] for v in verdicts] == [1, 2, 3]
    assert "DEMO-0001" not in (first.stdout + second.stdout + first.stderr + second.stderr).decode()
