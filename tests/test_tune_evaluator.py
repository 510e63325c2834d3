"""The tuner's evaluator (histograms, lazy maps, forked workers) against the definition: every image's map
through `runner.postprocess`, scored by the metric, for many thresholds; and the whole search equal."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pneumomap import metrics
from pneumomap.infer import ops, runner, spec, tune
from pneumomap.infer.tune import evaluator as ev
from pneumomap.infer.tune import parallel
from pneumomap.synth import generate
from pneumomap.truth import load_truth


class Plain(ev.BaseEvaluator):
    """The definition of the tuned metric, with nothing memoised: postprocess, then the metric of the map."""

    def __init__(self, pipeline, stored, codes, metric):
        self.pipeline, self.stored, self.codes, self.map_metric = pipeline, stored, codes, metric

    @property
    def n_images(self) -> int:
        return len(self.stored)

    def losses_of(self, candidates, indices=None, progress=None):
        chosen = range(self.n_images) if indices is None else indices
        rows = []
        for thresholds in candidates:
            pipeline = self.pipeline.with_thresholds(thresholds)
            rows.append([self.map_metric.loss(runner.postprocess(pipeline, self.stored[i])[pipeline.outputs.map],
                                              self.codes[i]) for i in chosen])
        return np.array(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pipeline) -> dict:
    """36 phantoms, the tiny pipeline run once ungated; eager and lazy stored outputs and the truth codes."""
    root = tmp_path_factory.mktemp("evaluator")
    generate(root / "rsna", 36, seed=5, size=64)
    pipeline = spec.load(tiny_pipeline(root / "pipe"))
    truth = load_truth(root / "rsna", split=None)
    paths = [truth.image_path(pid) for pid in truth.ids]
    options = runner.RunOptions(device="cpu", workers=0, progress=False, ungated=True)
    lazy, _ = tune.stored_outputs(pipeline, paths, root / "work", options)
    eager = runner.load_outputs(pipeline, root / "work", paths, options)
    codes = [truth.codes(s["image_id"], (s["image"].height, s["image"].width)) for s in eager]
    return {"pipeline": pipeline, "lazy": lazy, "eager": eager, "codes": codes}


def _candidates(pipeline, n: int, seed: int) -> list[dict]:
    """Random threshold blocks over the tuned axes (the gate low enough that maps matter)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(n):
        block = copy.deepcopy(pipeline.thresholds)
        block["classifier"] = float(rng.uniform(0, 0.6))
        for axis in tune.AXES:
            if tune.has_path(block, axis.path):
                block = tune.with_value(block, axis.path, rng.choice(axis.grid).item())
        low, high = sorted((block["clip"]["low"], block["clip"]["high"]))
        block["clip"].update(low=low, high=high)
        blocks.append(block)
    return blocks


def test_summaries_skip_the_mask_of_the_same_lungs_only(setup, monkeypatch):
    import dataclasses

    calls = []
    mask = ops.OPS["mask"]
    monkeypatch.setitem(ops.OPS, "mask", dataclasses.replace(mask, fn=lambda *a, **k: calls.append(1) or mask.fn(*a, **k)))
    metric = metrics.map_metric("midrc")
    blocks = _candidates(setup["pipeline"], 6, seed=9)
    expected = Plain(setup["pipeline"], setup["eager"], setup["codes"], metric).losses_of(blocks)
    assert calls  # the definition masks
    calls.clear()
    fast = ev.Evaluator(setup["pipeline"], setup["lazy"], lambda i: setup["codes"][i], metric)
    assert np.array_equal(fast.losses_of(blocks), expected) and not calls  # the same losses, no mask computed
    plan = ev._Plan(setup["pipeline"])
    final = plan.final
    masked = plan.pipeline.nodes[final.inputs[0]]
    keys = fast.keys(plan, 0)
    assert ev.Evaluator._summarised(plan, keys, final) == masked.inputs[0]
    from types import SimpleNamespace

    other = dataclasses.replace(masked, inputs=[masked.inputs[0], "other_lungs"])  # the mask's lungs not the clip's
    other_plan = SimpleNamespace(pipeline=SimpleNamespace(nodes={**plan.pipeline.nodes, masked.name: other}))
    assert ev.Evaluator._summarised(other_plan, {**keys, "other_lungs": -1}, final) == masked.name
    assert ev.Evaluator._summarised(other_plan, {**keys, "other_lungs": keys[masked.inputs[1]]}, final) \
        == masked.inputs[0]  # another node, but the same lungs value: skipped
    monkeypatch.setitem(ops.OPS, final.kind, dataclasses.replace(ops.OPS[final.kind], summary_lungs=None))
    assert ev.Evaluator._summarised(plan, keys, final) == masked.name  # a summary that reads every pixel


@pytest.mark.parametrize("name", ["midrc", "balanced"])
def test_fast_losses_equal_the_definition(setup, name):
    metric = metrics.map_metric(name, 2.0, 0.5)
    plain = Plain(setup["pipeline"], setup["eager"], setup["codes"], metric)
    fast = ev.Evaluator(setup["pipeline"], setup["lazy"], lambda i: setup["codes"][i], metric, budget=1 << 16)
    blocks = _candidates(setup["pipeline"], 12, seed=len(name))
    expected = plain.losses_of(blocks)
    assert np.array_equal(fast.losses_of(blocks), expected)  # the same sums: the same numbers
    assert np.array_equal(fast.losses_of(blocks[::-1])[::-1], expected)  # memoised, any order
    assert len(set(expected.ravel().tolist())) > 20  # the candidates do change the maps


def test_lazy_outputs_hold_no_map_until_asked(setup):
    lazy, eager = setup["lazy"][0], setup["eager"][0]
    pipeline = setup["pipeline"]
    for node in pipeline.model_nodes:
        if node.output in runner.SCALAR_OUTPUTS:
            assert lazy[node.name] == eager[node.name]
        else:
            assert isinstance(lazy[node.name], runner.Deferred)
            loaded, want = lazy[node.name].load(), eager[node.name]
            if node.kind == "lungs":
                loaded, want = loaded.split.mask, want.split.mask
            assert np.array_equal(loaded, want)


def test_final_map_equals_postprocess(setup):
    pipeline = setup["pipeline"]
    fast = ev.Evaluator(pipeline, setup["lazy"], lambda i: setup["codes"][i], metrics.map_metric("midrc"), budget=1)
    for thresholds in _candidates(pipeline, 3, seed=9):
        candidate = pipeline.with_thresholds(thresholds)
        for i in range(0, len(setup["eager"]), 5):
            expected = runner.postprocess(candidate, setup["eager"][i])[candidate.outputs.map]
            assert np.array_equal(fast.final_map(thresholds, i), expected)


def test_the_search_is_the_same_serial_parallel_and_plain(setup):
    """Coordinate descent over the definition, the fast evaluator, and two forked workers: the same path."""
    pipeline, metric = setup["pipeline"], metrics.map_metric("midrc")
    start = {**pipeline.thresholds, "classifier": 0.3}
    axes = [a for a in tune.AXES if tune.has_path(start, a.path)]
    subset = list(range(0, 36, 2))
    plain = Plain(pipeline, setup["eager"], setup["codes"], metric)
    expected = tune.coordinate_descent(plain, start, axes, rounds=2, progress=False, indices=subset)
    serial = ev.Evaluator(pipeline, setup["lazy"], lambda i: setup["codes"][i], metric)
    with parallel.ParallelEvaluator(ev.Evaluator(pipeline, setup["lazy"], lambda i: setup["codes"][i], metric), 2) as par:
        for evaluator in (serial, par):
            got = tune.coordinate_descent(evaluator, start, axes, rounds=2, progress=False, indices=subset)
            assert got[0] == expected[0] and got[1] == expected[1]
            assert {k: c.metrics for k, c in got[2].items()} == {k: c.metrics for k, c in expected[2].items()}
        seen = []
        assert np.array_equal(par.losses_of([start], progress=seen.append), serial.losses_of([start]))
        assert sum(seen) == 36


def test_a_failing_worker_raises_with_its_traceback(setup):
    pipeline = setup["pipeline"]

    def broken(i):
        raise ValueError(f"no truth for image {i}")

    with parallel.ParallelEvaluator(ev.Evaluator(pipeline, setup["lazy"], broken, metrics.map_metric("midrc")), 2) as par:
        with pytest.raises(parallel.EvaluationError, match="no truth for image"):
            par.losses_of([pipeline.thresholds])


def test_keys_of_each_kind_are_interned_apart():
    """The same key, the same id; keys of different kinds never share one, though NamedTuples with the same
    items compare equal (a choice 'whole' and a model node named 'whole')."""
    from pneumomap.infer.tune.keys import ImageKey, Known, KeyTable, ModelOutput, OpKey

    table = KeyTable()
    whole = table.known("whole")
    assert table.model("whole") != whole and table.known("whole") == whole and table.model("whole") == table.model("whole")
    assert Known("whole") == ModelOutput("whole")  # why each kind has its own table
    assert table.none == table.known(None) and table.meaning[table.none] == Known(None)
    assert table.meaning[table.image] == ImageKey() and len({table.image, table.none, whole}) == 3
    op = table.op("grown", '{"dilate": 4}', (whole, table.image))
    assert table.op("grown", '{"dilate": 4}', (whole, table.image)) == op
    assert table.meaning[op] == OpKey("grown", '{"dilate": 4}', (whole, table.image))
    assert table.op("grown", '{"dilate": 8}', (whole, table.image)) != op
    assert table.op("grown", '{"dilate": 4}', (table.image, whole)) != op
    assert [type(k) for k in table.meaning] == [ImageKey, Known, Known, ModelOutput, OpKey, OpKey, OpKey]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 254), st.integers(1, 254), st.integers(1, 254))
def test_clip_counts_are_the_counts_of_the_clipped_map(seed, a, b, outside):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(2, 30, 2))
    prob = rng.random(shape).astype(np.float32)
    prob[rng.random(shape) < 0.2] = 0.0
    prob[rng.random(shape) < 0.1] = 1.0
    lungs_mask = rng.random(shape) < 0.6

    class FixedRegions:
        def mask_at(self, shape_):
            return lungs_mask

    codes = rng.integers(0, metrics.N_CODES, shape).astype(np.uint8)
    low, high = min(a, b), max(a, b)
    expected = metrics.joint_counts(ops.clip(prob, FixedRegions(), low, high, outside), codes)
    summary = ops.clip_summary(prob, ops.clip_context(shape, FixedRegions(), codes))
    assert np.array_equal(ops.clip_counts(summary, low, high, outside), expected)


@pytest.mark.parametrize("lung_fraction, code_fraction", [(0.0, 0.5), (1.0, 0.5), (0.6, 0.0), (0.6, 1.0)])
def test_clip_counts_without_lungs_codes_or_outside(lung_fraction, code_fraction):
    # no lung pixel (an empty box), no outside pixel, every code 0 (a negative image: no code array kept)
    rng = np.random.default_rng(3)
    shape = (17, 11)
    prob = rng.random(shape).astype(np.float32)
    lungs_mask = rng.random(shape) < lung_fraction

    class FixedRegions:
        def mask_at(self, shape_):
            return lungs_mask

    codes = np.where(rng.random(shape) < code_fraction, rng.integers(1, metrics.N_CODES, shape), 0).astype(np.uint8)
    context = ops.clip_context(shape, FixedRegions(), codes)
    assert (context[2] is None) == (not codes[lungs_mask].any())
    summary = ops.clip_summary(prob, context)
    for low, high, outside in ((1, 254, 1), (30, 200, 7)):
        expected = metrics.joint_counts(ops.clip(prob, FixedRegions(), low, high, outside), codes)
        assert np.array_equal(ops.clip_counts(summary, low, high, outside), expected)
