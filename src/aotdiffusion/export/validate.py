"""Compiled against eager: the same random inputs through both, compared output by output."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.compiled import CompiledComponent
from .components import ComponentSpec
from .precision import Precision


class ValidationError(RuntimeError):
    """A compiled component whose outputs differ from eager PyTorch beyond the precision's tolerance."""


@dataclass
class ValidationReport:
    component: str
    max_abs_error: float
    max_rel_error: float  # largest absolute error over the largest absolute reference value
    tolerance: float
    worst_output: str

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict:
        return {
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "worst_output": self.worst_output,
            "passed": self.passed,
        }


@dataclass
class Reference:
    """Eager fp32 outputs for a set of inputs, computed before compiling: validation then needs only the compiled
    component in memory, not the eager model beside it (full-size SD 1.5's fp32 UNet: 3.4 GB)."""

    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


def eager_reference(
    spec: ComponentSpec, *, seed: int = 1, inputs: dict[str, torch.Tensor] | None = None, device: str = "cpu"
) -> Reference:
    """Runs eager ``spec.module`` (fp32) on ``inputs``, or on fresh random inputs (not the tracing example)."""
    inputs = dict(inputs) if inputs is not None else spec.example_inputs(seed)
    with torch.no_grad():
        outputs = spec.module(*(t.to(device) for t in inputs.values()))
    return Reference(inputs, tuple(o.detach() for o in outputs))


def validate_component(
    spec: ComponentSpec,
    compiled: CompiledComponent,
    precision: Precision,
    *,
    seed: int = 1,
    tolerance: float | None = None,
    describe: str | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
    reference: Reference | None = None,
) -> ValidationReport:
    """Runs eager fp32 and the compiled graph on fresh random inputs (not the tracing example).

    ``tolerance`` and ``describe`` replace the precision's own (an int8 graph has a wider one), ``inputs``
    the random ones, and ``reference`` (:func:`eager_reference`, computed earlier) the eager run.
    Raises :class:`ValidationError` naming the component and its errors when the tolerance is exceeded.
    """
    if reference is None:
        reference = eager_reference(spec, seed=seed, inputs=inputs, device=compiled.device)
    inputs, expected = reference.inputs, reference.outputs
    actual = compiled(**inputs)
    tolerance = precision.tolerance if tolerance is None else tolerance
    describe = describe or precision.describe()
    worst = ValidationReport(spec.name, 0.0, 0.0, tolerance, spec.output_names[0])
    for name, ref in zip(spec.output_names, expected):
        got = actual[name].to(ref.device, ref.dtype)
        if got.shape != ref.shape:
            raise ValidationError(
                f"{spec.name}: output `{name}` has shape {tuple(got.shape)}, eager {tuple(ref.shape)}."
            )
        if not torch.isfinite(got).all():
            raise ValidationError(
                f"{spec.name}: output `{name}` has NaN/inf values in {describe} (eager has none: "
                f"{bool(torch.isfinite(ref).all())}). The model overflows in this precision; export with "
                "--auto-cast-type bf16 or --auto-cast none."
            )
        abs_err = (got - ref).abs().max().item()
        rel_err = abs_err / max(ref.abs().max().item(), 1e-12)
        if rel_err >= worst.max_rel_error:
            worst = ValidationReport(spec.name, abs_err, rel_err, tolerance, name)
    if not worst.passed:
        raise ValidationError(
            f"{spec.name} does not match eager PyTorch: output `{worst.worst_output}` max abs error "
            f"{worst.max_abs_error:.3g}, relative error {worst.max_rel_error:.3g} > tolerance {worst.tolerance:g} "
            f"for {describe}. The compiled artifact is wrong; report it with the versions in "
            f"{compiled.folder}/config.json, or export with --disable-validation to inspect it."
        )
    return worst
