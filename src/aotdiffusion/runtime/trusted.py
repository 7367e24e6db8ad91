"""The only Python classes an exported folder may make us import: an allow-list, checked before any import.

A manifest is data from a folder that may have been downloaded. It names a few classes the runtime
rebuilds (the text encoder's output class, CLIP's final LayerNorm, the scheduler and tokenizers).
Importing whatever it names and calling it with the arguments it lists would let a crafted
``config.json`` run ``os.system`` or ``subprocess.Popen`` on load, so every name is checked against
what exports really contain, and nothing is imported or called otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..artifact import ArtifactError

# What `export/components.py` records as a CLIP text encoder's output class (with and without projection).
OUTPUT_CLASSES = frozenset(
    {
        "transformers.modeling_outputs.BaseModelOutputWithPooling",
        "transformers.modeling_outputs.BaseModelOutputWithPoolingAndProjection",
        "transformers.models.clip.modeling_clip.CLIPTextModelOutput",
    }
)
# Small eager modules saved beside a graph, with the constructor arguments each may receive.
EXTRA_STATE_CLASSES: dict[str, frozenset[str]] = {
    "torch.nn.modules.normalization.LayerNorm": frozenset({"normalized_shape", "eps"}),
}
# Parts saved by their own library (model_index.json entries [library, class]): the library, and the
# base classes whose subclasses it may name. Classes are looked up on the library's top-level namespace
# only, so no module the manifest names is ever imported.
SAVED_PART_BASES: dict[str, tuple[str, ...]] = {
    "diffusers": ("SchedulerMixin",),
    "transformers": ("PreTrainedTokenizerBase", "ImageProcessingMixin", "FeatureExtractionMixin"),
}

# Text encoders a LoRA may adapt on a loaded pipeline (pipelines/lora.py rebuilds them, hollow, from their config).
# The models a LoRA on a loaded export may adapt (rebuilt hollow from their config), by library.
ADAPTABLE_MODELS = {
    "transformers": frozenset({"CLIPTextModel", "CLIPTextModelWithProjection"}),
    "diffusers": frozenset({"SD3Transformer2DModel"}),
}


def _import(qualified: str) -> Any:
    module_name, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def output_class(qualified: str, where: str) -> type:
    if qualified not in OUTPUT_CLASSES:
        raise ArtifactError(
            f"{where} names the output class {qualified!r}, which no aotdiffusion export contains; refusing to "
            f"import it. Allowed: {', '.join(sorted(OUTPUT_CLASSES))}. Export the model again with aotdiffusion."
        )
    return _import(qualified)


def extra_state_module(qualified: str, args: Any, where: str) -> Any:
    allowed_args = EXTRA_STATE_CLASSES.get(qualified)
    if allowed_args is None:
        raise ArtifactError(
            f"{where} names the module class {qualified!r}, which no aotdiffusion export contains; refusing to "
            f"import it. Allowed: {', '.join(sorted(EXTRA_STATE_CLASSES))}. Export the model again with aotdiffusion."
        )
    if not isinstance(args, dict) or not set(args) <= allowed_args:
        raise ArtifactError(
            f"{where} gives {qualified} the arguments {args!r}; only {sorted(allowed_args)} are accepted. "
            "Export the model again with aotdiffusion."
        )
    return _import(qualified)(**args)


def saved_part_class(library: Any, class_name: Any, where: str) -> type:
    """The class of a scheduler/tokenizer entry ``[library, class_name]`` of model_index.json."""
    bases = SAVED_PART_BASES.get(library) if isinstance(library, str) else None
    if bases is None or not isinstance(class_name, str) or not class_name.isidentifier():
        raise ArtifactError(
            f"{where} names the part [{library!r}, {class_name!r}]; an export only holds schedulers (diffusers) and "
            "tokenizers or image processors (transformers). Refusing to import it; export the model again."
        )
    package = importlib.import_module(library)
    found = getattr(package, class_name, None)
    allowed = tuple(getattr(package, base) for base in bases)
    if not (isinstance(found, type) and issubclass(found, allowed)):
        raise ArtifactError(
            f"{where} names {library}.{class_name}, which is not a {' or '.join(bases)} of {library}; refusing "
            "to use it. Export the model again."
        )
    return found


def adaptable_model_class(library: Any, class_name: Any, where: str) -> type:
    """The model class of a model_index.json entry ``[library, class_name]`` (a CLIP text encoder, SD3's
    transformer), for LoRA on a loaded export."""
    if not isinstance(library, str) or class_name not in ADAPTABLE_MODELS.get(library, ()):
        allowed = "; ".join(f"{', '.join(sorted(names))} of {lib}" for lib, names in ADAPTABLE_MODELS.items())
        raise ArtifactError(
            f"{where} names the model [{library!r}, {class_name!r}]; a LoRA adapts only {allowed}. Refusing to "
            "import it."
        )
    return getattr(importlib.import_module(library), class_name)
