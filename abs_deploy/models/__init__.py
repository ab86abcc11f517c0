"""Model zoo. Importing this package registers every family."""

from abs_deploy.models import digits, fashion, mobilenetv2, resnet  # noqa: F401  (registration)
from abs_deploy.models.registry import (
    build_model,
    create_model,
    list_models,
    register_model,
    trusted_imports,
)

__all__ = ["build_model", "create_model", "list_models", "register_model", "trusted_imports"]
