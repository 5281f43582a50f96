"""Value domains for the methods' ``Params`` fields (pydantic constraints).

Every hyper-parameter of every method declares its bounds or choices with these types, so a bad value
(``method.params.queue_size=-5``, a temperature of 0, a momentum of 1.5, a crop range (0.9, 0.2)) is
refused when the recipe is validated, with exit 2 naming the key, before a teacher is loaded or a stage
runs. Written once here so the methods do not each restate the same ``Field(...)`` arguments.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from distillctl.errors import UsageError

Count = Annotated[int, Field(ge=1)]  # sizes, dimensions, queue lengths, neighbours: at least one
OptionalCount = Annotated[int, Field(ge=0)]  # counts that may be zero (extra local crops)
Positive = Annotated[float, Field(gt=0)]  # temperatures, a Beta distribution's α
NonNegative = Annotated[float, Field(ge=0)]  # loss weights, warm-up lengths in (fractional) epochs
Momentum = Annotated[float, Field(ge=0, le=1)]  # EMA / centre momentum: 1 freezes, 0 copies
AreaFraction = Annotated[float, Field(gt=0, le=1)]  # a crop's share of the image area


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"the lower bound {pair[0]} is above the upper bound {pair[1]}")
    return pair


# RandomResizedCrop area range (lower, upper), each in (0, 1], lower ≤ upper
CropScale = Annotated[tuple[AreaFraction, AreaFraction], AfterValidator(_ordered)]
WeightPair = tuple[NonNegative, NonNegative]
# photometric view families a method may ask for (data/views.py FAMILIES without the evaluation-only centre)
Augmentation = Literal["weak", "mocov2", "simclr", "ssl-small"]


def params_error(exc: ValidationError, params_cls: type[BaseModel], method: str,
                 where: str = "method.params") -> UsageError:
    """The first problem of a ``Params`` validation as one line naming the full key, e.g.
    ``method.params.queue_size: invalid value -5 for method seed: Input should be greater than or equal to 1``."""
    error = exc.errors()[0]
    if error["type"] == "extra_forbidden":  # unknown key: the recipe-wide message with close matches
        from distillctl.config import format_validation_error

        return format_validation_error(exc, params_cls, prefix=f"{where} ({method})")
    field, *inner = [str(part) for part in error["loc"]]
    key = f"{where}.{field}" + "".join(f"[{part}]" for part in inner)
    default = params_cls.model_fields[field].default if field in params_cls.model_fields else None
    return UsageError(f"{key}: invalid value {error['input']!r} for method {method}: {error['msg']}",
                      hint=f"the default is {default!r}")
