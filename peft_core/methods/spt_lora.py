"""SPT-LoRA (He et al., ICCV 2023): a parameter budget allocated by sensitivity; lora on the most sensitive matrices.

Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning (He, Chen, Liu,
Cai, Zhuang; ICCV 2023, arXiv 2303.08566); source repository ziplab/SPT
(``configs/vtab_supervised_spt_lora*.sh``: rank 8, alpha 10, structured
vectors). The allocation is a prestep on the cell's training split (the
squared gradients of the loss), described in peft_core/methods/_spt.py; its
structured module here is a rank-``rank`` lora.

Count on ViT-B/16: the allocation's own, within 0.01M of ``budget`` by
construction of the authors' sweep (steps of 0.02M); the released
allocations target the budgets 0.05 ... 1.0M (``sensitivity_spt_*/<task>/param_req_<budget>.pth``),
and the paper's VTAB-1k rows use 0.4M-class budgets (default here: 0.4).
The data-free placeholder (``peft-core params``) puts structured modules on
the matrices in model order while they fit the budget. Mergeable: the LoRA branches and the sparse deltas fold into the weights.

Deviations from the reference code (``METHOD.deviations``, docs/deviations.md):

* sensitivities are taken in eval mode (no dropout or drop-path), so the allocation is deterministic
* q, k and v are the thirds of timm's fused attn.qkv (the authors split the checkpoint into three linears); same units, same counts
"""

from __future__ import annotations

from . import _spt
from ._registry import register_method


class SPTLoraHP(_spt.SPTHP):
    pass


KIND = "lora"
DEVIATIONS = _spt.DEVIATIONS


def apply(model, hp, state=None):
    return _spt.build(model, hp, _spt.placeholder(model, hp, KIND) if state is None else state, KIND)


METHOD = register_method("spt_lora", SPTLoraHP, apply, _spt.merge, deviations=DEVIATIONS, prestep=_spt.prestep(KIND))
