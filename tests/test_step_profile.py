"""bench/step_profile.py classes profiled XLA:CPU ops by what the optimized HLO computes."""
from bench.step_profile import classify

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
