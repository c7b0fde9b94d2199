"""Import cost: importing statefs and listing checkpoints must not load TensorFlow or Keras.

`import tensorflow` takes seconds, so each check runs in a new interpreter,
where no earlier test can have imported it already.
"""

from __future__ import annotations

import json

import pytest

FRAMEWORKS = ("tensorflow", "keras")

REPORT_FRAMEWORK_MODULES = """
import json, sys
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {frameworks})))
"""


def loaded_frameworks(run_fresh, code: str) -> list[str]:
    """Run `code` in a new interpreter and return the framework modules it left in sys.modules."""
    report = REPORT_FRAMEWORK_MODULES.format(frameworks=repr(set(FRAMEWORKS)))
    output = run_fresh(code + report)
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["statefs", "statefs.backends"])
def test_import_does_not_load_frameworks(run_fresh, module):
    assert loaded_frameworks(run_fresh, f"import {module}\n") == []


def test_listing_checkpoints_does_not_load_frameworks(run_fresh, tmp_path):
    code = f"""
import statefs
manager = statefs.CheckpointManager({str(tmp_path / "ckpt")!r})
assert manager.latest() is None
assert manager.list() == []
"""

    assert loaded_frameworks(run_fresh, code) == []


def test_framework_check_detects_loaded_module(run_fresh):
    # A stand-in module keeps this check of the check itself cheap, because a
    # real `import keras` also imports TensorFlow.
    code = "import sys, types\nsys.modules['keras.stand_in'] = types.ModuleType('keras.stand_in')\n"

    assert loaded_frameworks(run_fresh, code) == ["keras.stand_in"]
