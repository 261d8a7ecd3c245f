"""The live view of a federated run, driven by log lines as the site runner and the server write them."""

from __future__ import annotations

from fedseg.run.progress import FederatedProgress


class Lines:
    is_terminal = False

    def __init__(self):
        self.lines = []

    def print(self, text):
        self.lines.append(text)


def _progress(tmp_path, sites, rounds):
    logs = {s: tmp_path / f"{s}.log" for s in sites}
    server = tmp_path / "server.log"
    console = Lines()
    progress = FederatedProgress(console, list(sites), lambda: logs, lambda: server)

    def site_round(site, number, dice=None, failed=False):
        with logs[site].open("a") as f:
            f.write(f"[fedseg] round {number}/{rounds} {site}: started (validating the global model, then training)\n")
            if failed:
                f.write(f"[fedseg] round {number}/{rounds} {site}: FAILED (FaultDrillError, see this site's log)\n")
            else:
                f.write(f"[fedseg] round {number}/{rounds} {site}: global val_dice={dice:.4f} train_loss=1.0 cases=3 0.50s\n")

    def server_round(number, answered, problems=""):
        with server.open("a") as f:
            f.write(f"x - ResilientFedAvg - INFO - Round {number}: {answered}/{len(sites)} sites answered"
                    + (f"; {problems}" if problems else "") + "\n")

    return progress, console, site_round, server_round


def test_a_finished_round_prints_every_sites_val_dice_and_a_failed_site_says_why(tmp_path):
    progress, console, site_round, server_round = _progress(tmp_path, ["a", "b"], rounds=3)
    site_round("a", 1, 0.1)
    site_round("b", 1, 0.2)
    server_round(1, 2)
    progress._read()
    assert console.lines[-1].startswith("round 1/3  val_dice of the global model: a 0.100  b 0.200")
    assert "left" not in console.lines[-1]  # no ETA from the first round alone (it pays the start-up)
    site_round("a", 2, 0.3)
    site_round("b", 2, failed=True)
    server_round(2, 1, "failed: b")
    progress._read()
    assert "a 0.300  b failed (FaultDrillError)" in console.lines[-1] and "left" in console.lines[-1]


def test_a_long_run_prints_about_ten_round_lines(tmp_path):
    progress, console, site_round, server_round = _progress(tmp_path, ["a"], rounds=30)
    for number in range(1, 31):
        site_round("a", number, number / 100)
        server_round(number, 1)
        progress._read()
    printed = [int(line.split()[1].split("/")[0]) for line in console.lines]
    assert printed == [1, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert len(progress.state.finished) == 30  # every round counted for the ETA and the display


def test_a_site_line_written_after_the_server_closed_the_round_still_makes_its_line(tmp_path, monkeypatch):
    from fedseg.run import progress as progress_module

    progress, console, site_round, server_round = _progress(tmp_path, ["a", "b"], rounds=2)
    site_round("a", 1, 0.1)
    server_round(1, 2)  # site b's update arrived; its own line is not written yet
    progress._read()
    assert console.lines == []  # the round's line waits for b's value
    site_round("b", 1, 0.2)
    progress._read()
    assert console.lines[-1].startswith("round 1/2  val_dice of the global model: a 0.100  b 0.200")
    assert progress.state.site("b").state == "waiting"  # the late line does not mark the next round done
    monkeypatch.setattr(progress_module, "LATE_LINE_GRACE", 0.0)
    site_round("a", 2, 0.3)
    server_round(2, 2)  # b never writes its line of round 2: after the grace the line prints without it
    progress._read()
    assert "a 0.300  b no report" in console.lines[-1]
