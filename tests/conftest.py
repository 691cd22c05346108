from __future__ import annotations

import os

from hypothesis import settings

# CI runs a modest number of examples; `HYPOTHESIS_PROFILE=thorough` for long local runs.
settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
