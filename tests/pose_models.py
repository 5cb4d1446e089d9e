"""Tiny ONNX stand-ins for the published pose models, with the real input/output signatures
and outputs known by construction (tests/test_pose_extract.py, tests/test_build_own.py).

* detector: ``images`` (1, 3, 640, 640) -> (1, 8400, 85) in YOLOX's raw layout. Its output
  is a constant holding the boxes given, times relu((max pixel - 114) / 141): 1 for a frame
  with a white pixel, 0 for a black one (nothing detected).
* pose model: ``input`` (N, 3, 384, 288) -> SimCC x (N, 133, 576), y (N, 133, 768). Every
  point's x profile is the crop's column sums (each repeated for both half-pixel bins), its
  y profile the row sums: the points land on the brightest column and row of the crop.
  Frames with a white cross (a vertical and a horizontal bar) on black put every point at
  the cross (``draw_cross``), scored 1.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_HW = (640, 640)
POSE_HW = (384, 288)
NUM_CLASSES = 80
STRIDES = (8, 16, 32)


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def yolox_output(boxes, ratio: float) -> np.ndarray:
    """(8400, 85) raw YOLOX output holding ``boxes`` (x0, y0, x1, y1, objectness, class
    score, class) in frame pixels, for a frame letterboxed by ``ratio``; one stride-8 anchor
    each."""
    out = np.zeros((sum((DETECTOR_HW[0] // s) * (DETECTOR_HW[1] // s) for s in STRIDES),
                    5 + NUM_CLASSES), np.float32)
    cols = DETECTOR_HW[1] // STRIDES[0]
    used = set()
    for x0, y0, x1, y1, objectness, class_score, cls in boxes:
        cx, cy = (x0 + x1) / 2 * ratio, (y0 + y1) / 2 * ratio
        gx, gy = int(cx // 8), int(cy // 8)
        while gy * cols + gx in used:  # two boxes may share a centre cell
            gx += 1
        used.add(gy * cols + gx)
        out[gy * cols + gx, :4] = [cx / 8 - gx, cy / 8 - gy, np.log((x1 - x0) * ratio / 8),
                                   np.log((y1 - y0) * ratio / 8)]
        out[gy * cols + gx, 4] = objectness
        out[gy * cols + gx, 5 + int(cls)] = class_score
    return out


def make_detector(path, raw_output: np.ndarray) -> str:
    nodes = [
        helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),
        helper.make_node("Sub", ["peak", "fill"], ["above"]),
        helper.make_node("Div", ["above", "span"], ["fraction"]),
        helper.make_node("Relu", ["fraction"], ["gate"]),
        helper.make_node("Mul", ["table", "gate"], ["output"]),
    ]
    inits = [numpy_helper.from_array(np.float32(114.0), "fill"),
             numpy_helper.from_array(np.float32(141.0), "span"),
             numpy_helper.from_array(raw_output[None].astype(np.float32), "table")]
    graph = helper.make_graph(
        nodes, "yolox_stand_in",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *DETECTOR_HW])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, raw_output.shape[0],
                                                                     raw_output.shape[1]])],
        inits)
    return _save(graph, path)


def _profile(axis_summed, length, name):
    """Nodes turning the input's sums over ``axis_summed`` into (N, 133, 2 * length)."""
    p = name
    return [
        helper.make_node("ReduceSum", ["input", f"{p}_axes"], [f"{p}_sum"], keepdims=1),
        helper.make_node("Reshape", [f"{p}_sum", f"{p}_column"], [f"{p}_col"]),
        helper.make_node("Concat", [f"{p}_col", f"{p}_col"], [f"{p}_pairs"], axis=3),
        helper.make_node("Reshape", [f"{p}_pairs", f"{p}_flat_shape"], [f"{p}_flat"]),
        # Shifted so the peak is exactly 1 (the score): the sums' sign depends on the crop.
        helper.make_node("ReduceMax", [f"{p}_flat"], [f"{p}_peak"], axes=[2], keepdims=1),
        helper.make_node("Sub", [f"{p}_flat", f"{p}_peak"], [f"{p}_below"]),
        helper.make_node("Add", [f"{p}_below", "one"], [f"{p}_scaled"]),
        helper.make_node("Expand", [f"{p}_scaled", "points"], [name]),
    ], [
        numpy_helper.from_array(np.array(axis_summed, np.int64), f"{p}_axes"),
        numpy_helper.from_array(np.array([0, 1, length, 1], np.int64), f"{p}_column"),
        numpy_helper.from_array(np.array([0, 1, 2 * length], np.int64), f"{p}_flat_shape"),
    ]


def make_pose_model(path) -> str:
    x_nodes, x_inits = _profile([1, 2], POSE_HW[1], "simcc_x")
    y_nodes, y_inits = _profile([1, 3], POSE_HW[0], "simcc_y")
    inits = x_inits + y_inits + [
        numpy_helper.from_array(np.float32(1.0), "one"),
        numpy_helper.from_array(np.array([1, 133, 1], np.int64), "points")]
    graph = helper.make_graph(
        x_nodes + y_nodes, "simcc_stand_in",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *POSE_HW])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, ["N", 133, 2 * POSE_HW[1]]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, ["N", 133, 2 * POSE_HW[0]])],
        inits)
    return _save(graph, path)


def draw_cross(height: int, width: int, x: int, y: int) -> np.ndarray:
    """(H, W, 3) uint8 black frame with a white 3-pixel-wide cross centred at pixel (x, y)."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, max(x - 1, 0):x + 2] = 255
    frame[max(y - 1, 0):y + 2, :] = 255
    return frame
