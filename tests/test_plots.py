"""Plots: the expert activation heatmap and loss curves are real PNGs of the expected layout."""

import numpy as np
import pytest
from PIL import Image

from tasks.plots import activation_heatmap, loss_curves, read_csv_metrics


def test_activation_heatmap_writes_a_png(tmp_path):
    ratios = {"1.vision": np.linspace(0, 0.2, 40), "1.language": np.zeros(40), "3.vl": np.full(8, 0.5)}
    out = activation_heatmap(ratios, tmp_path / "sub" / "heat.png")
    img = Image.open(out)
    assert img.format == "PNG"
    w, h = img.size
    assert w > h > 100  # 40 experts wide, 3 layers tall
    with pytest.raises(ValueError, match="no MoE layer statistics"):
        activation_heatmap({}, tmp_path / "x.png")


def test_read_csv_metrics_and_curves(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/loss\n0,0,5.0,\n0,1,4.0,\n0,1,,4.5\n0,2,3.0,\n")
    cols = read_csv_metrics(csv)
    assert cols["train/loss"] == [5.0, 4.0, 3.0]
    assert cols["train/loss@step"] == [0.0, 1.0, 2.0]
    assert cols["val/loss"] == [4.5]
    out = loss_curves({"run": csv}, ["train/loss", "val/loss"], tmp_path / "c.png")
    assert Image.open(out).format == "PNG"
