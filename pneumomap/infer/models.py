"""The networks of a run: loading a pipeline's stages (`load_models`) and calling them (`Executor`).

`load_models` loads the stages of the model nodes a run needs, plus the encoders their mappers
decode, checks each against its node (kind, params) and attaches every mapper to its source's
encoder (shared by reference: computed once per image for both heads), before any image is read.
`Executor` calls a network over a list of model inputs: on the run's device, in its precision
(`device.autocast`), `device.forward_batch` images per call (CUDA: the whole batch; the CPU: one),
and returns each image's output and the encoder features the call computed, explicitly: a mapper
gets them as an argument, nothing is left behind in between.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from pneumomap.infer.inputs import RunError
from pneumomap.infer.spec import Node, Pipeline

if TYPE_CHECKING:  # torch is imported where it is used (see `pneumomap.infer.inputs`)
    import torch

    Features = list[torch.Tensor]  # one image's encoder features, one tensor per level
    # a network call on a batch ``x`` given the batch's features (or None): (output or None, features or None)
    Call = Callable[[torch.Tensor, Optional[list[torch.Tensor]]], tuple[Optional[torch.Tensor],
                                                                         Optional[list[torch.Tensor]]]]


def run_precision(device: torch.device, precision: str) -> str:
    """`device.inference_precision`, its refusal as a `RunError`."""
    from pneumomap.device import inference_precision

    try:
        return inference_precision(device, precision)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def decodes_source(node: Node) -> bool:
    """Whether a model node decodes the encoder of its first input (a mapper: `Stage.region` is its source's)."""
    from pneumomap.stages.base import FROM_SOURCE, stage_class

    return stage_class(node.kind).region == FROM_SOURCE


def with_sources(pipeline: Pipeline, names: set[str]) -> set[str]:
    """``names`` plus the nodes whose encoders their mappers decode: the stages a run loads."""
    return set(names) | {pipeline.nodes[n].inputs[0] for n in names if decodes_source(pipeline.nodes[n])}


def whole_image_sizes(pipeline: Pipeline, names: set[str]) -> tuple[tuple[int, int], ...]:
    """The whole-image input sizes of the stages a run loads for ``names``, read from their
    checkpoints' configs (so that decoding can start before the models load)."""
    from pneumomap.stages.base import WHOLE_IMAGE, read_config, stage_class

    sizes = set()
    for name in with_sources(pipeline, names):
        try:
            kind, config = read_config(pipeline.nodes[name].checkpoint)
            if stage_class(kind).region == WHOLE_IMAGE:
                sizes.add(tuple(config.input_size))
        except Exception:  # load_models reports it, with the node's name
            continue
    return tuple(sorted(sizes))


def load_models(pipeline: Pipeline, names: set[str], device: torch.device) -> dict[str, Any]:
    """Load the stages of ``names`` (and the encoders their mappers decode); errors before any image."""
    from pneumomap.device import for_inference
    from pneumomap.stages.base import load_stage
    from pneumomap.stages.inference import optimize_for_inference

    wanted = with_sources(pipeline, names)
    models: dict[str, Any] = {}
    encoder_hashes: dict[str, str] = {}  # source node -> encoder_sha256 of its member-0 encoder
    for node in pipeline.model_nodes:
        if node.name not in wanted:
            continue
        try:
            stage = load_stage(node.checkpoint)
        except Exception as exc:  # missing/corrupt files, wrong format: all fatal, before any image
            raise RunError(f"nodes.{node.name}.checkpoint: cannot load {node.checkpoint}: {exc}") from None
        if stage.kind != node.kind:
            raise RunError(f"nodes.{node.name}.checkpoint: {node.checkpoint} holds a {stage.kind!r} stage, "
                           f"the node says stage: {node.kind}")
        _check_params(node, stage)
        if decodes_source(node):
            _attach_mapper(pipeline, node, stage, models[node.inputs[0]], encoder_hashes)
        models[node.name] = for_inference(stage, device)
    for name in models:  # after every mapper has attached to the eager encoder it decodes
        optimize_for_inference(models[name], device)
    return models


def _check_params(node: Node, stage: Any) -> None:
    """Each parameter of the node's kind against the checkpoint (`Stage.check_node_params`), one at a time
    so that a refusal names its key."""
    from pneumomap.infer.spec import STAGE_NODES

    for key in STAGE_NODES[node.kind].params:
        try:
            stage.check_node_params({key: node.params[key]} if key in node.params else {})
        except ValueError as exc:
            raise RunError(f"nodes.{node.name}.params.{key}: {exc} ({node.checkpoint})") from None


def _attach_mapper(pipeline: Pipeline, node: Node, mapper: Any, source: Any, encoder_hashes: dict[str, str]) -> None:
    """Attach a mapper node's stage to its source's encoder: refused (`RunError` naming both checkpoints
    and the fix) unless it is the encoder the decoder was trained on or the node has
    ``params: {allow_other_encoder: true}`` (then one warning)."""
    import warnings

    from pneumomap.stages.mapper import EncoderMismatchError, encoder_sha256

    name = node.inputs[0]
    source_checkpoint = pipeline.nodes[name].checkpoint
    if name not in encoder_hashes:
        encoder_hashes[name] = encoder_sha256(source.encoder)
    allow = bool(node.params.get("allow_other_encoder", False))
    try:
        same = mapper.attach_encoder(source, allow_other_encoder=allow, source_sha256=encoder_hashes[name])
    except EncoderMismatchError as exc:
        stage = f"mapper_{mapper.side}" if mapper.side else "mapper_whole"
        raise RunError(
            f"nodes.{node.name}: the mapper {node.checkpoint} was trained on another encoder than the one of "
            f"'{name}' ({source_checkpoint}): {exc}. Its decoder would read features it never saw (the "
            f"'{name}' stage was retrained?). Retrain the mapper on this encoder (`pneumomap train {stage} "
            f"--data DATA --out RUN --set encoder_from={source_checkpoint}`) and point the node at RUN, point "
            f"nodes.{name} at the checkpoint the mapper was trained with, or set `params: {{allow_other_encoder: "
            f"true}}` on nodes.{node.name} to decode it anyway") from None
    except ValueError as exc:
        raise RunError(f"nodes.{node.name}: cannot decode the encoder of '{name}': {exc}") from None
    if not same:
        warnings.warn(f"nodes.{node.name}: the mapper {node.checkpoint} decodes the encoder of '{name}' "
                      f"({source_checkpoint}, sha256 {encoder_hashes[name][:12]}), not the one its decoder was trained "
                      f"on (sha256 {mapper.trained_encoder_sha256()[:12]}): allowed by params.allow_other_encoder",
                      UserWarning, stacklevel=3)


def node_call(stage: Any, node: Node, encodes: bool) -> Call:
    """The network call of a model node: its value for a batch (`Stage.node_output`) and, when ``encodes``
    (a mapper decodes this node's encoder), the encoder's features it computed on the way; a mapper
    takes its source's features."""
    def call(x: torch.Tensor, features: Features | None) -> tuple[torch.Tensor, Features | None]:
        if encodes:
            features = stage.encode(x)
        return stage.node_output(x, features, node.params), features if encodes else None

    return call


def encoder_call(stage: Any) -> Call:
    """The call that computes only ``stage``'s encoder features (for a mapper whose source's output was stored)."""
    return lambda x, _features: (None, stage.encode(x))


@dataclass(frozen=True)
class Executor:
    """Runs network calls on the run's device and precision, `device.forward_batch` images at a time.

    ``gradients``: the calls take gradients inside (Grad-CAM): run under ``torch.no_grad`` (which they
    may lift) instead of ``torch.inference_mode``.
    """

    device: torch.device
    precision: str
    batch_size: int
    gradients: bool = False

    def __call__(self, call: Call, inputs: list[np.ndarray], features: list[Features] | None = None
                 ) -> tuple[list[np.ndarray], list[Features]]:
        """(each image's output as float32 numpy, each image's features the call computed) for the model
        inputs ``inputs`` (equal-size 2-D arrays); ``features``: each image's features to give the call."""
        import torch

        from pneumomap.device import autocast, forward_batch, images_to_device

        x = images_to_device(inputs, self.device)
        step = forward_batch(self.device, self.batch_size)
        outputs: list[np.ndarray] = []
        made: list[Features] = []
        mode = torch.no_grad() if self.gradients else torch.inference_mode()
        with mode, autocast(self.device, precision=self.precision):
            for lo in range(0, len(inputs), step):
                given = None if features is None else _stack(features[lo:lo + step])
                output, computed = call(x[lo:lo + step], given)
                if output is not None:
                    outputs.extend(output.float().cpu().numpy())
                if computed is not None:
                    made.extend([level[i] for level in computed] for i in range(len(computed[0])))
        return outputs, made


def _stack(features: list[Features]) -> Features:
    """A batch's features from each image's (channels_last, the layout of a decoder's weights)."""
    import torch

    levels = zip(*features)
    # torch.stack returns NCHW: back to channels_last
    return [torch.stack(level).contiguous(memory_format=torch.channels_last) if level[0].dim() == 3
            else torch.stack(level) for level in levels]
