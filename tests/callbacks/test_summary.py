"""The summary's text, Lightning-free: where to look, and the metrics at the first and last validation."""

from callbacks.summary import metrics_table, summary_text


def test_metrics_table_compares_first_and_last_validation():
    history = {60: {"dino": 0.5, "pres": 0.2}, 0: {"dino": 0.1, "pres": 0.3}, 120: {"dino": 0.6, "pres": float("nan")}}
    assert metrics_table(history) == [
        "val/*     step 0  step 120  change",
        "val/dino  0.100   0.600     +0.500 (higher is better)",
        "val/pres  0.300   n/a",
    ]


def test_one_validation_has_no_change_column():
    assert metrics_table({0: {"dino": 0.1}}) == ["val/*     step 0", "val/dino  0.100"]
    assert metrics_table({}) == []


def test_summary_lists_places_then_the_table():
    text = summary_text(4, [("run directory", "runs/x"), ("export", "runs/x/export")], {0: {"dino": 0.0}})
    assert text.splitlines() == [
        "fit finished at step 4. Where to look:",
        "  run directory  runs/x",
        "  export         runs/x/export",
        "Validation metrics, first and last validation:",
        "  val/*     step 0",
        "  val/dino  0.000",
    ]
