"""The stage output activations against their formulas on random logits (issue 19): sigmoid / softmax, the
ensemble's logits of the mean probability, and the positive class of a multi-class head."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumomap.labels import CLASSES, POSITIVE_CLASS
from pneumomap.stages import create_stage, tiny_config
from pneumomap.stages.classifier import ScoreStage
from properties import FAST as PROPERTY

FAST = settings(PROPERTY, max_examples=40)


def tiny(**overrides):
    return create_stage("classifier", tiny_config("classifier", **overrides)).eval()


@pytest.fixture(scope="module")
def binary():
    return tiny()


@pytest.fixture(scope="module")
def three():
    return tiny(n_classes=3, class_names=list(CLASSES))


def test_activation_is_sigmoid_for_one_output_and_softmax_over_classes(binary):
    logits = torch.tensor([[-2.0], [0.5], [3.0]], dtype=torch.float16)
    p = binary.activation(logits)
    assert p.dtype == torch.float32 and torch.allclose(p, 1 / (1 + torch.exp(-logits.float())))
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    p = binary.activation(logits)
    expected = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    assert torch.allclose(p, expected) and torch.allclose(p.sum(dim=1), torch.ones(2))


@FAST
@given(n_members=st.integers(1, 4), n_outputs=st.sampled_from([1, 3]), seed=st.integers(0, 2**31))
def test_ensemble_logits_are_the_logits_of_the_mean_probability(n_members, n_outputs, seed, binary):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(5, n_outputs, generator=g) * 4 for _ in range(n_members)]
    combined = ScoreStage.ensemble_logits(logits)
    if n_members == 1:
        assert combined is logits[0]
        return
    probability = [binary.activation(l) for l in logits]
    mean = torch.stack(probability).mean(0)
    torch.testing.assert_close(binary.activation(combined), mean, rtol=1e-5, atol=1e-6)
    assert combined.shape == (5, n_outputs)
    if n_outputs > 1:  # log(mean softmax) itself: log-probabilities, as a loss on log-probabilities reads them
        torch.testing.assert_close(combined, torch.log(mean), rtol=1e-4, atol=1e-5)


def test_class_index_and_probability_of_the_positive_class(three, binary):
    assert three.class_index() == three.class_index(POSITIVE_CLASS) == CLASSES.index(POSITIVE_CLASS)
    assert three.class_index("Normal") == CLASSES.index("Normal")
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert torch.equal(three.probability_of(probs), probs[:, CLASSES.index(POSITIVE_CLASS)])
    assert torch.equal(three.probability_of(probs, "Normal"), probs[:, CLASSES.index("Normal")])
    assert binary.class_index("Normal") is None and binary.probability_of(probs[:, 0], "Normal") is not None
    assert torch.equal(binary.probability_of(probs[:, 0]), probs[:, 0])


def test_class_index_errors_name_the_class_and_the_fix():
    with pytest.raises(ValueError) as error:
        tiny(n_classes=2, class_names=["covid", "normal"]).class_index()
    assert str(error.value) == ("class 'Lung Opacity' (the node's params.positive) is not among the checkpoint's "
                                "classes ['covid', 'normal']")
    with pytest.raises(ValueError) as error:
        tiny(n_classes=4).class_index("Normal")
    assert str(error.value) == ("a 4-class head without class_names: cannot tell which output is 'Normal'; add "
                                "class_names (one per output, in order) to its config.yaml")
