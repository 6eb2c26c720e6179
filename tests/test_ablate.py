"""The ablation driver: every variant trains at the same tiny budget; table and plot are written."""
import os
import sys

import kernels
from maskrcnn_fast.ablate import VARIANTS, ablate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny  # noqa: E402


def test_ablate_runs_every_variant_and_writes_table_and_plot(tmp_path):
    with kernels.use_backend("torch"):
        rows = ablate(tiny(tmp_path, iters=1, val_images=1))
    assert [r["name"] for r in rows] == [name for name, _ in VARIANTS]
    table = (tmp_path / "ablation.md").read_text()
    for comparison in ("RoIAlign vs RoIPool", "sigmoid vs softmax", "FCN vs MLP mask head"):
        assert comparison in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 2 + 6  # header, rule, 3 x (baseline, variant)
    assert (tmp_path / "ablation.png").stat().st_size > 0
    for name in ("baseline", "roipool", "softmax_masks", "mlp_mask_head"):
        assert (tmp_path / name / "metrics.json").exists()
