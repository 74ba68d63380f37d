"""Bring your own model: load a trained model file in place of the train step.

A project names one trained model file in ``[model]`` (docs/projects.md):

* ``weights`` — a PyTorch ``state_dict`` (``torch.save``) for the module the ``entry`` point
  builds. It is read with ``torch.load(weights_only=True)``: a pickle of arbitrary objects is
  refused, never executed.
* ``program`` — a ``torch.export`` program (``torch.export.save``, ``.pt2``); its module is
  exported like a trained one. The archive is checked as a zip before ``torch.export.load``
  sees it, because that loader unpickles parts of it with full pickle: only the members a
  plain ``torch.export.save`` writes, with no pickled or custom-object payload, are accepted
  (:func:`_check_program_archive`). A program exported with a static batch of 1 is run row by row
  on the host (``TrainResult.rowwise``).
* ``onnx`` — an ONNX model, for onnxruntime targets only: edgeops converts PyTorch, not ONNX,
  to TFLite. The model is normalized to the form the export step produces (one float input
  ``features[1, *sample_shape]``, one output ``logits[1, n_classes]``, batch fixed at 1, names
  stripped) and is then the build's fp32 model.

Whatever the kind, the model must map ``[rows, *sample_shape]`` (after the project's declared
preprocessing) to ``[rows, n_classes]`` logits, with the sample shape (``[n_features]`` for a
flat vector, ``[C, H, W]`` for an image...) and ``n_classes`` those of the data. A file that
does not load, or whose shapes disagree, raises :class:`ProjectError` naming the ``[model]``
field and why. Everything is read from the bytes the step cache keyed on, so a cached entry
and a fresh load give the same model.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from typing import TYPE_CHECKING

import numpy as np

from edgeops_core import Preprocessing, apply_preprocessing
from edgeops_toolchain.errors import ProjectError
from edgeops_toolchain.project import MODEL_FILE_MAX_BYTES, Project
from edgeops_toolchain.tasks import output_count, validation_metric
from edgeops_toolchain.train import TrainResult, build_model

if TYPE_CHECKING:
    from collections.abc import Iterator

    import onnx
    import torch
    from torch import nn

    from edgeops_toolchain.data import Dataset

__all__ = ["load_pretrained"]


def load_pretrained(project: Project, data: bytes, ds: Dataset, pre: Preprocessing) -> TrainResult:
    """The project's trained model from ``data`` (the model file's bytes), checked against ``ds``.

    Args:
        project: names the kind of file (``project.model_kind``) and, for ``weights``, the
            entry point.
        data: the model file's bytes.
        ds: the checked dataset (``n_features``, ``n_classes``, the validation split).
        pre: the preprocessing the model expects its input after.

    Raises:
        ProjectError: the file does not load as its kind, or its input or output shape
            disagrees with the data; the message names the field.
    """
    # Task-aware: a regression has one output per label, an anomaly model one score.
    sample, n_classes = ds.sample_shape, output_count(project.task, ds.label_names)
    x_val = apply_preprocessing(pre, ds.x_val, ds.sample_ndim)
    if project.model_kind == "onnx":
        model = normalize_onnx(project, data, sample, n_classes)
        logits = _finite(project, _onnx_logits(model, x_val), "the validation rows (x_val)")
        return TrainResult(
            model=None,
            parameters=_onnx_parameters(model),
            loss_per_epoch=[],
            val_accuracy=validation_metric(project.task, logits, ds.y_val, ds.label_names),
            onnx=model,
        )
    if project.model_kind == "weights":
        result = TrainResult(
            model=_load_state_dict(project, data, sample, n_classes), parameters=0, loss_per_epoch=[], val_accuracy=0.0
        )
    elif project.model_kind == "program":
        module, rowwise = _load_program(project, data, sample)
        result = TrainResult(model=module, parameters=0, loss_per_epoch=[], val_accuracy=0.0, rowwise=rowwise)
    else:  # load_project admits no other kind
        raise ProjectError(f"internal: no trained model file in project {project.name!r}")
    _check_logits(project, result, x_val[:2] if not result.rowwise else x_val[:1], n_classes)
    module = result.torch_model()
    result.parameters = sum(p.numel() for p in module.parameters())
    outputs = _finite(project, result.logits(x_val), "the validation rows (x_val)")
    result.val_accuracy = validation_metric(project.task, outputs, ds.y_val, ds.label_names)
    return result


def _fail(project: Project, why: str) -> ProjectError:
    name = project.model_file.name if project.model_file is not None else "?"
    return ProjectError(f"{project.root / 'edgeops.toml'}: {project.model_field()} ({name}): {why}")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _shape_text(sample: tuple[int, ...]) -> str:
    """How a message names the data's input: ``n_features=106`` (flat) or ``sample_shape=[1, 8, 8]``."""
    return f"n_features={sample[0]}" if len(sample) == 1 else f"sample_shape={list(sample)}"


def _load_state_dict(project: Project, data: bytes, sample: tuple[int, ...], n_classes: int) -> nn.Module:
    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on a bad file
        raise _fail(
            project,
            "does not load as a state_dict (torch.load with weights_only=True; save it with "
            f"torch.save(model.state_dict(), path)): {_unpickling_reason(exc)}",
        ) from exc
    if not isinstance(state, dict):
        raise _fail(project, f"must hold a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    odd = next(((k, v) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if odd is not None:
        raise _fail(
            project,
            f"must hold a state_dict (a mapping of names to tensors), but entry {odd[0]!r} is a {type(odd[1]).__name__}; "
            "save it with torch.save(model.state_dict(), path)",
        )
    model = build_model(project, sample, n_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys, or a parameter of another shape
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())[:300]
        raise _fail(
            project,
            f"does not fit model.entry {project.model_entry!r} built for {_shape_text(sample)}, n_classes={n_classes} "
            f"(the data's): {detail or _first_line(exc)}",
        ) from exc
    return model.eval()


def _unpickling_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line.

    torch's own text for a refused pickle explains how to load it anyway, unsafely: not
    advice a build should pass on, so only the refused global or opcode is kept.
    """
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (
            f"it pickles Python objects besides tensors ({found.group(1)}; a whole module saved with torch.save(model)?), "
            "which weights_only refuses to run"
        )
    if isinstance(exc, pickle.UnpicklingError):
        operand = re.search(r"Unsupported operand \d+", text)
        return f"not a torch.save file of tensors ({operand.group(0) if operand else _first_line(exc)})"
    return _first_line(exc)


def _load_program(project: Project, data: bytes, sample: tuple[int, ...]) -> tuple[nn.Module, bool]:
    """The program's module, and whether it takes one row at a time (a static batch of 1)."""
    import torch

    _check_program_archive(project, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises assorted types on a file that is not a program
        raise _fail(project, f"does not load as a torch.export program (torch.export.load): {_first_line(exc)}") from exc
    inputs = [spec for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    outputs = [spec for spec in program.graph_signature.output_specs if spec.kind.name == "USER_OUTPUT"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise _fail(
            project, f"takes {len(inputs)} input(s) and returns {len(outputs)} output(s); edgeops needs one input and one output"
        )
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == getattr(inputs[0].arg, "name", None))
    value = node.meta.get("val")
    shape = [d if isinstance(d, int) else None for d in getattr(value, "shape", ())]
    dtype = getattr(value, "dtype", None)
    if dtype != torch.float32 or tuple(shape[1:]) != sample or shape[:1] not in ([None], [1]):
        got = "[" + ", ".join("batch" if d is None else str(d) for d in shape) + f"] {str(dtype).removeprefix('torch.')}"
        want = ", ".join(["batch", *(str(d) for d in sample)])
        of = "n_features of the data" if len(sample) == 1 else "the data's sample shape"
        raise _fail(project, f"takes input {got}, expected [{want}] float32 ({of})")
    return _as_module(program.module()), shape[0] == 1


#: Bounds on a ``.pt2`` archive read before torch sees it: members, and bytes once inflated.
PROGRAM_MAX_MEMBERS = 4096
PROGRAM_MAX_INFLATED_BYTES = MODEL_FILE_MAX_BYTES

#: The members a plain ``torch.export.save`` archive of one program named ``model`` holds
#: (after the archive's root folder), each read by torch without unpickling arbitrary objects
#: once the configs pass :func:`_check_program_archive`; ``extra/`` files are read as text.
_PROGRAM_MEMBERS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/constants/model_constants_config\.json"
    r"|data/weights/weight_[0-9]+|data/constants/tensor_[0-9]+|data/sample_inputs/model\.pt|extra/[^/]+)"
)


def _check_program_archive(project: Project, data: bytes) -> None:
    """Refuse a ``.pt2`` that ``torch.export.load`` would unpickle unsafely, before it is loaded.

    Why: torch 2.x loads weights and constants marked ``use_pickle`` with
    ``torch.load(weights_only=False)``, custom-object and opaque constants with its own
    unpicklers and ``pickle.loads``, AOTInductor members as shared libraries, and sample inputs
    with a fallback to ``weights_only=False``: any of them runs code from the file. Only the
    members :data:`_PROGRAM_MEMBERS` lists are allowed, the weights and constants configs must
    mark no entry ``use_pickle`` and name only ``weight_N`` / ``tensor_N`` payloads, and the
    sample inputs must load with ``torch.load(weights_only=True)``.
    """
    import zipfile

    import torch

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise _fail(project, f"does not load as a torch.export program (not a .pt2 zip archive): {_first_line(exc)}") from exc
    with archive:
        infos = archive.infolist()
        if len(infos) > PROGRAM_MAX_MEMBERS:
            raise _fail(project, f"is a .pt2 archive of {len(infos)} members, more than the {PROGRAM_MAX_MEMBERS} edgeops reads")
        if sum(i.file_size for i in infos) > PROGRAM_MAX_INFLATED_BYTES:
            raise _fail(project, f"is a .pt2 archive of more than {PROGRAM_MAX_INFLATED_BYTES} bytes once inflated")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            # Why: Python's zipfile reads the last of two same-named members, torch's reader the first.
            raise _fail(project, "is a .pt2 archive with two members of the same name; edgeops refuses it")
        roots = {name.split("/", 1)[0] for name in names}
        if len(roots) != 1 or any("/" not in i.filename for i in infos):
            raise _fail(project, "is not a torch.export.save archive (its members are not all under one root folder)")
        members = {i.filename.split("/", 1)[1]: i.filename for i in infos if not i.filename.endswith("/")}
        odd = sorted(m for m in members if not _PROGRAM_MEMBERS.fullmatch(m))
        if odd:
            raise _fail(
                project,
                f"holds {odd[0]!r}, which torch.export.load would unpickle or load as code, or which a plain "
                "torch.export.save of one program does not write; edgeops refuses it (save the program with "
                "torch.export.save, without custom objects or AOTInductor artifacts)",
            )
        if "models/model.json" not in members:
            raise _fail(project, "does not load as a torch.export program (the archive has no models/model.json)")

        def read(name: str) -> bytes:
            try:
                return archive.read(members[name])
            except Exception as exc:  # zlib.error, BadZipFile on a damaged member
                raise _fail(project, f"member {name!r} of the .pt2 archive does not read: {_first_line(exc)}") from exc

        for config, prefix in (
            ("data/weights/model_weights_config.json", "weight_"),
            ("data/constants/model_constants_config.json", "tensor_"),
        ):
            if config in members:
                _check_payload_config(project, config, read(config), prefix)
        if "data/sample_inputs/model.pt" in members:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(read("data/sample_inputs/model.pt")), weights_only=True, map_location="cpu")
            except Exception as exc:  # UnpicklingError on objects besides tensors, and others on garbage
                raise _fail(
                    project,
                    "member 'data/sample_inputs/model.pt' of the .pt2 archive does not load with "
                    f"torch.load(weights_only=True), so torch.export.load would unpickle it unsafely: {_unpickling_reason(exc)}",
                ) from exc


def _check_payload_config(project: Project, config: str, raw: bytes, prefix: str) -> None:
    """Every entry of a weights or constants config must be a plain tensor payload ``<prefix>N``."""
    import json

    try:
        payloads = [(str(k), dict(v)) for k, v in json.loads(raw)["config"].items()]
    except Exception as exc:  # JSONDecodeError, KeyError, TypeError on a malformed config
        raise _fail(project, f"member {config!r} of the .pt2 archive is not a payload config: {_first_line(exc)}") from exc
    for fqn, payload in payloads:
        path_name = str(payload.get("path_name", ""))
        if payload.get("use_pickle") or not re.fullmatch(prefix + "[0-9]+", path_name):
            raise _fail(
                project,
                f"entry {fqn!r} of {config!r} is a pickled or custom object ({path_name!r}, use_pickle="
                f"{bool(payload.get('use_pickle'))}), which torch.export.load would unpickle and run; "
                "edgeops accepts only plain tensors",
            )


def _as_module(program: nn.Module) -> nn.Module:
    """The program's module inside a plain ``nn.Module``.

    Why: the module of an exported program refuses ``train()``/``eval()``, which the
    exporters call, and litert-torch does not convert it directly (it finds no program to
    convert); as a child of an ordinary module it exports like a trained one. A program
    has no training behaviour to switch, so ``train()`` only sets the flag.
    """
    from torch import nn

    class Program(nn.Module):
        def __init__(self, program: nn.Module) -> None:
            super().__init__()
            self.program = program

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.program(x)  # type: ignore[no-any-return]

        def train(self, mode: bool = True) -> Program:
            self.training = mode
            return self

    return Program(program)


def _check_logits(project: Project, result: TrainResult, x: np.ndarray, n_classes: int) -> None:
    """Run the model on a few validation rows: it must give ``[rows, n_classes]`` finite logits."""
    try:
        out = result.logits(x)
    except Exception as exc:  # the model's own code may raise anything
        raise _fail(project, f"fails on a {list(x.shape)} input: {_first_line(exc)}") from exc
    if out.shape != (x.shape[0], n_classes):
        raise _fail(
            project,
            f"returns {list(out.shape)} for a {list(x.shape)} input, expected [{x.shape[0]}, {n_classes}] "
            f"(n_classes={n_classes}, one logit per label of the data)",
        )
    _finite(project, out, f"a {list(x.shape)} input of validation rows")


def _finite(project: Project, logits: np.ndarray, rows: str) -> np.ndarray:
    """``logits``, or :class:`ProjectError` if any is NaN or infinite (the quantizer and argmax need numbers)."""
    bad = ~np.isfinite(logits)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise _fail(
            project,
            f"returns {int(bad.sum())} NaN/inf logit(s) for {rows} (first at row {row}, class {col}: {logits[row, col]}); "
            "edgeops needs finite logits",
        )
    return logits


def normalize_onnx(project: Project, data: bytes, sample_shape: int | tuple[int, ...], n_classes: int) -> bytes:
    """The user's ONNX model in the form the export step produces (see the module docstring).

    Raises:
        ProjectError: not an ONNX model, not one float input and one output, shapes that
            disagree with the data, or a graph that onnx.checker or onnxruntime refuses.
    """
    import onnx

    from edgeops_toolchain.onnx_export import INPUT_NAME, OUTPUT_NAME, sample_dims, strip_model

    sample = sample_dims(sample_shape)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, and others on garbage
        raise _fail(project, f"does not load as an ONNX model: {_first_line(exc)}") from exc
    graph = proto.graph
    if not graph.node:
        raise _fail(project, "does not load as an ONNX model: the graph has no nodes")
    _check_opsets(project, proto)
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise _fail(
            project,
            f"has {len(inputs)} input(s) ({', '.join(v.name for v in inputs)}) and {len(graph.output)} output(s); "
            "edgeops needs one input [batch, *sample_shape] and one output [batch, n_classes]",
        )
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer):
        raise _fail(
            project, "keeps weights in external data files; save it as one file (onnx.save(..., save_as_external_data=False))"
        )
    source, target = inputs[0], graph.output[0]
    if source.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise _fail(project, f"input {source.name!r} is {_elem(source)}, expected float32")
    _fix_shape(project, source, sample, "input", "n_features" if len(sample) == 1 else "sample_shape")
    _fix_shape(project, target, (n_classes,), "output", "n_classes")
    renames = {source.name: INPUT_NAME, target.name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    source.name, target.name = INPUT_NAME, OUTPUT_NAME
    proto = strip_model(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, or shape inference errors
        raise _fail(project, f"fails onnx.checker with batch fixed at 1: {_first_line(exc)}") from exc
    model = bytes(proto.SerializeToString())
    out = _onnx_logits(model, np.zeros((1, *sample), dtype=np.float32), project=project)
    if out.shape != (1, n_classes):
        raise _fail(project, f"returns {list(out.shape)} for one row, expected [1, {n_classes}] (n_classes of the data)")
    return model


#: The oldest default-domain opset edgeops takes: the int8 quantizer writes per-channel
#: ``DequantizeLinear`` with an ``axis``, which opset 13 introduced.
ONNX_MIN_OPSET = 13


def _check_opsets(project: Project, proto: onnx.ModelProto) -> None:
    """Refuse what the quantizer and the targets' onnxruntime cannot take: an opset before 13, or
    any operator outside the default domain (``com.microsoft`` contrib ops, custom ops)."""
    import onnx

    default = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    version = max(default, default=0)
    if version < ONNX_MIN_OPSET:
        raise _fail(
            project,
            f"uses default-domain opset {version or 'none'}, edgeops needs opset {ONNX_MIN_OPSET} or later "
            f"(convert it: onnx.version_converter.convert_version(model, {ONNX_MIN_OPSET}))",
        )

    def nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    yield from nodes(sub)

    odd = next((n for n in nodes(proto.graph) if n.domain not in ("", "ai.onnx")), None)
    if odd is not None:
        raise _fail(
            project,
            f"uses operator {odd.op_type!r} of domain {odd.domain!r} (node {odd.name!r}); edgeops takes only "
            "default-domain (ai.onnx) operators, which its int8 quantizer and every onnxruntime target support",
        )


def _elem(value: onnx.ValueInfoProto) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _fix_shape(project: Project, value: onnx.ValueInfoProto, sample: tuple[int, ...], what: str, name: str) -> None:
    """Check ``value`` is ``[batch, *sample]`` (batch 1 or symbolic, other axes static or symbolic)
    and fix every axis: batch at 1, the others at the data's sizes."""
    tensor = value.type.tensor_type
    want = ", ".join(["batch", *(str(d) for d in sample)])
    of = f"{name}={sample[0]}" if len(sample) == 1 else f"{name}={list(sample)}"
    if not tensor.HasField("shape"):
        raise _fail(project, f"{what} {value.name!r} has no declared shape, expected [{want}] ({name} of the data)")
    dims = tensor.shape.dim
    shape = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if (
        len(dims) != 1 + len(sample)
        or static[0] not in (None, 1)
        or any(got not in (None, size) for got, size in zip(static[1:], sample, strict=True))
    ):
        raise _fail(project, f"{what} {value.name!r} has shape [{', '.join(shape)}], expected [{want}] ({of}, the data's)")
    dims[0].Clear()
    dims[0].dim_value = 1
    for dim, got, size in zip(dims[1:], static[1:], sample, strict=True):
        if got is None:
            dim.Clear()
            dim.dim_value = size


def _onnx_logits(model: bytes, x: np.ndarray, *, project: Project | None = None) -> np.ndarray:
    """Float logits of an ONNX model (batch 1) for rows ``x``, one row per run."""
    import onnxruntime as ort

    from edgeops_toolchain.onnx_export import INPUT_NAME

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        rows = [session.run(None, {INPUT_NAME: x[i : i + 1].astype(np.float32)})[0] for i in range(x.shape[0])]
    except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph...)
        if project is None:
            raise
        raise _fail(project, f"onnxruntime cannot run it: {_first_line(exc)}") from exc
    shapes = {np.shape(r) for r in rows}
    if len(shapes) > 1 or any(len(shape) != 2 or shape[0] != 1 for shape in shapes):
        got = list(next(iter(s for s in shapes if len(s) != 2 or s[0] != 1), next(iter(shapes))))
        message = f"returns {got} for one row, whatever its graph declares; expected [1, n_classes]"
        if project is None:
            raise ValueError(message)
        raise _fail(project, message)
    return np.concatenate([np.asarray(r, dtype=np.float32) for r in rows])


def _onnx_parameters(model: bytes) -> int:
    import onnx

    proto = onnx.load_model_from_string(model)
    return int(sum(int(np.prod(i.dims)) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT))
