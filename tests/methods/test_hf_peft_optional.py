"""``peft`` is an optional extra: without it the registry still works and a ``peft_*`` method says what to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peft_core.errors import InputError
from peft_core.methods import get_method
from peft_core.train import apply_method

from . import checks as c


def test_applying_a_peft_method_without_peft_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    method = get_method("peft_lora")
    with pytest.raises(InputError) as err:
        apply_method(method, c.tiny_model("vit"), method.hparams())
    msg = str(err.value)
    assert msg == 'methods.peft_lora: peft_* needs Hugging Face peft, an optional extra: pip install -e ".[hf]"'


def test_registry_and_methods_listing_do_not_import_peft():
    code = (
        "import sys; sys.modules['peft'] = None\n"  # as if not installed
        "import peft_core.methods, peft_core.grids\n"
        "from peft_core.cli import main\n"
        "assert main(['methods']) == 0\n"
        "peft_core.grids.methods_model()\n"
        "assert sys.modules['peft'] is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert {"peft_lora", "peft_adalora", "peft_glora", "lora"} <= listed
