"""require_tool (conftest.py): a missing optional tool skips a test, and fails it in CI."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REQUIRE_ALL_VAR, require_tool

HOW = "apt-get install frobnicator"


@pytest.mark.parametrize("value", [None, "", "0"])
def test_missing_tool_skips_by_default(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(REQUIRE_ALL_VAR, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_ALL_VAR, value)
    with pytest.raises(pytest.skip.Exception) as info:
        require_tool("frobnicator", HOW)
    assert str(info.value) == f"frobnicator not available: {HOW}"


def test_missing_tool_fails_when_all_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ALL_VAR, "1")
    with pytest.raises(pytest.fail.Exception) as info:
        require_tool("frobnicator", HOW)
    assert str(info.value) == (
        f"frobnicator not available: {HOW} ({REQUIRE_ALL_VAR}=1 requires every optional tool)"
    )


def test_skip_and_failure_as_pytest_reports_them(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Through pytest itself: the skip reason, and the failure, name the tool."""
    pytester.makepyfile(
        f"""
        from conftest import require_tool

        def test_needs_frobnicator():
            require_tool("frobnicator", {HOW!r})
        """
    )
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    monkeypatch.delenv(REQUIRE_ALL_VAR, raising=False)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED*frobnicator not available: {HOW}"])

    monkeypatch.setenv(REQUIRE_ALL_VAR, "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*frobnicator not available: {HOW} ({REQUIRE_ALL_VAR}=1*"])
