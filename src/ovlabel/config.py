"""Run configuration: a YAML file validated into typed sections — the one place configs become arguments.

Every section forbids unknown keys; the error names the nearest valid key. Overrides (from the command
line or Python) are dotted keys (``postprocess.threshold.method=otsu``) applied before validation.
``configs/*.yaml`` hold the shipped presets; a config file may ``extends:`` another one (a shipped preset
name or a path), whose values it overrides.

A model brings its preset: a shipped preset names the models it is made for (``for_models:``, shell-style
patterns such as ``ovlabel-shapes`` or ``*SigLIP*``), and :func:`register_model_preset` adds others. When
the configured model has a preset that the config does not already extend, the preset goes between the
defaults and the user's config: the user's files and overrides still win (``--config``, ``--set``, flags).
"""

from __future__ import annotations

import difflib
import os
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError


def _preset_dir() -> Path:
    """``configs/`` of the source tree (editable installs) or the copy installed under ``share/``."""
    source_tree = Path(__file__).resolve().parents[2] / "configs"
    for candidate in (source_tree, Path(sys.prefix) / "share" / "ovlabel" / "configs"):
        if candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parents[2] / "configs"


PRESET_DIR = _preset_dir()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "ViT-B-16"
    pretrained: str | None = "laion2b_s34b_b88k"  # a tag, a checkpoint path, or "none" (random init)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: Literal["torch", "onnx"] = "torch"  # onnx: onnxruntime runs the graphs in onnx_dir
    onnx_dir: str | None = None  # an `ovlabel export-onnx` folder

    @model_validator(mode="after")
    def _onnx_dir(self):
        if self.backend == "onnx" and not self.onnx_dir:
            raise ValueError("backend 'onnx' needs model.onnx_dir (--onnx-dir DIR), a folder made by "
                             "ovlabel export-onnx")
        return self


class ExplainerConfig(_Section):
    method: str = "legrad"
    layers: Union[Literal["all", "last"], int, list[int], None] = None  # noqa: UP007
    chunk_size: int | None = Field(default=None, ge=1)
    empty_prompt: bool = False  # SigLIP correction: suppress what "a photo of a" lights up
    contrast: Literal["none", "mean", "max"] = "none"  # legrad: explain t_k·e − agg(background prompts ·e)
    shifts: int = Field(default=1, ge=1, le=4)  # s > 1: average maps over s×s sub-patch offsets of the input


class TileConfig(_Section):
    enabled: bool = False
    min_scale: float = Field(default=2.0, gt=1.0)  # tile images whose long side exceeds min_scale × size
    overlap: float = Field(default=0.25, ge=0.0, lt=0.9)


class PreprocessConfig(_Section):
    size: int = Field(default=448, ge=16)
    resize: Literal["longest", "shortest"] = "longest"
    mean: list[float] | None = None  # default: the model's own preprocessing config
    std: list[float] | None = None
    tile: TileConfig = TileConfig()

    @field_validator("mean", "std")
    @classmethod
    def _three_channels(cls, v, info):
        if v is not None:
            if len(v) != 3:
                raise ValueError(f"{info.field_name} needs 3 values (R, G, B), got {len(v)}")
            if info.field_name == "std" and min(v) <= 0:
                raise ValueError("std values must be positive")
        return v


class QueriesConfig(_Section):
    names: list[str] = []
    templates: Union[Literal["imagenet", "single"], list[str]] = "single"  # noqa: UP007
    synonyms: dict[str, list[str]] = {}
    background: list[str] = []
    negatives: list[str] = []

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("templates is an empty list; give at least one template such as 'a photo of a {}.'")
            bad = [t for t in v if "{}" not in t]
            if bad:
                raise ValueError(f"templates {bad} have no '{{}}' slot for the class name")
        return v


class ThresholdConfig(_Section):
    method: Literal["fixed", "mean", "otsu", "quantile", "max_fraction"] = "max_fraction"
    value: float | None = 0.5

    @model_validator(mode="after")
    def _value(self):
        if self.method in ("fixed", "quantile", "max_fraction") and self.value is None:
            raise ValueError(f"threshold method '{self.method}' needs a value")
        return self


class RefineConfig(_Section):
    method: Literal["none", "superpixels", "pamr", "crf"] = "none"
    superpixels: Literal["felzenszwalb", "slic"] = "felzenszwalb"
    segments: int = Field(default=250, ge=2)  # SLIC: about this many superpixels
    compactness: float = Field(default=10.0, gt=0)  # SLIC: colour vs space
    scale: float = Field(default=100.0, gt=0)  # Felzenszwalb: larger, larger segments
    iterations: int = Field(default=10, ge=1)  # PAMR and CRF
    dilations: list[int] = [1, 2, 4, 8, 12, 24]  # PAMR
    max_side: int = Field(default=1024, ge=16)  # larger images are refined at this size


class PostprocessConfig(_Section):
    threshold: ThresholdConfig = ThresholdConfig()
    refine: RefineConfig = RefineConfig()
    class_thresholds: dict[str, ThresholdConfig] = {}
    instances: Literal["components", "class"] = "components"
    min_area: int = Field(default=16, ge=0)
    min_area_fraction: float = Field(default=0.005, ge=0.0, le=1.0)
    opening: int = Field(default=0, ge=0)
    closing: int = Field(default=0, ge=0)
    fill_holes: bool = True
    presence: Literal["auto", "softmax", "binary", "sigmoid"] = "auto"
    presence_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    score_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=0)
    nms: Literal["mask", "box"] | None = None
    nms_iou: float = Field(default=0.5, ge=0.0, le=1.0)


class ExportConfig(_Section):
    segmentation: Literal["rle", "polygon"] = "rle"
    heatmaps: bool = False
    overlays: bool = False
    masks: Literal["instance", "semantic"] | None = None  # shorthand for formats: [masks-instance|semantic]
    formats: list[str] = []  # names of ovlabel.export.formats' registry (checked there, before any work)
    dataset_min_score: float = Field(default=0.05, ge=0.0, le=1.0)  # dataset.json (and formats) keep scores >= this
    dataset_class_iou: float | None = Field(default=0.5, gt=0.0, le=1.0)  # one mask, one class (null: off)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)  # YOLO datasets: images in val/ (by a hash of the id)
    copy_images: bool = False  # YOLO datasets: hard links (or copies) instead of relative symbolic links

    @property
    def all_formats(self) -> list[str]:
        return formats_of(self.model_dump())


def formats_of(export: dict) -> list[str]:
    """The dataset formats an ``export`` section asks for: ``formats`` with the ``masks`` shorthand added."""
    formats = list(export.get("formats") or [])
    masks = export.get("masks")
    return ([f"masks-{masks}"] if masks and f"masks-{masks}" not in formats else []) + formats


MAX_PIXELS = 178_956_970  # the decompression-bomb guard: Pillow's error threshold (2 × its MAX_IMAGE_PIXELS)
MAX_ASPECT_RATIO = 20.0  # longer side / shorter side of an image a run takes


class RunConfig(_Section):
    batch_size: int = Field(default=4, ge=1)
    workers: int = Field(default=2, ge=0)
    strict: bool = False
    progress: bool = True
    max_pixels: int = Field(default=MAX_PIXELS, ge=1)  # images (and heatmap caches' sizes) above it are refused
    max_aspect_ratio: float = Field(default=MAX_ASPECT_RATIO, ge=1.0)  # longer side / shorter side; beyond: refused


class Config(_Section):
    extends: str | None = None
    calibration: dict[str, Any] | None = None  # written by `ovlabel calibrate` (its search and figures)
    model: ModelConfig = ModelConfig()
    explainer: ExplainerConfig = ExplainerConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    queries: QueriesConfig = QueriesConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    export: ExportConfig = ExportConfig()
    run: RunConfig = RunConfig()
    _model_preset: str | None = PrivateAttr(default=None)

    @property
    def model_preset(self) -> str | None:
        """The preset the model brought (put under the user's config by :func:`load_config`), or ``None``."""
        return self._model_preset


# --------------------------------------------------------------------------------------------- loading
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


# ------------------------------------------------------------------------------------- bounded YAML
MAX_YAML_BYTES = 16 * 2**20  # a config or run file larger than this is refused unread
MAX_YAML_VALUES = 200_000  # values a document may expand to, aliases counted as what they stand for


def read_text_file(path: str | Path, what: str, *, limit: int = MAX_YAML_BYTES, error: type = ConfigError) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes. FIFOs, devices (``/dev/zero``) and
    folders are refused without being read, so that a bad path can neither block nor fill the memory."""
    import os
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a folder, FIFO or device); expected a YAML file")
    if st.st_size > limit:
        raise error(f"{what} {path} is {st.st_size / 2**20:.1f} MiB, more than the limit of {limit / 2**20:.0f} MiB "
                    "for a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if len(raw) > limit:
        raise error(f"{what} {path} is larger than the limit of {limit / 2**20:.0f} MiB for a YAML file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def parse_yaml(text: str, source: str, *, error: type = ConfigError, max_values: int = MAX_YAML_VALUES) -> Any:
    """``yaml.safe_load`` with bounded work: the document is composed first, and refused when its values,
    aliases expanded, number more than ``max_values`` (an alias bomb of a few hundred bytes stands for
    billions of values) or when an alias refers to itself."""
    try:
        return _load_bounded(text, source, error, max_values)
    except yaml.YAMLError as e:
        raise error(f"{source} is not valid YAML: {e}") from None


def _load_bounded(text: str, source: str, error: type, max_values: int = MAX_YAML_VALUES) -> Any:
    """:func:`parse_yaml` letting ``yaml.YAMLError`` through (for callers that fall back on the text)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node, source, error, max_values)
        return loader.construct_document(node)
    except RecursionError:
        raise error(f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _count_values(root: yaml.Node, source: str, error: type, limit: int) -> int:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise error(f"{source}: a YAML alias refers to a value that contains it (a recursive document)")
        open_nodes.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(v) for v in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if n > limit:
            raise error(f"{source}: the YAML document expands to more than {limit:,} values (aliases counted as "
                        "what they stand for); refused as a YAML alias bomb")
        sizes[key] = n
        return n

    return size(root)


MAX_EXTENDS = 16  # a chain of ``extends:`` longer than this (or a loop) is refused
_FILE_ONLY_KEYS = ("extends", "for_models")  # keys of a config file that are not settings
Layer = tuple[str, dict]  # (the file's resolved path, or a label; its own settings)


def _preset_path(source: str | Path) -> Path:
    path = Path(source)
    if not path.exists() and not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
    return path


def _read_file(source: str | Path) -> tuple[Path, dict]:
    path = _preset_path(source)
    if not os.path.lexists(path):
        raise ConfigError(f"config file {source} does not exist; shipped presets: {', '.join(list_presets())}")
    data = parse_yaml(read_text_file(path, "config file"), f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return path, data


def _layers(source: str | Path, seen: tuple[str, ...] = ()) -> list[Layer]:
    """A config file and the files it ``extends``, lowest first, each with only its own settings."""
    path, data = _read_file(source)
    key = str(path.resolve())
    if key in seen or len(seen) >= MAX_EXTENDS:
        raise ConfigError(f"config file {path}: its 'extends' chain loops or is longer than {MAX_EXTENDS} files")
    own = {k: v for k, v in data.items() if k not in _FILE_ONLY_KEYS}
    base = _layers(_resolve_relative(data["extends"], path), (*seen, key)) if data.get("extends") else []
    return [*base, (key, own)]


def _merged(layers: list[Layer]) -> dict:
    data: dict = {}
    for _, own in layers:
        data = deep_merge(data, own)
    return data


def _read_yaml(source: str | Path) -> dict:
    return _merged(_layers(source))


_registered_presets: list[tuple[str, str]] = []  # (model name pattern, preset name or path), newest first


def register_model_preset(pattern: str, preset: str | Path) -> None:
    """Make ``preset`` (a shipped preset's name or a config file) the preset of the models whose name
    matches ``pattern`` (``fnmatch``-style, case-sensitive); later registrations win over earlier ones and
    over the shipped presets' ``for_models``."""
    _read_file(preset)  # fails now, not at the first run, when the file is missing or malformed
    _registered_presets.insert(0, (pattern, str(preset)))


def preset_for_model(name: str) -> str | None:
    """The preset a model brings: a registered one, else the shipped preset whose ``for_models`` matches."""
    for pattern, preset in _registered_presets:
        if fnmatchcase(name, pattern):
            return preset
    for preset in list_presets():
        patterns = _read_file(preset)[1].get("for_models") or []
        if any(fnmatchcase(name, str(p)) for p in (patterns if isinstance(patterns, list) else [patterns])):
            return preset
    return None


def _with_model_preset(layers: list[Layer], overrides) -> tuple[list[Layer], str | None]:
    """``layers`` with the preset of the configured model inserted above the layers the preset itself
    builds on (the defaults) and below the user's, unless the user's config already extends it."""
    model = apply_overrides(_merged(layers), overrides).get("model")
    name = model.get("name") if isinstance(model, dict) else None
    preset = preset_for_model(str(name if name is not None else ModelConfig().name))
    if preset is None:
        return layers, None
    ours = {key for key, _ in layers}
    theirs = _layers(preset)
    if theirs[-1][0] in ours:
        return layers, None
    shared = {key for key, _ in theirs}
    lead = 0
    while lead < len(layers) and layers[lead][0] in shared:
        lead += 1
    return [*layers[:lead], *(layer for layer in theirs if layer[0] not in ours), *layers[lead:]], preset


def _resolve_relative(ref: str, origin: Path) -> str | Path:
    candidate = origin.parent / ref
    return candidate if candidate.exists() else ref


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str | tuple[str, Any]) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], YAML-parsed value). A ``(key, value)`` pair is taken verbatim
    (what command-line flags that name a path or a name give: never parsed as YAML)."""
    if isinstance(item, tuple):
        key, value = item
        return str(key).split("."), value
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = _load_bounded(raw, f"override {key.strip()}", ConfigError) if raw != "" else None
    except yaml.YAMLError:  # not YAML: the text itself
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: dict | list[str | tuple[str, Any]] | None) -> dict:
    """Dotted overrides on a config mapping: ``KEY=VALUE`` strings (the value parsed as YAML, as ``--set``
    does), ``(KEY, value)`` pairs (verbatim) or a ``{KEY: value}`` dict (verbatim)."""
    if not overrides:
        return data
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else \
        [(k.split("."), v) for k, v in overrides.items()]
    data = dict(data)
    for keys, value in items:
        node = data
        for k in keys[:-1]:
            node[k] = dict(node.get(k) or {})
            node = node[k]
        node[keys[-1]] = value
    return data


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(x) for x in loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(str(x) for x in loc[:-1] + (near[0],))}'?" if near else ""
            lines.append(f"unknown key '{where}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError(f"invalid config ({source}):\n  " + "\n  ".join(lines))


def load_config(source: str | Path | dict | Config | None = None,
                overrides: dict | list[str] | None = None, *, model_preset: bool = True) -> Config:
    """A validated :class:`Config` from a preset name, a YAML path, a dict or nothing (the default
    preset), with dotted ``overrides`` applied on top. With ``model_preset`` (and a source that is not a
    :class:`Config`), the configured model's preset goes under the source (see the module's docstring);
    ``False`` reads a complete config as it is (a run's ``run.yaml``)."""
    preset = None
    if isinstance(source, Config):
        data, name = source.model_dump(), "config object"
        preset = source.model_preset
    else:
        if isinstance(source, dict):
            name = "dict"
            own = {k: v for k, v in source.items() if k not in _FILE_ONLY_KEYS}
            layers = [*(_layers(source["extends"]) if source.get("extends") else []), ("<dict>", own)]
        else:
            name = str(source or "default")
            layers = _layers(source or "default")
        if model_preset:
            layers, preset = _with_model_preset(layers, overrides)
        data = _merged(layers)
    data = apply_overrides(data, overrides)
    data.pop("extends", None)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise _explain(e, name) from None
    cfg._model_preset = preset
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(exclude={"extends"}), sort_keys=False, allow_unicode=True)
