//! The full-size architectures: VGG, YOLOv2 (darknet VOC layouts), ResNet and
//! MobileNetV2 (torchvision layouts). Each takes the builder and the graph
//! input and returns the graph output.

use crate::builder::{Conv, GraphBuilder, Pool, Value};

/// VGG-16 conv widths per block (each block ends with a 2x2 max pool).
const VGG16: [&[usize]; 5] = [&[64, 64], &[128, 128], &[256; 3], &[512; 3], &[512; 3]];
/// VGG-19 conv widths per block.
const VGG19: [&[usize]; 5] = [&[64, 64], &[128, 128], &[256; 4], &[512; 4], &[512; 4]];

fn vgg(b: &mut GraphBuilder, x: Value, blocks: &[&[usize]; 5], head: bool) -> Value {
    let mut x = x;
    for (i, widths) in blocks.iter().enumerate() {
        for (j, &width) in widths.iter().enumerate() {
            let id = format!("{}_{}", i + 1, j + 1);
            x = b.conv(&format!("conv{id}"), &x, Conv::new(width, 3));
            x = b.relu(&format!("relu{id}"), &x);
        }
        x = b.max_pool(&format!("pool{}", i + 1), &x, Pool::new(2, 2));
    }
    if !head {
        return x;
    }
    x = b.flatten("flatten", &x);
    for i in [6, 7] {
        x = b.gemm(&format!("fc{i}"), &x, 4096);
        x = b.relu(&format!("relu{i}"), &x);
        x = b.dropout(&format!("drop{i}"), &x);
    }
    x = b.gemm("fc8", &x, 1000);
    b.softmax("prob", &x)
}

/// VGG-16 with the classifier head.
pub(crate) fn vgg16(b: &mut GraphBuilder, x: Value) -> Value {
    vgg(b, x, &VGG16, true)
}

/// VGG-19 with the classifier head.
pub(crate) fn vgg19(b: &mut GraphBuilder, x: Value) -> Value {
    vgg(b, x, &VGG19, true)
}

/// VGG-16 up to `pool5`.
pub(crate) fn vgg16_conv(b: &mut GraphBuilder, x: Value) -> Value {
    vgg(b, x, &VGG16, false)
}

/// VGG-19 up to `pool5`.
pub(crate) fn vgg19_conv(b: &mut GraphBuilder, x: Value) -> Value {
    vgg(b, x, &VGG19, false)
}

/// The emulator's calibration workload: VGG-16 with its classifier head on a
/// `[1, 3, 112, 112]` input, a quarter of VGG-16's conv work with the same layer mix and
/// a memory-bound FC head (fc6 reads 4608 x 4096 weights) taking a similar share of the
/// time, so that a host's rate on it carries over to VGG-16 at 224 x 224.
pub(crate) fn calibration(b: &mut GraphBuilder, x: Value) -> Value {
    vgg16(b, x)
}

/// Darknet `[convolutional] batch_normalize=1 activation=leaky` layer number `i`:
/// `conv{i}` (no bias), `bn{i}`, `leaky{i}`.
fn darknet_conv(b: &mut GraphBuilder, i: usize, x: &Value, filters: usize, k: usize) -> Value {
    let x = b.conv(&format!("conv{i}"), x, Conv::new(filters, k).no_bias());
    let x = b.batch_norm(&format!("bn{i}"), &x);
    b.leaky_relu(&format!("leaky{i}"), &x, 0.1)
}

/// One darknet layer of a plain (route-free) stack.
#[derive(Clone, Copy)]
enum Layer {
    /// conv + BN + leaky with (filters, size).
    Conv(usize, usize),
    /// 2x2 stride 2 max pool.
    Max,
}
use Layer::{Conv as C, Max as M};

/// Runs `layers`, numbering them darknet-style from `first`; returns the
/// output of every layer (indexed from `first`).
fn darknet(b: &mut GraphBuilder, first: usize, x: Value, layers: &[Layer]) -> Vec<Value> {
    let mut outs: Vec<Value> = vec![];
    for (offset, layer) in layers.iter().enumerate() {
        let i = first + offset;
        let x = outs.last().unwrap_or(&x);
        let y = match *layer {
            C(filters, k) => darknet_conv(b, i, x, filters, k),
            M => b.max_pool(&format!("pool{i}"), x, Pool::new(2, 2)),
        };
        outs.push(y);
    }
    outs
}

/// YOLOv2 (yolov2-voc.cfg) at 416x416: output `[1, 125, 13, 13]`.
pub(crate) fn yolov2(b: &mut GraphBuilder, x: Value) -> Value {
    #[rustfmt::skip]
    let backbone = [
        C(32, 3), M, C(64, 3), M, C(128, 3), C(64, 1), C(128, 3), M,
        C(256, 3), C(128, 1), C(256, 3), M,
        C(512, 3), C(256, 1), C(512, 3), C(256, 1), C(512, 3), M,
        C(1024, 3), C(512, 1), C(1024, 3), C(512, 1), C(1024, 3),
        C(1024, 3), C(1024, 3),
    ];
    let outs = darknet(b, 0, x, &backbone);
    // layer 25: route 16; 26: 64 1x1; 27: reorg; 28: route 27 24
    let pass = darknet_conv(b, 26, &outs[16], 64, 1);
    let pass = b.reorg("reorg27", &pass, 2);
    let x = b.concat("concat28", &[&pass, &outs[24]]);
    let x = darknet_conv(b, 29, &x, 1024, 3);
    b.conv("conv30", &x, Conv::new(125, 1))
}

/// YOLOv2-tiny (yolov2-tiny-voc.cfg) at 416x416: output `[1, 125, 13, 13]`.
pub(crate) fn yolov2_tiny(b: &mut GraphBuilder, x: Value) -> Value {
    #[rustfmt::skip]
    let head = [C(16, 3), M, C(32, 3), M, C(64, 3), M, C(128, 3), M, C(256, 3), M, C(512, 3)];
    let x = darknet(b, 0, x, &head).pop().expect("layers");
    // darknet's size=2 stride=1 max pool keeps 13x13 by padding bottom/right
    let x = b.max_pool("pool11", &x, Pool::new(2, 1).pads([0, 0, 1, 1]));
    let x = darknet(b, 12, x, &[C(1024, 3), C(1024, 3)])
        .pop()
        .expect("layers");
    b.conv("conv14", &x, Conv::new(125, 1))
}

/// torchvision conv (no bias) + BN, named `{prefix}conv{i}` / `{prefix}bn{i}`.
fn conv_bn(b: &mut GraphBuilder, prefix: &str, i: usize, x: &Value, c: Conv) -> Value {
    let y = b.conv(&format!("{prefix}conv{i}"), x, c.no_bias());
    b.batch_norm(&format!("{prefix}bn{i}"), &y)
}

/// ResNet stem: conv 7x7 s2 + BN + Relu + max pool 3x3 s2 p1.
fn resnet_stem(b: &mut GraphBuilder, x: &Value) -> Value {
    let x = conv_bn(b, "", 1, x, Conv::new(64, 7).stride(2));
    let x = b.relu("relu", &x);
    b.max_pool("maxpool", &x, Pool::new(3, 2).pads([1; 4]))
}

/// ResNet head: GlobalAveragePool, Flatten, Gemm to 1000 classes.
fn classifier(b: &mut GraphBuilder, x: &Value) -> Value {
    let x = b.global_average_pool("avgpool", x);
    let x = b.flatten("flatten", &x);
    b.gemm("fc", &x, 1000)
}

/// The residual tail of a block: optional projection of `x`, Add, Relu.
fn residual(b: &mut GraphBuilder, p: &str, x: &Value, y: &Value, stride: usize) -> Value {
    let [_, in_ch, _, _] = x.shape().try_into().expect("4-D");
    let out_ch = y.shape()[1];
    let skip = if stride != 1 || in_ch != out_ch {
        let proj = Conv::new(out_ch, 1).stride(stride).no_bias();
        let s = b.conv(&format!("{p}downsample.0"), x, proj);
        b.batch_norm(&format!("{p}downsample.1"), &s)
    } else {
        x.clone()
    };
    let sum = b.add(&format!("{p}add"), y, &skip);
    b.relu(&format!("{p}relu"), &sum)
}

fn basic_block(b: &mut GraphBuilder, p: &str, x: &Value, width: usize, stride: usize) -> Value {
    let y = conv_bn(b, p, 1, x, Conv::new(width, 3).stride(stride));
    let y = b.relu(&format!("{p}relu1"), &y);
    let y = conv_bn(b, p, 2, &y, Conv::new(width, 3));
    residual(b, p, x, &y, stride)
}

fn bottleneck(b: &mut GraphBuilder, p: &str, x: &Value, width: usize, stride: usize) -> Value {
    let y = conv_bn(b, p, 1, x, Conv::new(width, 1));
    let y = b.relu(&format!("{p}relu1"), &y);
    let y = conv_bn(b, p, 2, &y, Conv::new(width, 3).stride(stride));
    let y = b.relu(&format!("{p}relu2"), &y);
    let y = conv_bn(b, p, 3, &y, Conv::new(width * 4, 1));
    residual(b, p, x, &y, stride)
}

type Block = fn(&mut GraphBuilder, &str, &Value, usize, usize) -> Value;

fn resnet(b: &mut GraphBuilder, x: Value, block: Block, depths: [usize; 4]) -> Value {
    let mut x = resnet_stem(b, &x);
    for (stage, &depth) in depths.iter().enumerate() {
        let width = 64 << stage;
        for i in 0..depth {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            x = block(b, &format!("layer{}.{i}.", stage + 1), &x, width, stride);
        }
    }
    classifier(b, &x)
}

/// torchvision ResNet-18 at 224x224: output `[1, 1000]` (logits).
pub(crate) fn resnet18(b: &mut GraphBuilder, x: Value) -> Value {
    resnet(b, x, basic_block, [2, 2, 2, 2])
}

/// torchvision ResNet-50 (v1.5: stride on the 3x3) at 224x224: output `[1, 1000]`.
pub(crate) fn resnet50(b: &mut GraphBuilder, x: Value) -> Value {
    resnet(b, x, bottleneck, [3, 4, 6, 3])
}

/// Conv (no bias) + BN + ReLU6 (`Clip(0, 6)`), named `{p}conv{i}`, `{p}bn{i}`, `{p}relu{i}`.
fn conv_bn_relu6(b: &mut GraphBuilder, p: &str, i: usize, x: &Value, c: Conv) -> Value {
    let y = conv_bn(b, p, i, x, c);
    b.clip(&format!("{p}relu{i}"), &y, 0.0, 6.0)
}

/// torchvision MobileNetV2 at 224x224: output `[1, 1000]` (logits).
pub(crate) fn mobilenetv2(b: &mut GraphBuilder, x: Value) -> Value {
    // (expansion t, channels c, repeats n, first stride s)
    const SETTINGS: [(usize, usize, usize, usize); 7] = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let mut x = conv_bn_relu6(b, "features.0.", 0, &x, Conv::new(32, 3).stride(2));
    let mut index = 1;
    for (t, c, n, s) in SETTINGS {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            x = inverted_residual(b, &format!("features.{index}."), &x, t, c, stride);
            index += 1;
        }
    }
    x = conv_bn_relu6(b, &format!("features.{index}."), 0, &x, Conv::new(1280, 1));
    classifier(b, &x)
}

/// MobileNetV2 block: [1x1 expand] -> depthwise 3x3 -> 1x1 project (linear),
/// plus a residual Add when the stride is 1 and the widths match.
pub(crate) fn inverted_residual(
    b: &mut GraphBuilder,
    p: &str,
    x: &Value,
    expansion: usize,
    out: usize,
    stride: usize,
) -> Value {
    let in_ch = x.shape()[1];
    let hidden = in_ch * expansion;
    let mut y = x.clone();
    if expansion != 1 {
        y = conv_bn_relu6(b, p, 0, &y, Conv::new(hidden, 1));
    }
    let depthwise = Conv::new(hidden, 3).stride(stride).group(hidden);
    y = conv_bn_relu6(b, p, 1, &y, depthwise);
    y = conv_bn(b, p, 2, &y, Conv::new(out, 1));
    if stride == 1 && in_ch == out {
        b.add(&format!("{p}add"), x, &y)
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn macs(define: fn(&mut GraphBuilder, Value) -> Value, input: [usize; 4]) -> (u64, Value) {
        let mut b = GraphBuilder::new("macs");
        let x = b.input("input", &input);
        let y = define(&mut b, x);
        (b.conv_macs(), y)
    }

    fn giga(macs: u64) -> f64 {
        (macs as f64 / 1e7).round() / 100.0
    }

    #[test]
    fn vgg_conv_macs_match_the_standard_architecture() {
        let (m16, y16) = macs(vgg16_conv, [1, 3, 224, 224]);
        let (m19, y19) = macs(vgg19_conv, [1, 3, 224, 224]);
        assert_eq!(giga(m16), 15.35);
        assert_eq!(giga(m19), 19.51);
        assert_eq!(y16.shape(), [1, 512, 7, 7]);
        assert_eq!(y19.shape(), [1, 512, 7, 7]);
    }

    #[test]
    fn resnet_and_mobilenet_macs() {
        assert_eq!(giga(macs(resnet18, [1, 3, 224, 224]).0), 1.81);
        assert_eq!(giga(macs(resnet50, [1, 3, 224, 224]).0), 4.09);
        assert_eq!(giga(macs(mobilenetv2, [1, 3, 224, 224]).0), 0.30);
    }

    #[test]
    fn calibration_macs_and_shape() {
        let (m, y) = macs(calibration, [1, 3, 112, 112]);
        // VGG-16's conv MACs / 4: every conv output halves in both dims
        assert_eq!(m, 15_346_630_656 / 4);
        assert_eq!(y.shape(), [1, 1000]);
    }

    #[test]
    fn yolo_output_shapes() {
        assert_eq!(macs(yolov2, [1, 3, 416, 416]).1.shape(), [1, 125, 13, 13]);
        assert_eq!(
            macs(yolov2_tiny, [1, 3, 416, 416]).1.shape(),
            [1, 125, 13, 13]
        );
    }
}
