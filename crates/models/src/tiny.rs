//! Tiny models (committed under `testdata/models/`), each exercising a set of
//! ops and geometries the compiler must handle.

use crate::builder::{Conv, GraphBuilder, Pool, Value};
use crate::zoo::{
    MbConv, Yolov8, convnext, efficientnet, inverted_residual, shufflenet_v2, yolov8,
};

/// Conv + BN + Relu with names `conv{id}`, `bn{id}`, `relu{id}`.
fn conv_bn_relu(b: &mut GraphBuilder, id: &str, x: &Value, c: Conv) -> Value {
    let y = b.conv(&format!("conv{id}"), x, c.no_bias());
    let y = b.batch_norm(&format!("bn{id}"), &y);
    b.relu(&format!("relu{id}"), &y)
}

/// 48x40 input: kernels 1/3/5, strides 1/2, dilation 2, asymmetric pads,
/// ceil-mode max pool, padded average pool without the pads in the divisor.
/// Output `[1, 24, 6, 5]`.
pub(crate) fn tiny_cnn(b: &mut GraphBuilder, x: Value) -> Value {
    let x = conv_bn_relu(b, "1", &x, Conv::new(8, 3));
    let x = b.conv("conv2", &x, Conv::new(16, 5).stride(2));
    let x = b.relu("relu2", &x);
    let x = b.conv("conv3", &x, Conv::new(16, 3).dilation(2).pads([2; 4]));
    let x = b.relu("relu3", &x);
    let x = b.conv("conv4", &x, Conv::new(16, 1));
    let x = b.relu("relu4", &x);
    let x = b.max_pool("pool1", &x, Pool::new(3, 2).ceil_mode());
    // TF "SAME" with stride 2: the extra pad goes bottom/right
    let x = b.conv("conv5", &x, Conv::new(24, 3).stride(2).pads([0, 0, 1, 1]));
    let x = b.relu("relu5", &x);
    b.avg_pool("pool2", &x, Pool::new(3, 1).pads([1; 4]))
}

/// 32x32 input: an identity residual block, a projected (1x1 s2) one, and an
/// Inception-like Concat of a 1x1 and a 3x3 branch. Output `[1, 32, 16, 16]`.
pub(crate) fn tiny_residual(b: &mut GraphBuilder, x: Value) -> Value {
    let stem = conv_bn_relu(b, "0", &x, Conv::new(16, 3));

    let y = conv_bn_relu(b, "1_1", &stem, Conv::new(16, 3));
    let y = b.conv("conv1_2", &y, Conv::new(16, 3).no_bias());
    let y = b.batch_norm("bn1_2", &y);
    let y = b.add("add1", &stem, &y);
    let block1 = b.relu("relu1", &y);

    let y = conv_bn_relu(b, "2_1", &block1, Conv::new(32, 3).stride(2));
    let y = b.conv("conv2_2", &y, Conv::new(32, 3).no_bias());
    let y = b.batch_norm("bn2_2", &y);
    let proj = b.conv("proj2", &block1, Conv::new(32, 1).stride(2).no_bias());
    let proj = b.batch_norm("proj2_bn", &proj);
    let y = b.add("add2", &proj, &y);
    let block2 = b.relu("relu2", &y);

    let a = b.conv("branch1x1", &block2, Conv::new(16, 1));
    let a = b.relu("branch1x1_relu", &a);
    let c = b.conv("branch3x3", &block2, Conv::new(16, 3));
    let c = b.relu("branch3x3_relu", &c);
    b.concat("mixed", &[&a, &c])
}

/// Darknet conv + BN + LeakyRelu(0.1).
fn conv_leaky(b: &mut GraphBuilder, i: usize, x: &Value, filters: usize, k: usize) -> Value {
    let y = b.conv(&format!("conv{i}"), x, Conv::new(filters, k).no_bias());
    let y = b.batch_norm(&format!("bn{i}"), &y);
    b.leaky_relu(&format!("leaky{i}"), &y, 0.1)
}

/// 32x32 input: SpaceToDepth on one path, the Reshape/Transpose/Reshape reorg
/// on another, Concat, then a nearest x2 Resize concatenated with an earlier
/// 16x16 tensor. Output `[1, 18, 16, 16]`.
pub(crate) fn tiny_yolo(b: &mut GraphBuilder, x: Value) -> Value {
    let x = conv_leaky(b, 0, &x, 16, 3);
    let x = b.max_pool("pool1", &x, Pool::new(2, 2));
    let mid = conv_leaky(b, 2, &x, 32, 3);
    let x = b.max_pool("pool3", &mid, Pool::new(2, 2));
    let deep = conv_leaky(b, 4, &x, 64, 3);

    let s2d = b.space_to_depth("s2d5", &mid, 2);
    let pass = conv_leaky(b, 6, &mid, 8, 1);
    let reorg = b.reorg("reorg7", &pass, 2);
    let x = b.concat("concat8", &[&s2d, &reorg, &deep]);
    let x = conv_leaky(b, 9, &x, 32, 1);

    let up = b.upsample("upsample10", &x, 2);
    let x = b.concat("concat11", &[&up, &mid]);
    let x = conv_leaky(b, 12, &x, 32, 3);
    b.conv("conv13", &x, Conv::new(18, 1))
}

/// 32x32 input: depthwise and grouped convs, ReLU6 as Clip, HardSigmoid,
/// SiLU, an inverted residual Add, and a pooled Gemm + Softmax head.
/// Output `[1, 10]`.
pub(crate) fn tiny_mobile(b: &mut GraphBuilder, x: Value) -> Value {
    let x = b.conv("conv0", &x, Conv::new(16, 3).stride(2).no_bias());
    let x = b.batch_norm("bn0", &x);
    let x = b.clip("relu0", &x, 0.0, 6.0);
    let x = b.conv("dw1", &x, Conv::new(16, 3).group(16));
    let x = b.clip("relu1", &x, 0.0, 6.0);
    let x = b.conv("gconv2", &x, Conv::new(32, 3).group(2));
    let x = b.silu("silu2", &x);
    let x = inverted_residual(b, "block3.", &x, 2, 32, 1);
    let x = b.conv("dw4", &x, Conv::new(32, 3).stride(2).group(32));
    let x = b.hard_sigmoid("hsig4", &x);
    let x = b.conv("conv5", &x, Conv::new(64, 1));
    let x = b.silu("silu5", &x);
    let x = b.global_average_pool("gap", &x);
    let x = b.flatten("flatten", &x);
    let x = b.gemm("fc", &x, 10);
    b.softmax("prob", &x)
}

/// NHWC `[1, 32, 32, 3]` input as tf2onnx exports it: Transpose to NCHW, two
/// convs, Transpose back. Output `[1, 16, 16, 8]` (NHWC).
pub(crate) fn tiny_nhwc(b: &mut GraphBuilder, x: Value) -> Value {
    let x = b.transpose("to_nchw", &x, &[0, 3, 1, 2]);
    let x = b.conv("conv1", &x, Conv::new(8, 3));
    let x = b.relu("relu1", &x);
    let x = b.conv("conv2", &x, Conv::new(8, 3).stride(2).pads([0, 0, 1, 1]));
    let x = b.relu("relu2", &x);
    b.transpose("to_nhwc", &x, &[0, 2, 3, 1])
}

/// 32x32 input with an LRN between convs, an op tract loads but Legion does
/// not model. Output `[1, 16, 16, 16]`.
pub(crate) fn tiny_unknown_op(b: &mut GraphBuilder, x: Value) -> Value {
    let x = b.conv("conv1", &x, Conv::new(8, 3));
    let x = b.relu("relu1", &x);
    let x = b.lrn("lrn1", &x, 5);
    let x = b.max_pool("pool1", &x, Pool::new(2, 2));
    let x = b.conv("conv2", &x, Conv::new(16, 3));
    b.relu("relu2", &x)
}

/// 16x16 input: conv, pool, Flatten, Gemm, Dropout, Identity, Softmax.
/// Output `[1, 10]`.
pub(crate) fn tiny_head(b: &mut GraphBuilder, x: Value) -> Value {
    let x = b.conv("conv1", &x, Conv::new(8, 3));
    let x = b.relu("relu1", &x);
    let x = b.max_pool("pool1", &x, Pool::new(2, 2));
    let x = b.flatten("flatten", &x);
    let x = b.gemm("fc", &x, 10);
    let x = b.dropout("dropout", &x);
    let x = b.identity("identity", &x);
    b.softmax("prob", &x)
}

/// 64x64 input: YOLOv8 at two scales (P3/8, P4/16) with widths 8..32, one
/// bottleneck per C2f, SPPF, a one-step FPN/PAN, and the export-time Detect
/// head (Split into 64 box and 4 class channels, DFL, dist2bbox, Sigmoid).
/// Output `[1, 8, 80]` (xywh + 4 class scores for 8x8 + 4x4 anchors).
pub(crate) fn tiny_yolov8(b: &mut GraphBuilder, x: Value) -> Value {
    let cfg = Yolov8 {
        widths: &[8, 16, 24, 32],
        depths: &[1, 1, 1],
        box_width: 16,
        class_width: 16,
        classes: 4,
    };
    yolov8(b, x, &cfg)
}

/// 64x64 input: ConvNeXt with a 4x4 patchify stem, two blocks of width 16,
/// a LayerNorm2d + 2x2 stride-2 downsample, one block of width 32; each block
/// casts to float before its LayerNorm. Output `[1, 32, 8, 8]`.
pub(crate) fn tiny_convnext(b: &mut GraphBuilder, x: Value) -> Value {
    convnext(b, x, &[2, 1], &[16, 32], true)
}

/// 64x64 input: EfficientNet with a stride-2 stem, an unexpanded MBConv with
/// a residual, expanded 3x3 and 5x5 MBConvs (two of them stride 2, one with a
/// residual), squeeze-excitation in each, and a 1x1 head conv.
/// Output `[1, 64, 8, 8]`.
pub(crate) fn tiny_effnet(b: &mut GraphBuilder, x: Value) -> Value {
    #[rustfmt::skip]
    let stages = [
        MbConv { expand: 1, kernel: 3, stride: 1, out: 8, repeats: 1 },
        MbConv { expand: 4, kernel: 3, stride: 2, out: 16, repeats: 1 },
        MbConv { expand: 4, kernel: 5, stride: 2, out: 24, repeats: 2 },
    ];
    efficientnet(b, x, 8, &stages, 64)
}

/// 64x64 input: ShuffleNetV2 with an 8-wide stem and max pool, then stages
/// of (stride-2 unit, stride-1 units) at 24 and 48 channels, each unit
/// ending in a channel shuffle, and a 1x1 conv5. Output `[1, 64, 4, 4]`.
pub(crate) fn tiny_shuffle(b: &mut GraphBuilder, x: Value) -> Value {
    shufflenet_v2(b, x, 8, &[(3, 24), (2, 48)], 64)
}

/// 64x64 input: the YOLOX Focus stem (four stride-2 Slice pairs, on H then
/// W, concatenated top-left, bottom-left, top-right, bottom-right), then
/// conv 3x3 + SiLU, a stride-2 conv 3x3 + SiLU and a 1x1 conv + SiLU.
/// Output `[1, 32, 16, 16]`.
pub(crate) fn tiny_focus(b: &mut GraphBuilder, x: Value) -> Value {
    let patch = |b: &mut GraphBuilder, name: &str, row: usize, col: usize| {
        let y = b.slice(&format!("focus.{name}.rows"), &x, 2, row, None, 2);
        b.slice(&format!("focus.{name}"), &y, 3, col, None, 2)
    };
    let top_left = patch(b, "top_left", 0, 0);
    let bottom_left = patch(b, "bottom_left", 1, 0);
    let top_right = patch(b, "top_right", 0, 1);
    let bottom_right = patch(b, "bottom_right", 1, 1);
    let parts = [&top_left, &bottom_left, &top_right, &bottom_right];
    let y = b.concat("focus.concat", &parts);
    let y = b.conv("focus.conv", &y, Conv::new(16, 3));
    let y = b.silu("focus.act", &y);
    let y = b.conv("dark2.0.conv", &y, Conv::new(32, 3).stride(2));
    let y = b.silu("dark2.0.act", &y);
    let y = b.conv("dark2.1.conv", &y, Conv::new(32, 1));
    b.silu("dark2.1.act", &y)
}

/// `[1, 3, 24, 40]` input: a conv, a Transpose swapping H and W, then a 3x3
/// conv, a stride-2 3x3 conv and a padded 3x3 max pool on the transposed map,
/// whose rows were the first conv's columns. Output `[1, 16, 10, 6]`.
pub(crate) fn tiny_transposed(b: &mut GraphBuilder, x: Value) -> Value {
    let y = b.conv("conv1", &x, Conv::new(8, 3));
    let y = b.relu("relu1", &y);
    let y = b.transpose("swap_hw", &y, &[0, 1, 3, 2]);
    let y = b.conv("conv2", &y, Conv::new(16, 3));
    let y = b.relu("relu2", &y);
    let y = b.conv("conv3", &y, Conv::new(16, 3).stride(2));
    b.max_pool("pool4", &y, Pool::new(3, 2).pads([1; 4]))
}
