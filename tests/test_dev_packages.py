"""[dev] packages used as test oracles: skipped when absent on a developer's machine, a failure when CI=true (the suite
must not pass in CI by skipping what it was meant to check)."""

import pytest

MISSING = "sammed3d_jax_no_such_dev_package"


@pytest.mark.parametrize("ci", ["true", "TRUE", " true "])
def test_missing_dev_package_fails_in_ci(monkeypatch, dev_package, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(ModuleNotFoundError, match=MISSING):
        dev_package(MISSING)


@pytest.mark.parametrize("ci", [None, "", "false", "1"])
def test_missing_dev_package_skips_elsewhere(monkeypatch, dev_package, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        dev_package(MISSING)


def test_present_dev_package_is_imported(monkeypatch, dev_package):
    monkeypatch.setenv("CI", "true")
    assert dev_package("pytest") is pytest
