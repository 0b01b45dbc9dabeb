"""Model loading: names, files and callables -> LoadedModel."""

from camcli.models.loaded import LoadedModel
from camcli.models.load import available_models, load_model

__all__ = ["LoadedModel", "available_models", "load_model"]
