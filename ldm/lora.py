"""LoRA / LoCon files (kohya sd-scripts and AUTOMATIC1111 format) merged into a loaded model, undoably.

As AUTOMATIC1111's extensions-builtin/Lora (networks.py convert_diffusers_name_to_compvis, load_network,
network_apply_weights; network.py NetworkModule; network_lora.py NetworkModuleLora; lyco_helpers.py):

- A file holds, per module, `<name>.lora_down.weight` [r, in] or [r, in, kh, kw] (LoCon: the conv's own kernel),
  `<name>.lora_up.weight` [out, r] or [out, r, 1, 1], optional `<name>.alpha` (absent: scale 1, i.e. alpha = r),
  optional `<name>.lora_mid.weight` (LoCon's CP decomposition) or `scale`; peft's `lora_A` / `lora_B` are read as
  down / up. `<name>` is `lora_unet_` + the diffusers UNet module path or `lora_te_` + the transformers CLIP text
  path, with `.` -> `_`.
- Names map onto OUR module paths, which are the original checkpoint's, by A1111's rules (RULES below) followed by
  a lookup in the model's own module names with `.` -> `_` (`layer_names`): a derived table, not a list. SD 2's
  OpenCLIP tower packs q/k/v into one `attn.in_proj_weight`: `..._self_attn_{q,k,v}_proj` update its rows
  [0:w], [w:2w], [2w:3w] (A1111's re_x_proj fallback).
- The update, in float32: updown = reshape(up.reshape(out, r) @ down.reshape(r, -1), W.shape), then
  `updown * (alpha / r) * multiplier` (that order, as finalize_updown), multiplier = the LoRA's scale for the
  UNet or for the text encoder ('transformer' in the first 20 characters of A1111's layer name);
  W' = (W.float() + updown).to(W.dtype), several LoRAs one after another in the order given.
- Undoable: loaded weights may be views of the checkpoint file, so nothing is written in place; a patched weight is
  a new Parameter and the original tensor is kept to put back (`activate(model, [])`).

Every key of a file is used or reported: keys that match no module are a warning (A1111 prints them), a file
none of whose keys match, or whose shapes do not fit, is an error (a LoRA for another model), as are module types
this file does not implement (LoHa, LoKr, IA3, full, DoRA).

(Longer than the house's ~350 lines: file reading, name rules, the plan and the undoable merge are one concept,
read together when a LoRA does not load as expected.)
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

EXTENSIONS = (".safetensors", ".pt", ".ckpt")  # the order A1111's Lora folder listing and --lora_dir try
TEXT_PREFIX, UNET_PREFIX = "cond_stage_model.", "model."


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model (one line: file and reason)."""


# ------------------------------------------------------------------------------------------ the name rules
# kohya / diffusers module name -> A1111's "compvis" name (the model's module path with `.` -> `_`), as
# networks.py convert_diffusers_name_to_compvis. Each rule: (regex, function of the match groups).
RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}


def _suffix(kind: str, name: str) -> str:
    return RESNET_SUFFIX.get(name, name) if kind == "resnets" else name


def _text_sd2(layer: int, rest: str) -> str:
    # transformers CLIP layer names -> open_clip's (mlp.fc1 -> mlp.c_fc, mlp.fc2 -> mlp.c_proj, self_attn -> attn)
    if "mlp_fc1" in rest:
        return f"model_transformer_resblocks_{layer}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
    if "mlp_fc2" in rest:
        return f"model_transformer_resblocks_{layer}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
    return f"model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"


RULES = (
    (r"lora_unet_conv_in(.*)", lambda g, sd2: f"diffusion_model_input_blocks_0_0{g[0]}"),
    (r"lora_unet_conv_out(.*)", lambda g, sd2: f"diffusion_model_out_2{g[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda g, sd2: f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"),
    # down_blocks_B_{attentions,resnets}_J -> input_blocks.(1 + 3B + J).{1,0}
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g, sd2: f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_"
                    f"{_suffix(g[1], g[3])}"),
    # mid_block_attentions_0 -> middle_block.1, mid_block_resnets_J -> middle_block.(2J)
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda g, sd2: f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_{_suffix(g[0], g[2])}"),
    # up_blocks_B_{attentions,resnets}_J -> output_blocks.(3B + J).{1,0}
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g, sd2: f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_"
                    f"{_suffix(g[1], g[3])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda g, sd2: f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"),
    # the first up block has no attention, so its upsampler is the block's second entry, later ones the third
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda g, sd2: f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
     lambda g, sd2: _text_sd2(*g) if sd2 else f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"),
)
_RULES = tuple((re.compile(pattern), build) for pattern, build in RULES)
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def convert_name(key: str, is_sd2: bool) -> str:
    """A1111's layer name for a kohya module name (unchanged when no rule applies)."""
    for pattern, build in _RULES:
        match = pattern.match(key)
        if match:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            return build(groups, is_sd2)
    return key


def layer_names(model: nn.Module) -> dict[str, str]:
    """{A1111 layer name: our module path} for every module of the text encoder and the UNet wrapper: the
    module paths with `.` -> `_` (networks.py assign_network_names_to_compvis_modules)."""
    names = {}
    for prefix, root in ((TEXT_PREFIX, model.cond_stage_model), (UNET_PREFIX, model.model)):
        for name, _ in root.named_modules():
            names[name.replace(".", "_")] = prefix + name
    return names


# -------------------------------------------------------------------------------------------------- files
@dataclass(eq=False)
class LoraFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    hash: str  # as A1111: sshs_model_hash, else kohya's hash of a safetensors file's data, else sha256

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def shorthash(self) -> str:
        return self.hash[:12]


def file_hash(path: str) -> str:
    """A1111's LoRA hash: for .safetensors kohya's "addnet" hash (sha256 of the bytes after the header, so
    editing metadata keeps it), else the sha256 of the whole file (modules/hashes.py)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.lower().endswith(".safetensors"):
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lora(path: str | os.PathLike) -> LoraFile:
    from ldm.checkpoint import CheckpointError, read_state_dict

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoraError(f"LoRA not found: {path}")
    try:
        tensors = read_state_dict(path)
    except CheckpointError as e:
        raise LoraError(" ".join(str(e).split())) from None
    metadata = {}
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    return LoraFile(path, tensors, metadata, metadata.get("sshs_model_hash") or file_hash(path))


# --------------------------------------------------------------------------------------------- the plan
UPDOWN_KEYS = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale"}
PEFT_KEYS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


@dataclass
class Patch:
    """One module's update: where it goes and its factors (file tensors, not yet multiplied)."""

    layer: str  # A1111's layer name (decides te / unet)
    target: str  # our parameter path, e.g. model.diffusion_model.out.2.weight
    rows: tuple[int, int] | None  # rows of a packed q/k/v projection, else None (the whole weight)
    weights: dict[str, torch.Tensor]
    source: str = ""  # the file's module name (kohya's)

    @property
    def is_text(self) -> bool:
        return "transformer" in self.layer[:20]  # network.py NetworkModule.multiplier

    def scale(self) -> float:
        if "scale" in self.weights:
            return self.weights["scale"].item()
        if "alpha" in self.weights:
            return self.weights["alpha"].item() / self.weights["lora_down.weight"].shape[0]
        return 1.0

    def updown(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """float32 update for a weight of `shape` (network_lora.py calc_updown, before the multipliers)."""
        up = self.weights["lora_up.weight"].to(device=device, dtype=torch.float32)
        down = self.weights["lora_down.weight"].to(device=device, dtype=torch.float32)
        if "lora_mid.weight" in self.weights:  # CP decomposition (lyco_helpers.rebuild_cp_decomposition)
            mid = self.weights["lora_mid.weight"].to(device=device, dtype=torch.float32)
            out = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.shape[0], -1),
                               down.reshape(down.shape[0], -1))
        else:
            out = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        if len(shape) == 4 and shape[1] == 9 and out.numel() * 9 == shape.numel() * 4:
            # an inpainting UNet's 9-channel input conv takes a 4-channel update, zero-padded (networks.py)
            out = F.pad(out.reshape(shape[0], 4, *shape[2:]), (0, 0, 0, 0, 0, 5))
        if out.numel() != shape.numel():
            raise LoraError(f"{self.layer}: update of {out.numel()} values for a weight of shape {list(shape)}")
        return out.reshape(shape)


@dataclass
class LoraPlan:
    file: LoraFile
    patches: list[Patch] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # keys that match no module (warned)


def _parameter(model: nn.Module, target: str) -> torch.Tensor:
    module_path, _, name = target.rpartition(".")
    return getattr(model.get_submodule(module_path), name)


def plan_lora(model: nn.Module, lora: LoraFile) -> LoraPlan:
    """Map every key of `lora` onto `model` (LoraError for a file that does not fit it)."""
    names = layer_names(model)
    is_sd2 = any(name.startswith("model_transformer_resblocks") for name in names)
    # kohya's metadata says what the file was trained on (network.py NetworkOnDisk.detect_version)
    if str(lora.metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        raise LoraError(f"{lora.path}: an SDXL LoRA (ss_base_model_version "
                        f"{lora.metadata['ss_base_model_version']}); this model is SD {'2' if is_sd2 else '1'}")
    if lora.metadata.get("ss_v2") in ("True", "False") and (lora.metadata["ss_v2"] == "True") != is_sd2:
        raise LoraError(f"{lora.path}: an SD {'2' if lora.metadata['ss_v2'] == 'True' else '1'} LoRA (ss_v2 "
                        f"{lora.metadata['ss_v2']}); this model is SD {'2' if is_sd2 else '1'}")
    grouped: dict[str, tuple[str, dict, str]] = {}
    plan = LoraPlan(lora)
    for key, tensor in lora.tensors.items():
        base, _, part = key.partition(".")
        layer = convert_name(base, is_sd2)
        module = names.get(layer)
        if module is None and (m := _X_PROJ.match(layer)) and m.group(1) in names:
            module = names[m.group(1)]  # a packed q/k/v projection (SD 2's OpenCLIP attention)
        if module is None and "lora_unet" in base:  # files already in compvis naming (networks.py)
            layer = base.replace("lora_unet", "diffusion_model")
            module = names.get(layer)
        elif module is None and "lora_te1_text_model" in base:
            layer = base.replace("lora_te1_text_model", "transformer_text_model")
            module = names.get(layer)
        if module is None or not part:
            plan.unmatched.append(key)
            continue
        grouped.setdefault(layer, (module, {}, base))[1][PEFT_KEYS.get(part, part)] = tensor
    if not grouped:
        raise LoraError(f"{lora.path}: none of its {len(lora.tensors)} keys matches a module of this model "
                        f"(a LoRA for another architecture?), e.g. {next(iter(lora.tensors), '')}")
    for layer, (module, weights, source) in grouped.items():
        unknown = sorted(set(weights) - UPDOWN_KEYS)
        if unknown or not {"lora_up.weight", "lora_down.weight"} <= set(weights):
            raise LoraError(f"{lora.path}: {layer} has keys {', '.join(sorted(weights))}; only LoRA / LoCon "
                            "(lora_up, lora_down, alpha, lora_mid) is supported")
        rows, target = None, None
        m = _X_PROJ.match(layer)
        if m and names.get(layer) is None:
            width = _parameter(model, module + ".in_proj_weight").shape[1]
            index = "qkv".index(m.group(2)[0])
            rows, target = (index * width, (index + 1) * width), module + ".in_proj_weight"
        else:
            target = module + ".weight"
        try:
            weight = _parameter(model, target)
        except AttributeError:
            raise LoraError(f"{lora.path}: {layer} matches {module}, which has no weight") from None
        patch = Patch(layer, target, rows, weights, source)
        shape = weight.shape if rows is None else torch.Size((rows[1] - rows[0], weight.shape[1]))
        try:
            patch.updown(shape, torch.device("meta"))
        except (LoraError, RuntimeError) as e:
            raise LoraError(f"{lora.path}: {layer} does not fit {target} {list(shape)} (a LoRA for another "
                            f"architecture?): {' '.join(str(e).split())}") from None
        plan.patches.append(patch)
    return plan


# ----------------------------------------------------------------------------------------- merge and undo
@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file, the text-encoder and UNet multipliers, and the name the prompt or the
    command line gave it (A1111's mentioned_name, written into `Lora hashes`)."""

    path: str
    te: float = 1.0
    unet: float = 1.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or os.path.splitext(os.path.basename(self.path))[0]


def parse_lora_arg(text: str) -> LoraSpec:
    """`PATH[:SCALE]`: split at the last ':' only when what follows parses as a float (Windows drive letters
    and colons in names stay in the path); SCALE multiplies both the UNet and the text-encoder parts."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return LoraSpec(text)
        return LoraSpec(path, scale, scale)
    return LoraSpec(text)


@dataclass
class _State:
    originals: dict[str, nn.Parameter] = field(default_factory=dict)  # target -> the loaded parameter
    active: tuple = ()
    plans: dict[str, LoraPlan] = field(default_factory=dict)  # path -> plan (files read once)


def _state(model: nn.Module) -> _State:
    state = model.__dict__.get("_lora_state")
    if state is None:
        state = model.__dict__["_lora_state"] = _State()
    return state


def load_plan(model: nn.Module, path: str) -> LoraPlan:
    """The plan of the file at `path` for `model` (read and mapped once per model); warns about unmatched keys."""
    state = _state(model)
    if path not in state.plans:
        plan = plan_lora(model, read_lora(path))
        if plan.unmatched:
            warnings.warn(f"{path}: {len(plan.unmatched)} of {len(plan.file.tensors)} keys match no module of "
                          f"this model and are ignored (first: {', '.join(plan.unmatched[:3])})", stacklevel=2)
        state.plans[path] = plan
    return state.plans[path]


def _set(model: nn.Module, target: str, value: nn.Parameter) -> None:
    module_path, _, name = target.rpartition(".")
    setattr(model.get_submodule(module_path), name, value)


@torch.no_grad()
def activate(model: nn.Module, specs) -> list[LoraPlan]:
    """Merge the LoRAs `specs` (LoraSpec, in order) into `model`'s weights, after undoing whatever was merged
    before; `activate(model, [])` restores the loaded weights. Nothing happens when `specs` is what is active
    (A1111's network_current_names). Returns the plans of the active files."""
    specs = tuple(specs)
    state = _state(model)
    plans = [load_plan(model, spec.path) for spec in specs]
    if specs == state.active:
        return plans
    for target, original in state.originals.items():
        _set(model, target, original)
    state.originals.clear()
    state.active = ()
    for spec, plan in zip(specs, plans):
        for patch in plan.patches:
            weight = _parameter(model, patch.target)
            state.originals.setdefault(patch.target, weight)
            rows = slice(None) if patch.rows is None else slice(*patch.rows)
            part = weight[rows]
            updown = patch.updown(part.shape, weight.device)
            updown = updown * patch.scale() * (spec.te if patch.is_text else spec.unet)
            merged = (part.to(updown.dtype) + updown).to(weight.dtype)
            if patch.rows is not None:
                merged = torch.cat([weight[:rows.start], merged, weight[rows.stop:]])
            _set(model, patch.target, nn.Parameter(merged, requires_grad=weight.requires_grad))
    state.active = specs
    return plans


def active(model: nn.Module) -> tuple:
    """The LoraSpecs merged into `model` now."""
    return _state(model).active


def resolve_tag(name: str, lora_dir: str | os.PathLike) -> str:
    """DIR/NAME.safetensors, else .pt, else .ckpt (what A1111 finds for `<lora:NAME>` in its Lora folder)."""
    for ext in EXTENSIONS:
        path = os.path.join(lora_dir, name + ext)
        if os.path.isfile(path):
            return path
    raise LoraError(f"<lora:{name}>: no {name}.safetensors, .pt or .ckpt in {os.fspath(lora_dir)}")


def for_prompt(prompt: str, syntax: str = "plain", loras=(), lora_dir: str | os.PathLike | None = None) -> list:
    """The LoraSpecs of a batch whose first prompt is `prompt`: with the a1111 syntax its `<lora:...>` tags
    (looked up in `lora_dir`), then `loras` (the command line's --lora, A1111's "additional" network)."""
    specs = []
    if syntax == "a1111":
        from ldm.prompts import LORA_TAGS, parse_extra_networks

        for tag in parse_extra_networks(prompt)[1]:
            if tag.kind not in LORA_TAGS:
                warnings.warn(f"skipping unknown extra network <{tag.kind}:...> (only <lora:...> is implemented)",
                              stacklevel=2)
                continue
            if not tag.positional:
                raise LoraError(f"<{tag.kind}:...> tag without a LoRA name in {prompt!r}")
            if lora_dir is None:
                raise LoraError(f"the prompt tag <{tag.kind}:{tag.positional[0]}> needs a LoRA directory (--lora_dir)")
            try:
                te, unet = tag.lora_multipliers()
            except ValueError:
                raise LoraError(f"<{tag.kind}:{':'.join(tag.positional)}>: a multiplier is not a number") from None
            name = tag.positional[0]
            specs.append(LoraSpec(resolve_tag(name, lora_dir), te, unet, name))
    return specs + list(loras)
