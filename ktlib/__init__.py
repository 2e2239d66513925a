"""ktlib: the helper package behind the knowledge-transfer workbook.

Data flows one way: real MulT files or the simulator -> ``data`` -> model -> training -> run store -> plots.
"""

__version__ = "0.1.0"
