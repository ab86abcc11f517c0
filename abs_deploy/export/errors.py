"""What a failed export raises when the input was fine but the result is not."""


class ExportFailed(Exception):
    """The export ran but its result is wrong (a parity miss, a Q/DQ node lost in simplify, a
    file ONNX Runtime refuses). One line saying what and where; the CLI exits 1."""
