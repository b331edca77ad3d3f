"""A family of backbones of one's own, in this file alone: registered through the public door and run through the
whole product (features -> fit-head -> report -> predict -> export), without touching the package."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import flowerfeat
from flowerfeat import backbones
from flowerfeat.weights import WeightsInfo


class Pixels(backbones.Backbone):
    """A 'model' that averages the image down to side x side pixels: no weights, (B, 3, 32, 32) -> (B, 3 side^2)."""

    family = "toy"

    def __init__(self, side: int):
        self.side, self.name = side, f"toy:pixels{side}"

    def cuts(self):
        return {"pooled": backbones.Cut("pooled", 3 * self.side**2, 0.1, "the image averaged down")}

    def resolve_weights(self, weights):
        return WeightsInfo("none", "none")  # nothing to learn, nothing to load

    def preprocessing(self, weights):
        return backbones.Preprocessing((40,), (32,), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")

    def load(self, weights, cut):
        return nn.Sequential(nn.AdaptiveAvgPool2d(self.side), nn.Flatten())


class Toys(backbones.Family):
    prefix, listed = "toy:", True

    def names(self):
        return ["pixels2", "pixels4"]

    def get(self, name):
        return Pixels(int(name.removeprefix("pixels"))) if name in self.names() else None

    def suggested(self):
        return ["pixels2"]


@pytest.fixture
def toys():
    backbones.register_family(Toys())
    yield
    backbones.unregister_family("toy:")


def test_a_family_of_ones_own_runs_the_whole_product(toys, folder, tmp_path):
    assert list(backbones.list_models("toy:*")) == ["toy:pixels2", "toy:pixels4"]
    assert "toy:pixels2" in backbones.suggested_models()  # compare tries it unasked
    files = flowerfeat.extract(folder, tmp_path / "f", model="toy:pixels4", weights="none", workers=0)
    assert files["train"].parent.name == "toy-pixels4-pooled-random"  # the model names its own cache
    head = flowerfeat.fit_head(files["train"], epochs=2)
    assert head.model == "toy:pixels4" and head.metrics["dropout"] == 0.1  # the cut's own dropout
    path = head.save(tmp_path / "head.pt")
    ev = flowerfeat.evaluate(path, files["test"])
    assert ev.total == 9 and ev.accuracy > 0.5  # the classes' colours survive the averaging
    test = flowerfeat.load_features(files["test"])
    images = [test.meta["data_root"] + "/" + p for p in test.paths]
    clf = flowerfeat.Classifier.load(path)
    want = np.array([[dict(p.top)[c] for c in clf.classes] for p in clf.predict(images, top_k=3)])
    np.testing.assert_allclose(want, head.predict_proba(test.X), atol=1e-5)  # the very trunk of the features
    x = torch.stack([clf._transform(flowerfeat.data.load_image(p)) for p in images])
    flowerfeat.export_model(path, tmp_path / "m.pt2")
    got = torch.export.load(tmp_path / "m.pt2").module()(x).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    flowerfeat.export_model(path, tmp_path / "m.onnx")
    import onnxruntime

    got = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_unknown_member_names_the_close_ones(toys):
    with pytest.raises(flowerfeat.FlowerfeatError, match="unknown model 'toy:pixel4'; close matches: toy:pixels4"):
        backbones.get_backbone("toy:pixel4")
