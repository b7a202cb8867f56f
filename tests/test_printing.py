"""lora_edu.teaching.printing.steady: a format is accepted only if its digits hold over the spread."""

import pytest

from lora_edu import steady


def test_a_figure_far_from_a_rounding_boundary_prints_as_format_does():
    assert steady(1.1048, ".1f", rel=1e-3) == "1.1"
    assert steady(0.02791, ".3f", rel=1e-2) == "0.028"
    assert steady(3.59e-6, ".0e", rel=0.02) == "4e-06"
    assert steady(-2.5, ".1f", rel=0.0) == "-2.5"  # rel = 0: no spread, any format


@pytest.mark.parametrize("value, spec, rel", [
    (1.1048, ".2f", 1e-3),  # 1.1037 .. 1.1059 straddles 1.105
    (3.56e-6, ".1e", 0.01),  # 3.52e-6 .. 3.60e-6 straddles 3.55e-6
    (0.02049, ".1%", 0.01),  # 2.03% .. 2.07% straddles 2.05%
    (-0.995, ".2f", 1e-2),  # negative values round on both sides too
])
def test_a_format_that_another_cpu_could_flip_is_refused(value, spec, rel):
    with pytest.raises(ValueError, match="fewer digits"):
        steady(value, spec, rel)


@pytest.mark.parametrize("value, rel, match", [(float("nan"), 0.01, "not finite"), (1.0, 1.5, "relative spread"),
                                                (1.0, -0.1, "relative spread")])
def test_bad_input(value, rel, match):
    with pytest.raises(ValueError, match=match):
        steady(value, ".2f", rel)


def test_writing_outputs_asks_for_three_spreads(monkeypatch):
    # 1.1048 is 1.8e-4 (relative) below 1.105, where ".2f" turns from "1.10" to "1.11"
    monkeypatch.delenv("LORA_EDU_WRITING_OUTPUTS", raising=False)
    assert steady(1.1048, ".2f", rel=1e-4) == "1.10"  # one spread, 1e-4, stays below 1.105
    monkeypatch.setenv("LORA_EDU_WRITING_OUTPUTS", "1")
    with pytest.raises(ValueError, match="times 3 while writing outputs"):
        steady(1.1048, ".2f", rel=1e-4)  # three spreads, 3e-4, reach it
    monkeypatch.setenv("LORA_EDU_WRITING_OUTPUTS", "0")
    assert steady(1.1048, ".2f", rel=1e-4) == "1.10"


def test_a_figure_stored_three_spreads_from_a_boundary_passes_after_moving_one_spread(monkeypatch):
    rel = 0.01
    monkeypatch.setenv("LORA_EDU_WRITING_OUTPUTS", "1")
    with pytest.raises(ValueError):
        steady(1.03, ".1f", rel)  # 1.03 * 1.03 = 1.061 reads "1.1": too close to store
    stored = 1.01
    assert steady(stored, ".1f", rel) == "1.0"  # 0.98 .. 1.04 all read "1.0"
    monkeypatch.delenv("LORA_EDU_WRITING_OUTPUTS")
    for moved in (stored * (1 - rel), stored * (1 + rel)):  # on a reader's CPU, one spread away
        assert steady(moved, ".1f", rel) == "1.0"
