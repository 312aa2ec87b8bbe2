"""The registry of methods and terms: every module in this folder is one plug-in.

Each module defines its `Term` subclasses and `Method` presets and registers
them (`alm.training.terms.register_term` / `register_method`); this package
imports every module in the folder, so adding a method is one new file here.

    alm           ALM (docs/method.md §4)
    alm+sft       ALM + ntp_weight * next-token prediction
    sft           next-token prediction of the student only
    dskd          DSKD + ntp_weight * NTP        (docs/method.md §7)
    mined         MinED + ntp_weight * NTP
    uld           ULD + ntp_weight * NTP
    (term) hidden the hidden-state loss (add it with add_terms="hidden=W")
    (term) lexical ZeTT's lexical loss of hypernetwork training (add_terms="lexical=W")
"""

from __future__ import annotations

import importlib
import pkgutil

from alm.training.terms import Method, Term, methods, term_names

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
  importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Method", "Term", "methods", "term_names"]
