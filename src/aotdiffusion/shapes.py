"""The static shapes a pipeline is compiled for, and the batch each component really sees."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PipelineShapes:
    """What the user asked to compile for, in the user's own units (prompts, pixels).

    Every component's static input shape is derived from these numbers, so they are the single
    source of truth for both export and the call-time checks.
    """

    batch_size: int = 1
    height: int = 512
    width: int = 512
    num_images_per_prompt: int = 1
    # Classifier-free guidance runs the UNet on the negative and positive halves in one batch, so a
    # UNet compiled for guidance sees twice the images. LCM and Turbo models run without it.
    classifier_free_guidance: bool = True
    # Compile the UNet for one half of the guidance batch: it runs the negative and the positive half
    # one after the other, or side by side on two replicas (data_parallel_mode="unet").
    split_guidance_batch: bool = False
    sequence_length: int = 77
    # Copies of the latents in the guidance batch: 2 (negative, positive); InstructPix2Pix guides by the text
    # and by the input image, and runs 3 (text and image, image only, neither).
    guidance_copies: int = 2

    def __post_init__(self) -> None:
        if self.split_guidance_batch and not self.classifier_free_guidance:
            raise ValueError("`split_guidance_batch` splits the guidance batch; it needs classifier-free guidance on.")
        if self.guidance_copies not in (2, 3):
            raise ValueError(
                f"`guidance_copies` is 2 (classifier-free guidance) or 3 (InstructPix2Pix), got "
                f"{self.guidance_copies!r}."
            )
        if self.split_guidance_batch and self.guidance_copies != 2:
            raise ValueError("`split_guidance_batch` splits a guidance batch of two halves; this model's has three.")
        for name in ("batch_size", "num_images_per_prompt", "height", "width", "sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

    def check_divisible(self, vae_scale_factor: int, unet_downsampling: int) -> None:
        """Height and width must map onto whole latent pixels at every UNet resolution level."""
        multiple = vae_scale_factor * unet_downsampling
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise ValueError(
                    f"`{name}` has to be divisible by {multiple} for this model (VAE scale factor "
                    f"{vae_scale_factor} x UNet downsampling {unet_downsampling}) but is {value}. "
                    f"Use --{name} {lower} or --{name} {lower + multiple}."
                )

    @property
    def images(self) -> int:
        """Images produced per call: the batch of the VAE decoder."""
        return self.batch_size * self.num_images_per_prompt

    @property
    def unet_batch(self) -> int:
        doubled = self.classifier_free_guidance and not self.split_guidance_batch
        return self.images * (self.guidance_copies if doubled else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PipelineShapes:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
