"""OpenVINO as the peer baseline: the same graphs as our export, converted and compiled by OpenVINO.

optimum-intel runs Stable Diffusion by converting each component with ``openvino.convert_model``,
reshaping it to static shapes and compiling it for the CPU with the default precision hint (bf16 where
the CPU has bf16 instructions). This does the same over our component graphs, so both sides compute
exactly the same functions, and presents the result through the runtime's diffusers shims.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict

from ..export.components import ComponentSpec
from ..runtime import trusted


class OpenVINOComponent:
    """An OpenVINO compiled model with the interface of :class:`~aotdiffusion.runtime.compiled.CompiledComponent`."""

    device = torch.device("cpu")

    def __init__(
        self,
        spec: ComponentSpec,
        *,
        precision_hint: str | None = None,
        int8_calibration: list[dict[str, torch.Tensor]] | None = None,
    ):
        import openvino as ov

        self.name = self.folder = f"openvino:{spec.name}"
        self.config = FrozenDict(spec.config)
        self.static = spec.static
        self.output_names = spec.output_names
        self._output_class = spec.output_class
        self._extra_state = spec.extra_state
        example = spec.example_inputs()
        self.inputs = [{"name": k, "shape": list(v.shape)} for k, v in example.items()]
        with torch.no_grad():
            # Static shapes from the start (optimum-intel reshapes to them): no dynamic dimension left.
            model = ov.convert_model(
                spec.module, example_input=tuple(example.values()), input=[tuple(v.shape) for v in example.values()]
            )
        if int8_calibration:
            model = hybrid_int8(model, int8_calibration)
        config = {} if precision_hint is None else {"INFERENCE_PRECISION_HINT": precision_hint}
        self._compiled = ov.Core().compile_model(model, "CPU", config)
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self.manifest = {"precision": {"openvino_inference_precision": self.precision}}
        self._request = self._compiled.create_infer_request()

    def input_shape(self, name: str) -> tuple[int, ...]:
        return next(tuple(spec["shape"]) for spec in self.inputs if spec["name"] == name)

    def __call__(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        arrays = []
        for spec in self.inputs:
            tensor = tensors[spec["name"]]
            if list(tensor.shape) != spec["shape"]:
                raise ValueError(
                    f"{self.name} takes `{spec['name']}` of shape {spec['shape']}, got {list(tensor.shape)}."
                )
            arrays.append(np.ascontiguousarray(tensor.detach().cpu().numpy()))
        results = self._request.infer(arrays)
        outputs = [torch.from_numpy(np.array(results[out])) for out in self._compiled.outputs]
        return dict(zip(self.output_names, outputs))

    def load_extra_state(self, name: str) -> torch.nn.Module | None:
        return self._extra_state.get(name)

    def output_class(self) -> type | None:
        return trusted.output_class(self._output_class, self.name) if self._output_class else None


def hybrid_int8(model: Any, calibration: list[dict[str, torch.Tensor]]) -> Any:
    """optimum-intel's hybrid int8 for Stable Diffusion UNets, through NNCF: int8 weights on every MatMul
    (weight-only), then post-training quantization (int8 weights and activations) of the rest, the
    convolutions, calibrated on ``calibration`` with the compressed MatMuls left alone."""
    import nncf

    matmuls = [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "MatMul" and any(_is_weight(op.input_value(i).get_node()) for i in range(2))
    ]
    compressed = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(types=["Convolution"])
    )
    dataset = nncf.Dataset([tuple(t.numpy() for t in inputs.values()) for inputs in calibration])
    return nncf.quantize(
        compressed,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
        subset_size=len(calibration),
        advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1),
    )


def _is_weight(node: Any) -> bool:
    """A constant, possibly behind the Convert/Transpose OpenVINO's conversion puts in front of it."""
    while node.get_type_name() in ("Convert", "Transpose", "Reshape") and node.get_input_size():
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def openvino_parts(
    pipe: Any, shapes: Any, *, precision_hint: str | None = None, int8_unet: bool = False
) -> dict[str, Any]:
    """The text encoders, UNet and VAE of ``pipe`` compiled by OpenVINO, as diffusers-facing parts.

    ``int8_unet``: the UNet in NNCF's hybrid int8 (:func:`hybrid_int8`), calibrated on the UNet calls of
    the same built-in prompts aotdiffusion's ``--quantize int8`` records.
    """
    from ..export.pipeline import component_specs
    from ..export.precision import Precision
    from ..export.quantize import record_unet_inputs
    from ..runtime.components import AOTAutoencoderKL, AOTTextEncoder, AOTUNet

    parts: dict[str, Any] = {}
    for spec in component_specs(pipe, shapes, Precision("none"), vae_encoder=False):
        calibration = None
        if int8_unet and spec.role == "unet":
            calibration = record_unet_inputs(pipe, list(spec.example_inputs()), shapes)
        component = OpenVINOComponent(spec, precision_hint=precision_hint, int8_calibration=calibration)
        if spec.role == "text_encoder":
            parts[spec.name] = AOTTextEncoder(component)
        elif spec.role == "unet":
            parts["unet"] = AOTUNet(component)
        else:
            parts["vae"] = AOTAutoencoderKL(component)
    return parts
