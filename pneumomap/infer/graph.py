"""Print the pipeline DAG as a Mermaid flowchart (paste it into a README: GitHub renders it).

  pneumomap graph [--pipeline pipeline.yaml]

Model nodes are boxes (kind), ops rounded (op and its parameters), gating edges dotted.
Checkpoints need not exist.
"""
from __future__ import annotations

import argparse
import sys

from pneumomap.infer.spec import IMAGE, Pipeline


def _params(params: dict) -> str:
    def fmt(value) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k} {fmt(v)}" for k, v in value.items()) + "}"
        return f"{value:g}" if isinstance(value, float) else str(value)

    return "<br/>".join(f"{k}: {fmt(v)}" for k, v in params.items())


def mermaid(pipeline: Pipeline) -> str:
    """The flowchart text."""
    lines = ["flowchart TD", f'  {IMAGE}[/"image"/]']
    for node in pipeline.nodes.values():
        label = f"{node.name}<br/><i>{node.kind}</i>"
        if node.params and not (node.is_model and set(node.params) == {"side"}):
            label += "<br/>" + _params(node.params)
        lines.append(f'  {node.name}["{label}"]' if node.is_model else f'  {node.name}("{label}")')
    for node in pipeline.nodes.values():
        lines.extend(f"  {src} --> {node.name}" for src in node.inputs)
        if node.when:
            lines.append(f"  {node.when} -.->|when| {node.name}")
    outputs = pipeline.outputs
    lines.append('  out_csv[["image-level-classifications.csv"]]')
    lines.append('  out_maps[["NAME.png (one per input)"]]')
    lines.append(f"  {outputs.probability} --> out_csv")
    lines.append(f"  {outputs.map} --> out_maps")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="pipeline.yaml", help="the pipeline YAML (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    from pneumomap.infer.spec import PipelineError, load

    try:
        pipeline = load(args.pipeline, check_checkpoints=False)
    except PipelineError as exc:
        print(f"pneumomap graph: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("```mermaid\n" + mermaid(pipeline) + "```\n")
    return 0
