"""Which commit a benchmark run names (fastattn.perf.device.git_commit)."""

from fastattn.perf import device


def test_an_explicit_commit_overrides_the_checkouts_git(monkeypatch):
    # A lent GPU machine's copy can carry stale git metadata: the declared commit wins.
    monkeypatch.setenv("FASTATTN_COMMIT", "01f7466")
    assert device.git_commit() == "01f7466"


def test_without_one_the_checkouts_head_is_named(monkeypatch):
    monkeypatch.delenv("FASTATTN_COMMIT", raising=False)
    commit = device.git_commit()
    assert commit == "unknown" or len(commit) == 40
