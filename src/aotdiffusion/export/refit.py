"""New weights into a compiled package without compiling: the refit program.

Freezing (which gives the oneDNN-prepacked convolutions and linears, and Winograd's transformed weights) folds
the weights into constants under internal names while AOTInductor compiles; the package's weights blob holds
those folded constants, not the model's state dict. To write the blob of another checkpoint of the same
architecture, the export records *how* each folded constant was computed: while freezing runs, every
constant-folded subgraph (reorders, permutes, casts, Winograd's G g G^T) is kept as a list of torch operator
calls whose leaves are state-dict tensors by name, and the blob's layout (name, byte offset, size, strides) is
taken from the constants AOTInductor serialises. Replaying that program on new weights gives the same kernels'
constants byte for byte; the export checks exactly that on its own weights before the program is kept, so a
package whose constants could not be reproduced has no program (and says why) instead of a wrong one.

The program is data, not code: operators are looked up by name under torch.ops' ``aten``, ``prims`` and
``mkldnn`` namespaces only, so reading it cannot run anything else.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import operator
from collections import Counter
from collections.abc import Callable, Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PROGRAM_DIR = "refit"
PROGRAM_FILE = "program.json"
CONSTANTS_FILE = "constants.safetensors"
VERSION = 1
# AOTInductor pads each constant in a CPU weights blob to this many bytes (codecache.ALIGN_BYTES).
_ALIGN = 64
_NAMESPACES = ("aten", "prims", "mkldnn")


class RefitError(ValueError):
    """New weights that cannot go into a compiled package (another architecture, or no refit program)."""


class _Unsupported(Exception):
    pass


class Recorder:
    """What freezing folded, and the constants AOTInductor serialised, for one compile."""

    def __init__(self) -> None:
        self.folded: dict[str, dict[str, Any]] = {}  # constant name -> {"nodes": [...], "output": node name}
        # What each folded graph's get_attr read that is not itself folded (a weight, or a constant the traced code
        # made), by its name there. Folded intermediates are not kept: they can be gigabytes (Winograd's).
        self.leaves: dict[str, torch.Tensor] = {}
        self.unsupported: str | None = None
        # The serialised constants' layout, without the tensors: those are freed once compiled (the check reads the
        # blob back from disk instead).
        self.final: list[dict[str, Any]] | None = None
        self.all_cuda = False


@contextmanager
def recording() -> Iterator[Recorder]:
    """Records the constant folding and serialised constants of the AOTInductor compiles run inside."""
    import torch._inductor.constant_folding as constant_folding
    import torch._inductor.freezing as freezing
    from torch._inductor.codecache import AotCodeCompiler

    recorder = Recorder()
    replace = constant_folding.replace_node_with_constant
    compile_ = AotCodeCompiler.compile

    def recorded_replace(gm, node, constant=None, name=None):
        graph = None
        if constant is not None and node.op != "placeholder" and recorder.unsupported is None:
            try:
                graph = _subgraph(node)
                for leaf in graph["leaves"]:
                    if leaf not in recorder.folded:
                        recorder.leaves.setdefault(leaf, _attribute(gm, leaf))
            except _Unsupported as error:
                recorder.unsupported = str(error)
        before = set(gm._buffers)
        replace(gm, node, constant, name)
        if graph is not None:
            added = [key for key in gm._buffers if key not in before]
            recorder.folded[added[0] if added else name] = graph

    def recorded_compile(graph, *args, **kwargs):
        names = [name for name in graph.constants if name not in graph.folded_constants]
        tensors = [graph.get_original_value_of_constant(name) for name in names]
        recorder.final = [_layout(name, tensor) for name, tensor in zip(names, tensors)]
        recorder.all_cuda = bool(names) and all(tensor.is_cuda for tensor in tensors)
        del tensors
        return compile_(graph, *args, **kwargs)

    constant_folding.replace_node_with_constant = recorded_replace
    freezing.replace_node_with_constant = recorded_replace
    AotCodeCompiler.compile = staticmethod(recorded_compile)
    try:
        yield recorder
    finally:
        constant_folding.replace_node_with_constant = replace
        freezing.replace_node_with_constant = replace
        AotCodeCompiler.compile = staticmethod(compile_)


def write_program(recorder: Recorder, exported: torch.export.ExportedProgram, package_dir: Path,
                  blob: Path | None) -> None:  # fmt: skip
    """Writes the refit program of a compiled package into ``package_dir/refit`` once it reproduces the package's
    constants from the traced program's weights (its parameters and buffers, by name) byte for byte; else a
    record of why there is none."""
    reason = recorder.unsupported
    if reason is None and recorder.final is None:
        reason = "the compile serialised no constants"
    if reason is None and recorder.all_cuda:
        reason = "refitting CUDA packages is not implemented"
    tensors = {**exported.state_dict, **exported.constants}
    signature = exported.graph_signature
    weights = {*signature.parameters, *signature.buffers}
    if reason is None:
        try:
            program, fixed = _program(recorder, tensors, weights)
            _verify(program, tensors, fixed, blob)
        except _Unsupported as error:
            reason = str(error)
    if reason is not None:
        write_unavailable(package_dir, reason)
        return
    folder = package_dir / PROGRAM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in fixed.items()}, folder / CONSTANTS_FILE)
    (folder / PROGRAM_FILE).write_text(json.dumps({"available": True, **program}))


def write_unavailable(package_dir: Path, reason: str) -> None:
    folder = package_dir / PROGRAM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROGRAM_FILE).write_text(json.dumps({"version": VERSION, "available": False, "reason": reason}))


def summary(package_dir: Path) -> dict[str, Any]:
    """The manifest's record of a package's refit program: whether there is one (else why not), and its counts."""
    try:
        program = json.loads((package_dir / PROGRAM_DIR / PROGRAM_FILE).read_text())
    except (OSError, ValueError):
        return {"available": False, "reason": "exported before refit programs were recorded"}
    if not program.get("available"):
        return {"available": False, "reason": program.get("reason", "unknown")}
    sources = Counter(entry["source"] for entry in program["constants"])
    return {"available": True, "constants": len(program["constants"]), **{k: sources[k] for k in sorted(sources)}}


def read_program(package_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = package_dir / PROGRAM_DIR
    program = json.loads((folder / PROGRAM_FILE).read_text())
    if not program.get("available"):
        raise RefitError(f"{package_dir.parent.name} has no refit program: {program.get('reason')}.")
    if program.get("version") != VERSION:
        raise RefitError(f"{folder} holds refit program version {program.get('version')}; this build reads {VERSION}.")
    return program, load_file(folder / CONSTANTS_FILE)


def check_inputs(program: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """The new weights must be the compiled ones' architecture: same names, shapes and dtypes."""
    inputs = program["inputs"]
    # In the new model's own order, so "the first tensor that differs" is the first a reader of it would find.
    for name in [*(n for n in tensors if n in inputs), *(n for n in inputs if n not in tensors)]:
        spec, tensor = inputs[name], tensors.get(name)
        if tensor is None:
            raise RefitError(f"{where}: the new weights have no tensor `{name}` (compiled with {_describe(spec)}).")
        if _spec(tensor) != spec:
            raise RefitError(
                f"{where}: the new weights differ in architecture at `{name}`: {_describe(_spec(tensor))}, compiled "
                f"with {_describe(spec)}. Another architecture needs its own export: aotdiffusion export --model NEW."
            )


def write_blob(program: dict, fixed: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
               read: Callable[[dict], bytes], new: Path) -> str:  # fmt: skip
    """Writes the weights blob of ``tensors`` for the package whose program is ``program`` (constants that come
    from no weight, e.g. lifted tensor constants, are the old package's: ``read`` gives their bytes for their
    entry); returns the new blob's sha256.

    One constant is written and hashed (both release the GIL) on a second thread while the next is computed.
    """
    digest = hashlib.sha256()
    written = 0
    with open(new, "wb") as out, ThreadPoolExecutor(1) as writer:
        pending = None

        def emit(*chunks: Any) -> None:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)

        for entry, data in _constant_bytes(program, fixed, tensors):
            if data is None:
                data = read(entry)
            padding = bytes(entry["offset"] - written)  # AOTInductor's zero padding between constants
            written = entry["offset"] + entry["nbytes"]
            if pending is not None:
                pending.result()
            pending = writer.submit(emit, padding, data)  # holds `data` (and its tensor) until written
        if pending is not None:
            pending.result()
        emit(bytes(program["blob_bytes"] - written))
    return digest.hexdigest()


# How each operator a folded constant may apply to weights is linear in them, which is what lets a change of the
# weights (a LoRA) be added to the compiled constants: f(W + dW) = f(W) + f(dW). "all": linear in all its tensor
# arguments together (a rearrangement, a cast, a sum of weight terms); "one": linear in one tensor argument while
# the others are fixed (a product with Winograd's G).
_LINEARITY = {
    **dict.fromkeys(
        ["aten.permute", "aten.reshape", "aten.view", "aten._unsafe_view", "aten.clone", "aten.contiguous",
         "aten.unsqueeze", "aten.squeeze", "aten.t", "aten.transpose", "aten.expand", "aten.slice", "aten.select",
         "aten.alias", "aten.cat", "aten.stack", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
         "aten._to_copy", "prims.convert_element_type", "aten.neg", "aten.add", "aten.sub", "aten.embedding",
         "aten.constant_pad_nd", "mkldnn._reorder_convolution_weight", "mkldnn._reorder_linear_weight",
         "mkldnn._reorder_convolution_transpose_weight", "getitem"],
        "all",
    ),
    **dict.fromkeys(["aten.mul", "aten.div", "aten.bmm", "aten.mm", "aten.matmul"], "one"),
}  # fmt: skip


def weights_of(program: dict) -> dict[str, set[str]]:
    """Each constant of the blob -> the weights (program inputs) it is computed from."""
    folded, aliases = program["folded"], program["aliases"]
    memo: dict[str, set[str]] = {}

    def reads(name: str) -> set[str]:
        if name not in memo:
            if name in folded:
                memo[name] = set().union(*(reads(leaf) for leaf in folded[name]["leaves"]))
            else:
                name_in = aliases.get(name, name)
                memo[name] = {name_in} if name_in in program["inputs"] else set()
        return memo[name]

    return {
        entry["name"]: reads(entry["name"]) if entry["source"] == "computed" else
        ({entry["input"]} if entry["source"] == "weight" else set())
        for entry in program["constants"]
    }  # fmt: skip


def changed_constants(
    program: dict,
    fixed: dict[str, torch.Tensor],
    read: Callable[[dict], bytes],
    deltas: dict[str, torch.Tensor],
    skip: Container[str] = (),
) -> dict[str, torch.Tensor]:
    """The new value of every constant computed from a weight in ``deltas`` (program input name -> change of that
    weight; other weights unchanged), but those named in ``skip``: the export's constant, whose bytes ``read``
    gives for its program entry, plus the program applied to the change. Each is laid out as the compiled code
    reads it (a oneDNN tensor where the constant is one)."""
    reads = weights_of(program)
    entries = [e for e in program["constants"] if reads[e["name"]] & deltas.keys() and e["name"] not in skip]
    for entry in entries:
        if entry["source"] == "computed":
            _check_linear(program, entry["name"], set(deltas))
    folded, aliases, inputs = program["folded"], program["aliases"], program["inputs"]

    def change(name: str) -> torch.Tensor:
        """The change of a folded value: the graph run on the changes of its weights (zero for the weights that do
        not change) with its fixed tensors (Winograd's G) as they are. Linear graphs only (checked above)."""
        if name in folded:
            return _run(folded[name], change)
        if name in fixed:
            return fixed[name]
        name = aliases.get(name, name)
        spec = inputs[name]
        if name not in deltas:
            return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        return deltas[name].to(getattr(torch, spec["dtype"]))

    changed = {}
    for entry in entries:
        base = torch.frombuffer(bytearray(read(entry)), dtype=torch.uint8)
        delta = change(entry["name"]) if entry["source"] == "computed" else change(entry["input"])
        if delta.is_mkldnn:  # the change, prepacked like the constant; the constant's bytes added in place
            if _nbytes(delta) != entry["nbytes"]:
                raise RefitError(f"The constant {entry['name']} changed its oneDNN layout.")
            memory = torch.from_numpy(_tensor_bytes(delta)).view(delta.dtype)
            memory.copy_(memory.float() + base.view(delta.dtype).float())
            changed[entry["name"]] = delta
        else:
            dtype = getattr(torch, entry["dtype"])
            old = base.view(dtype).as_strided(entry["shape"], entry["stride"], entry["storage_offset"])
            changed[entry["name"]] = _laid_out((old.float() + delta.float()).to(dtype), entry)
    return changed


def constants_from_bytes(program: dict, fixed: dict[str, torch.Tensor],
                         stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The constants ``stored`` (name -> their bytes, uint8) as the compiled code reads them: a strided one is a view
    of its bytes; a oneDNN one is made by its folding on zero weights (which gives its oneDNN layout) and its bytes
    copied in (export/sizes.py keeps an extra image size's differing constants so)."""
    folded, aliases, inputs = program["folded"], program["aliases"], program["inputs"]

    def zeros(name: str) -> torch.Tensor:
        if name in folded:
            return _run(folded[name], zeros)
        if name in fixed:
            return fixed[name]
        spec = inputs[aliases.get(name, name)]
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))

    out = {}
    for entry in program["constants"]:
        data = stored.get(entry["name"])
        if data is None:
            continue
        if entry["mkldnn"]:
            tensor = zeros(entry["name"]) if entry["source"] == "computed" else None
            if tensor is None or not tensor.is_mkldnn or _nbytes(tensor) != entry["nbytes"]:
                raise RefitError(f"The constant {entry['name']} cannot be rebuilt in its oneDNN layout.")
            torch.from_numpy(_tensor_bytes(tensor)).copy_(data)
        else:
            dtype = getattr(torch, entry["dtype"])
            # A copy, not a view: a view would keep the whole mapped file of ``stored`` alive with every page the
            # oneDNN copies above read still resident.
            storage = data.view(dtype).clone() if entry["nbytes"] else torch.empty(0, dtype=dtype)
            tensor = storage.as_strided(entry["shape"], entry["stride"], entry["storage_offset"])
        out[entry["name"]] = tensor
    return out


def _check_linear(program: dict, name: str, changing: set[str]) -> bool:
    """Whether the folded constant ``name`` reads a weight of ``changing``; raises RefitError unless it is linear
    in those (each operator on a value that changes one of _LINEARITY's, with no fixed term added)."""
    folded, aliases = program["folded"], program["aliases"]
    varies: set[str] = set()  # the nodes whose value changes
    for node in folded[name]["nodes"]:
        if node["op"] == "get_attr":
            leaf = node["target"]
            if _check_linear(program, leaf, changing) if leaf in folded else aliases.get(leaf, leaf) in changing:
                varies.add(node["name"])
            continue
        arguments = _node_arguments(node["args"]) + _node_arguments(node["kwargs"])
        varying = [a for a in arguments if a in varies]
        if not varying:
            continue
        target = node["target"]
        operator_name = ".".join(target.split(".")[:2])
        kind, op = _LINEARITY.get(operator_name), operator_name.rpartition(".")[2]
        first = _node_arguments(node["args"][:1])
        if kind == "one":
            linear = len(varying) == 1 and (op != "div" or varying == first)
        elif kind == "all":
            scalars = [a for a in node["args"][1:] if isinstance(a, (int, float)) and not isinstance(a, bool)]
            linear = not (
                (op in ("add", "sub", "cat", "stack") and len(varying) < len(arguments))  # a fixed term added
                or (op in ("add", "sub") and any(scalars))  # x + 2: affine
                or (op == "constant_pad_nd" and any(node["args"][2:3]))  # padding with a nonzero value
                or (op == "embedding" and varying != first)  # linear in the table, not in the indices
            )
        else:
            linear = False
        if not linear:
            raise RefitError(
                f"The compiled constant {name} is computed with {target}, which is not linear in the weights, so a "
                "change of the weights cannot be added to it in place; fuse the LoRA at export instead: "
                "aotdiffusion export --reuse-compiled EXPORT --lora LORA OUT."
            )
        varies.add(node["name"])
    return folded[name]["output"] in varies


def _node_arguments(value: Any) -> list[str]:
    """The names of the graph nodes an encoded argument refers to."""
    if isinstance(value, list):
        return [name for v in value for name in _node_arguments(v)]
    if isinstance(value, dict):
        if "node" in value:
            return [value["node"]]
        if "dict" in value:
            return _node_arguments(list(value["dict"].values()))
    return []


def _program(recorder: Recorder, tensors: dict[str, torch.Tensor], weights: set[str]) -> tuple[dict, dict]:
    """The program, and the constants it keeps. A weight that reaches no constant is one the compiled code does
    not read (inductor removed its computation); none is inlined as a literal, which the export's
    ``always_keep_tensor_constants`` prevents (export/compile.py)."""
    by_pointer = {tensors[name].data_ptr(): name for name in weights if _strided(tensors[name])}
    made_by_code = {t.data_ptr() for n, t in tensors.items() if n not in weights and _strided(t)}
    # A weight the compile copied (a non-persistent buffer, lifted as an export constant: PixArt's position
    # embedding) keeps its name in the constant's, not its memory; its copy's bytes are checked like every other's.
    by_name = {name.replace(".", "_"): name for name in weights if _strided(tensors[name])}
    constants, offset = [], 0
    inputs: dict[str, dict] = {}
    fixed: dict[str, torch.Tensor] = {}
    for layout in recorder.final:
        name, pointer = layout["name"], layout.pop("pointer")
        entry: dict[str, Any] = {**layout, "offset": offset}
        if name in recorder.folded:
            entry["source"] = "computed"
        elif pointer is not None and pointer in by_pointer:
            entry["source"], entry["input"] = "weight", by_pointer[pointer]
            inputs[entry["input"]] = _spec(tensors[entry["input"]])
        elif pointer is not None and (pointer in made_by_code or name.startswith("_tensor_constant")):
            entry["source"] = "fixed"  # a tensor the traced code created itself: no weight behind it
        elif name in by_name and _spec(tensors[by_name[name]]) == {"shape": layout["shape"], "dtype": layout["dtype"]}:
            entry["source"], entry["input"] = "weight", by_name[name]
            inputs[entry["input"]] = _spec(tensors[entry["input"]])
        else:  # e.g. a constant a compiler pass registered itself (int8 repacks): its origin is unknown
            raise _Unsupported(f"the constant {name} comes from neither a weight nor a recorded folding")
        constants.append(entry)
        offset += (entry["nbytes"] + _ALIGN - 1) // _ALIGN * _ALIGN
    folded: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    pending = [entry["name"] for entry in constants if entry["source"] == "computed"]
    while pending:  # the folded graphs these constants need, and their leaves
        name = pending.pop()
        if name in folded:
            continue
        folded[name] = recorder.folded[name]
        for leaf in folded[name]["leaves"]:
            if leaf in recorder.folded:
                pending.append(leaf)
            elif leaf in weights:
                inputs[leaf] = _spec(tensors[leaf])
            else:
                value = recorder.leaves.get(leaf)
                if not _strided(value):
                    raise _Unsupported(f"a folded constant reads `{leaf}`, which is neither a weight nor folded")
                if value.data_ptr() in by_pointer:  # a weight under the name the compiled graph gave it
                    aliases[leaf] = by_pointer[value.data_ptr()]
                    inputs[aliases[leaf]] = _spec(value)
                else:  # a tensor the traced code made itself (Winograd's G): kept with the program
                    fixed[leaf] = value
    program = {"version": VERSION, "constants": constants, "folded": folded, "aliases": aliases, "inputs": inputs,
               "blob_bytes": offset}  # fmt: skip
    return program, fixed


def _verify(program: dict, tensors: dict[str, torch.Tensor], fixed: dict, blob: Path | None) -> None:
    """Every constant the program computes must equal, byte for byte, what the compile wrote into ``blob``."""
    if blob is None:
        raise _Unsupported("the package has no weights blob")
    if blob.stat().st_size != program["blob_bytes"]:
        raise _Unsupported(f"the weights blob is {blob.stat().st_size} bytes, the layout read {program['blob_bytes']}")
    with open(blob, "rb") as written:
        for entry, data in _constant_bytes(program, fixed, tensors):
            if data is None:
                continue
            written.seek(entry["offset"])
            if not np.array_equal(np.frombuffer(written.read(entry["nbytes"]), np.uint8), data):
                raise _Unsupported(
                    f"replaying the folding did not reproduce the constant {entry['name']} byte for byte"
                )


def _constant_bytes(program: dict, fixed: dict, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[dict, Any]]:
    """Each constant of the blob with its bytes (None for a constant that comes from no weight), computed one at a
    time: a folded intermediate is kept only until its last user has run."""
    folded, aliases = program["folded"], program["aliases"]
    uses = Counter(leaf for name in folded for leaf in folded[name]["leaves"] if leaf in folded)
    memo: dict[str, torch.Tensor] = {}

    def value(name: str) -> torch.Tensor:
        if name in memo:
            tensor = memo[name]
        elif name in folded:
            tensor = _run(folded[name], value)
        else:
            return fixed[name] if name in fixed else tensors[aliases.get(name, name)]
        uses[name] -= 1
        if uses[name] > 0:
            memo[name] = tensor
        else:
            memo.pop(name, None)
        return tensor

    for entry in program["constants"]:
        if entry["source"] == "fixed":
            yield entry, None
            continue
        if entry["source"] == "computed":
            uses[entry["name"]] += 1
            tensor = value(entry["name"])
        else:
            tensor = tensors[entry["input"]]
        yield entry, _tensor_bytes(_laid_out(tensor, entry))


def _laid_out(tensor: torch.Tensor, entry: dict) -> torch.Tensor:
    """``tensor`` in the storage layout the compiled code reads (size, strides, offset) when it is not already."""
    if tensor.is_mkldnn:
        if not entry["mkldnn"] or _nbytes(tensor) != entry["nbytes"]:
            raise _Unsupported(f"the constant {entry['name']} changed its oneDNN layout")
        return tensor
    same = (
        list(tensor.stride()) == entry["stride"]
        and tensor.storage_offset() == entry["storage_offset"]
        and tensor.untyped_storage().nbytes() == entry["nbytes"]
    )
    if same:
        return tensor
    dtype = getattr(torch, entry["dtype"])
    storage = torch.zeros(entry["nbytes"], dtype=torch.uint8).view(dtype)
    out = storage.as_strided(entry["shape"], entry["stride"], entry["storage_offset"])
    out.copy_(tensor)
    return out


def _run(graph: dict, value) -> torch.Tensor:
    env: dict[str, Any] = {}
    for node in graph["nodes"]:
        if node["op"] == "get_attr":
            env[node["name"]] = value(node["target"])
        else:
            function = _operator(node["target"])
            env[node["name"]] = function(*_decode(node["args"], env), **_decode(node["kwargs"], env))
    return env[graph["output"]]


def _operator(target: str):
    if target == "getitem":
        return operator.getitem
    namespace, _, rest = target.partition(".")
    if namespace not in _NAMESPACES:
        raise RefitError(f"A refit program names the operator {target!r}, outside torch.ops.{'/'.join(_NAMESPACES)}.")
    found: Any = getattr(torch.ops, namespace)
    for part in rest.split("."):
        found = getattr(found, part)
    return found


def _subgraph(node: torch.fx.Node) -> dict[str, Any]:
    """The folded subgraph that computes ``node``, as data, with its get_attr leaves."""
    nodes: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    stack = [(node, False)]
    while stack:  # post-order without recursion: deep chains of views are common
        current, done = stack.pop()
        if done:
            nodes.append(current)
            continue
        if current in seen:
            continue
        seen.add(current)
        stack.append((current, True))
        stack.extend((parent, False) for parent in reversed(current.all_input_nodes) if parent not in seen)
    records, leaves = [], []
    for current in nodes:
        if current.op == "get_attr":
            records.append({"op": "get_attr", "name": current.name, "target": current.target})
            leaves.append(current.target)
        elif current.op == "call_function":
            records.append({"op": "call_function", "name": current.name, "target": _target_name(current.target),
                            "args": _encode(current.args), "kwargs": _encode(current.kwargs)})  # fmt: skip
        else:
            raise _Unsupported(f"a folded constant depends on a {current.op} node ({current.name})")
    return {"nodes": records, "output": node.name, "leaves": leaves}


def _target_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload) and target.namespace in _NAMESPACES:
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.split("::")[0] in _NAMESPACES:
        return target._qualified_op_name.replace("::", ".")  # the overload is picked by the arguments, as in the graph
    raise _Unsupported(f"a folded constant is computed by {target}, which a refit program cannot name")


def _encode(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise _Unsupported(f"a folded constant's operator takes a {type(value).__name__}: a refit program cannot hold it")


def _decode(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if isinstance(value, dict):
        if "node" in value:
            return env[value["node"]]
        if "dict" in value:
            return {k: _decode(v, env) for k, v in value["dict"].items()}
        ((kind, name),) = value.items()
        if kind == "device":
            return torch.device(name)
        found = getattr(torch, name, None)
        if not isinstance(found, (torch.dtype, torch.memory_format, torch.layout)):
            raise RefitError(f"A refit program names the {kind} {name!r}, which torch does not have.")
        return found
    return value


def _layout(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    """Where a serialised constant's bytes come from and how the compiled code reads them (no tensor kept)."""
    layout: dict[str, Any] = {"name": name, "nbytes": _nbytes(tensor), "mkldnn": tensor.is_mkldnn, "pointer": None}
    if not tensor.is_mkldnn:
        layout.update(_spec(tensor), stride=list(tensor.stride()), storage_offset=tensor.storage_offset())
        layout["pointer"] = tensor.data_ptr()
    return layout


def _attribute(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _strided(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_mkldnn


def _nbytes(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0
    if tensor.is_mkldnn:
        return torch.ops.mkldnn._nbytes(tensor)
    return tensor.untyped_storage().nbytes()


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes AOTInductor serialises for a constant (a oneDNN tensor's buffer, else the whole storage), as a
    view of the tensor's memory: valid while the tensor lives."""
    nbytes = _nbytes(tensor)
    if nbytes == 0:
        return np.empty(0, np.uint8)
    pointer = torch.ops.mkldnn.data_ptr(tensor) if tensor.is_mkldnn else tensor.untyped_storage().data_ptr()
    memory = (ctypes.c_ubyte * nbytes).from_address(pointer)
    memory.tensor = tensor  # the view keeps `memory` alive, and it the tensor
    return np.frombuffer(memory, np.uint8)


def _spec(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _describe(spec: dict[str, Any]) -> str:
    return f"shape {tuple(spec['shape'])}, {spec['dtype']}"
