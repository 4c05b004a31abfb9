"""Building blocks of the request models, so each documents exactly what the gateway serves.

Content blocks, items and tools are TypedDicts checked with the request models' own config
(strict, unknown fields forwarded): a dict is checked at a fraction of the cost of a model
instance. Tagged unions report errors where the client wrote them, and whole numbers written
as `16.0` count as integers, as JSON Schema says.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Discriminator,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    with_config,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from router.protocol import OpenAIBaseModel, whole_number

__all__ = ["WholeNumber", "forwarded", "string_or", "untagged"]


def untagged(*at: int) -> WrapValidator:
    """Locates a tagged union's errors as in the body.

    pydantic names the member of a tagged union in an error's location (`content.list.0.image.source`),
    a field the client never wrote. `at`: where such names stand in the locations below the annotated
    value, which this validator leaves out: `(0,)` for a union, `(1,)` for a list of unions,
    `(0, 2)` for a `string_or` union of a string and a list of unions (one call per list, not per item).
    """

    def strip(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors: list[InitErrorDetails] = [
                {
                    "type": PydanticCustomError(e["type"], e["msg"]),
                    "loc": tuple(part for i, part in enumerate(e["loc"]) if i not in at),
                    "input": e["input"],
                }
                for e in exc.errors(include_url=False)
            ]
            raise ValidationError.from_exception_data(exc.title, errors) from None

    return WrapValidator(strip)


def _shape(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else None


def string_or(what: str) -> Discriminator:
    """A `str | list[...]` union that reports only the errors of the form sent (`Tag("string")`,
    `Tag("list")`), and one clear error for anything else."""
    return Discriminator(
        _shape,
        custom_error_type="string_or_list",
        custom_error_message=f"Input should be a string or a list of {what}",
    )


# Content blocks, items and tools are TypedDicts (checked as dicts, at a fraction of the cost of a
# model instance each), with the request models' own config: unknown fields forwarded, strict.
forwarded = with_config(OpenAIBaseModel.model_config)


# An integer that JSON may write as 16.0 (a valid integer in JSON Schema), as `TokenCount`.
WholeNumber = Annotated[int, BeforeValidator(whole_number), WithJsonSchema({"type": "integer"})]
