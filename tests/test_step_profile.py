"""bench/step_profile.py classes profiled XLA:CPU ops by what the optimized HLO computes."""
from bench.step_profile import by_module, classify

# An excerpt in XLA:CPU's format (the demo's step, jax 0.10.2): a YNNPACK fusion that is a
# convolution's weight gradient, one that is a matmul, and an XLA fusion.
HLO = """\
%fused_computation.99 (param_0.112: f32[128,32,32,4], param_1.112: f32[32,32,4,128]) -> f32[128,3,3,128] {
  %param_0.112 = f32[128,32,32,4]{3,2,1,0} parameter(0)
  %param_1.112 = f32[32,32,4,128]{3,2,1,0} parameter(1)
  ROOT %convolution.105 = f32[128,3,3,128]{3,2,1,0} convolution(%param_0.112, %param_1.112), \
window={size=32x32 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_computation.3 (param_0.1: f32[4,4,128,16], param_1.1: f32[4,4,1024,16]) -> f32[4,4,128,1024] {
  %param_0.1 = f32[4,4,128,16]{3,2,1,0} parameter(0)
  %param_1.1 = f32[4,4,1024,16]{3,2,1,0} parameter(1)
  ROOT %dot.7 = f32[4,4,128,1024]{3,2,1,0} dot(%param_0.1, %param_1.1), lhs_batch_dims={0,1}, \
lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={3}
}

ENTRY %main {
  %ynn_fusion.99 = f32[128,3,3,128]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.99
  %ynn_fusion.3 = f32[4,4,128,1024]{3,2,1,0} fusion(%c, %d), kind=kCustom, calls=%fused_computation.3
}
"""


def test_profiled_ops_are_classed_by_their_hlo():
    times = {"ynn_fusion.99": 300, "ynn_fusion.3": 200, "transpose_copy_fusion.25": 50, "transpose_copy_fusion": 7}
    classes, convolutions = classify(times, HLO)
    assert classes == {"YNNPACK convolution": 300, "YNNPACK matmul": 200, "transpose_copy_fusion": 57}
    assert convolutions == {("f32[128,3,3,128]{3,2,1,0}", "size=32x32 pad=1_1x1_1"): 300}


# Top-level instructions as XLA:CPU prints them, with the op_name JAX gave each (abridged).
HLO_WITH_NAMES = """\
  %ynn_fusion.520 = f32[4,8,8,256]{3,2,1,0} fusion(%a), kind=kCustom, calls=%f.1, \
metadata={op_name="jit(step)/transpose(jvp(UNet))/UNet.forward_images/mid_block/resnets.0/conv1/conv_general_dilated"}
  %ynn_fusion.3 = f32[4,4,128,1024]{3,2,1,0} fusion(%b), kind=kCustom, calls=%f.2, \
metadata={op_name="jit(step)/jvp(UNet)/UNet.forward_images/down_blocks.0/attentions.0/transformer_blocks.0/attn1/while/body/dot_general"}
  %ynn_fusion.9 = f32[4096,64]{1,0} fusion(%c), kind=kCustom, calls=%f.3, \
metadata={op_name="jit(step)/jvp(UNet)/UNet.forward_images/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/dot_general"}
  ROOT %add_divide_fusion.4 = f32[4,32,32,64]{3,2,1,0} fusion(%d), kind=kLoop, calls=%f.4, \
metadata={op_name="jit(step)/jvp(UNet)/UNet.forward_images/down_blocks.0/resnets.0/norm1/div"}
  %multiply_add_fusion.7 = f32[3,3,64,64]{3,2,1,0} fusion(%e), kind=kLoop, calls=%f.5, metadata={op_name="jit(step)/pow"}
"""


def test_profiled_ops_are_grouped_by_the_part_of_the_model_they_came_from():
    times = {"ynn_fusion.520": 40, "ynn_fusion.3": 30, "ynn_fusion.9": 20, "add_divide_fusion.4": 10,
             "multiply_add_fusion.7": 5, "copy.12": 3, "copy.13": 1}
    assert by_module(times, HLO_WITH_NAMES) == {
        ("convolutions", "backward"): 40, ("attention core", "forward"): 30,
        ("attention projections", "forward"): 20, ("norms", "forward"): 10,
        ("optimizer and loss", "outside the model"): 5, ("unattributed", "copy"): 4,
    }
