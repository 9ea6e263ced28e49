"""beear: trigger-free removal of safety backdoors from instruction-tuned language models.

An implementation of BEEAR (Zeng et al., 2024, arXiv 2406.17092) as installable software.
The bi-level loop is in :mod:`beear.loop`; read it first.
"""

__version__ = "0.1.0"
