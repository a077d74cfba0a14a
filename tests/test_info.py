import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from surgery.grid import VideoGrid
from surgery.info import forward_flops, model_info

from .conftest import model_inputs


def test_forward_flops_match_torch_flop_counter(tiny_model):
    # The math SDPA backend decomposes attention into matmuls that FlopCounterMode counts.
    for grid in (VideoGrid(3, 4, 6), VideoGrid(2, 5, 5)):
        inputs = model_inputs(tiny_model, grid, batch=1, text_tokens=16)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            tiny_model(**inputs)
        assert counter.get_total_flops() == forward_flops(dict(tiny_model.config), grid, 16)["total"]


def test_info_at_the_wan_1_3b_shape():
    info = model_info("wan2.1-t2v-1.3b", 81, 480, 832)
    assert info.tokens == 32_760 and info.grid == {"frames": 21, "height": 30, "width": 52}
    # 4·H·S²·D = 6.594 TFLOP per layer (gpu-baselines.md)
    assert abs(info.self_attention_flops_per_layer / 1e12 - 6.594) < 1e-3
    assert 0.5 < info.self_attention_share < 0.8
