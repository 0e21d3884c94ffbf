"""``mprun graph``: a pipeline's topology as Mermaid, Graphviz dot or JSON.

The graph has a node per stage (kind, process count, daemon) and per queue (type, maxsize), an edge from
each writer to its queue and from each queue to its readers (fan-in and fan-out are several edges), and a
dashed edge for every ``after`` (``A -.-> B``: B starts once A has finished) and for a stage's
``dead_letter`` queue.  Named routes (``output: {ROUTE: queue}``) are one edge per route, labelled with
the route's name; the edge of a stage that feeds its own input queue is a loop, drawn back (``loop``).
"""

from __future__ import annotations

import json
from typing import Any

from runner.compiler import process_count
from schemas import Pipeline
from schemas.pipeline import DEFAULT_MAXSIZE

FORMATS = ("mermaid", "dot", "json")


def graph_data(pipeline: Pipeline) -> dict[str, Any]:
    """The topology as plain data: stages, queues and edges (each edge ``from``, ``to``, ``kind``)."""
    stages = []
    edges = []
    for s in pipeline.stages:
        stages.append(
            {
                "name": s.name,
                "kind": s.kind,
                "processes": process_count(s),
                "daemon": bool(getattr(s, "daemon", False)),
                "function": getattr(s, "function", None),
                "source": _source_kind(s),
                "inputs": s.inputs,
                "outputs": s.outputs,
                "routes": s.routes,
                "after": list(s.after),
            }
        )
        for q in s.inputs:
            edges.append({"from": f"queue:{q}", "to": f"stage:{s.name}", "kind": "input"})
        for route, q in s.routes.items() or [(None, q) for q in s.outputs]:
            edge: dict[str, Any] = {"from": f"stage:{s.name}", "to": f"queue:{q}", "kind": "output"}
            if route is not None:
                edge["route"] = route
            if q in s.inputs:
                edge["loop"] = True
            edges.append(edge)
        dead = getattr(s, "dead_letter", None)
        if dead:
            edges.append({"from": f"stage:{s.name}", "to": f"queue:{dead}", "kind": "dead_letter"})
        for a in s.after:
            edges.append({"from": f"stage:{a}", "to": f"stage:{s.name}", "kind": "after"})
    queues = []
    for name in pipeline.queue_names():
        spec = pipeline.queue(name)
        queues.append(
            {
                "name": name,
                "type": spec.type,
                "maxsize": spec.maxsize,
                "writers": list(dict.fromkeys(e["from"][6:] for e in edges if e["to"] == f"queue:{name}")),
                "readers": [s.name for s in pipeline.stages if name in s.inputs],
            }
        )
    return {"name": pipeline.name, "stages": stages, "queues": queues, "edges": edges}


def _source_kind(stage: Any) -> str | None:
    """A producer's source: its function, or which of items, range, file it is."""
    source = getattr(stage, "source", None)
    if source is None:
        return None
    if source.function:
        return source.function
    return next(k for k in ("items", "range", "file") if getattr(source, k) is not None)


def _edge_label(edge: dict[str, Any]) -> str:
    """The label of an output edge: its route's name, and ``loop`` when it feeds the stage's own input."""
    route, loop = edge.get("route"), edge.get("loop")
    if route and loop:
        return f"{route} (loop)"
    return route or ("loop" if loop else "")


def _stage_label(stage: dict[str, Any]) -> list[str]:
    procs = stage["processes"]
    kind = f"{stage['kind']}, {procs} process{'es' if procs != 1 else ''}"
    if stage["daemon"]:
        kind += ", daemon"
    lines = [stage["name"], kind]
    if stage["function"]:
        lines.append(stage["function"])
    elif stage["source"]:
        lines.append(f"source: {stage['source']}")
    return lines


def _queue_label(queue: dict[str, Any]) -> list[str]:
    size = "unbounded" if queue["maxsize"] == 0 else f"maxsize {queue['maxsize']}"
    if queue["maxsize"] == DEFAULT_MAXSIZE:
        size += " (default)"
    return [queue["name"], f"{queue['type']}, {size}"]


def _ids(data: dict[str, Any]) -> dict[str, str]:
    """Short node ids safe in Mermaid and dot (stage and queue names may contain '-' and share names)."""
    ids = {f"stage:{s['name']}": f"s{i}" for i, s in enumerate(data["stages"])}
    ids.update({f"queue:{q['name']}": f"q{i}" for i, q in enumerate(data["queues"])})
    return ids


def mermaid(pipeline: Pipeline) -> str:
    """A Mermaid ``flowchart LR``: stages as boxes (daemons rounded), queues as cylinders."""
    data = graph_data(pipeline)
    ids = _ids(data)

    def label(lines: list[str]) -> str:
        return "<br/>".join(line.replace('"', "#quot;") for line in lines)

    out = ["flowchart LR"]
    if data["name"]:
        out.append(f"  %% pipeline: {data['name']}")
    for s in data["stages"]:
        text = label(_stage_label(s))
        shape = f'("{text}")' if s["daemon"] else f'["{text}"]'
        out.append(f"  {ids['stage:' + s['name']]}{shape}")
    for q in data["queues"]:
        out.append(f'  {ids["queue:" + q["name"]]}[("{label(_queue_label(q))}")]')
    arrows = {"after": " -.->|after| ", "dead_letter": " -.->|dead letter| "}
    for e in data["edges"]:
        text = _edge_label(e)
        arrow = arrows.get(e["kind"], f' -->|"{text}"| ' if text else " --> ")
        out.append(f"  {ids[e['from']]}{arrow}{ids[e['to']]}")
    return "\n".join(out)


def dot(pipeline: Pipeline) -> str:
    """A Graphviz digraph: stages as boxes (daemons dashed), queues as cylinders, ``after`` edges dashed."""
    data = graph_data(pipeline)
    ids = _ids(data)

    def quote(lines: list[str]) -> str:
        # A JSON string is a valid dot string: quotes escaped, and \n is dot's line break.
        return json.dumps("\n".join(lines), ensure_ascii=False)

    out = [f"digraph {quote([data['name'] or 'pipeline'])} {{", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for s in data["stages"]:
        style = ', style="rounded,dashed"' if s["daemon"] else ', style="rounded"'
        out.append(f"  {ids['stage:' + s['name']]} [shape=box{style}, label={quote(_stage_label(s))}];")
    for q in data["queues"]:
        out.append(f"  {ids['queue:' + q['name']]} [shape=cylinder, label={quote(_queue_label(q))}];")
    styles = {"after": ' [style=dashed, label="after"]', "dead_letter": ' [style=dotted, label="dead letter"]'}
    for e in data["edges"]:
        text = _edge_label(e)
        # A loop goes back against the left-to-right flow: it must not pull its queue behind the stage.
        extra = ([f"label={quote([text])}"] if text else []) + (["constraint=false"] if e.get("loop") else [])
        attrs = styles.get(e["kind"], f" [{', '.join(extra)}]" if extra else "")
        out.append(f"  {ids[e['from']]} -> {ids[e['to']]}{attrs};")
    out.append("}")
    return "\n".join(out)


def render(pipeline: Pipeline, fmt: str) -> str:
    """The graph of ``pipeline`` in ``fmt`` (mermaid, dot or json)."""
    if fmt == "dot":
        return dot(pipeline)
    if fmt == "json":
        return json.dumps(graph_data(pipeline), indent=2)
    return mermaid(pipeline)
