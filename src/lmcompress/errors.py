"""User-facing errors: each one is reported by the CLI as a single line and a non-zero exit."""


class LMCompressError(Exception):
    """A problem with the user's input (model, data, recipe, options), not a bug in lmcompress."""


class ModelLoadError(LMCompressError):
    """The model directory or hub id could not be loaded."""


class DataError(LMCompressError):
    """Task data is missing, empty, or does not have the expected columns or labels."""


class RecipeError(LMCompressError):
    """A recipe or method option is invalid."""


class CompressionError(LMCompressError):
    """The compressed model cannot run (its architecture's code does not accept a compressed layer)."""


class CalibrationError(LMCompressError):
    """Calibration produced no usable statistics (no tokens, NaN or inf)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message: library errors can be pages long, ours are one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def validation_message(err) -> str:
    """One line from a pydantic ValidationError: every problem as `field: message`, joined by '; '."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in err.errors())


class DistillError(LMCompressError):
    """Teacher and student cannot be distilled together (tokenizer, labels, architecture), or a bad budget."""
