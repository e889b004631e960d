//! The full-size architectures: VGG, YOLOv2 (darknet VOC layouts), AlexNet, ResNet
//! and MobileNetV2 (torchvision layouts). Each takes the builder and the graph
//! input and returns the graph output.

use crate::builder::{Conv, GraphBuilder, Operand, Pool, Value};

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

/// torchvision AlexNet at 224x224: output `[1, 1000]` (logits). The adaptive
/// average pool to 6x6 is the identity at this size and is left out, as are the
/// Dropouts; nodes keep torchvision's indices (`features.0`, ..., `classifier.6`).
pub(crate) fn alexnet(b: &mut GraphBuilder, x: Value) -> Value {
    // (index in `features`, conv, whether a max pool follows its ReLU)
    let convs = [
        (0, Conv::new(64, 11).stride(4).pads([2; 4]), true),
        (3, Conv::new(192, 5), true),
        (6, Conv::new(384, 3), false),
        (8, Conv::new(256, 3), false),
        (10, Conv::new(256, 3), true),
    ];
    let mut x = x;
    for (i, conv, pool) in convs {
        x = b.conv(&format!("features.{i}"), &x, conv);
        x = b.relu(&format!("features.{}", i + 1), &x);
        if pool {
            x = b.max_pool(&format!("features.{}", i + 2), &x, Pool::new(3, 2));
        }
    }
    x = b.flatten("flatten", &x);
    for i in [1, 4] {
        x = b.gemm(&format!("classifier.{i}"), &x, 4096);
        x = b.relu(&format!("classifier.{}", i + 1), &x);
    }
    b.gemm("classifier.6", &x, 1000)
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

/// Ultralytics `Conv`: conv (BN folded into its bias, as exported) + SiLU,
/// named `{p}conv` and `{p}act`.
fn conv_silu(b: &mut GraphBuilder, p: &str, x: &Value, c: Conv) -> Value {
    let y = b.conv(&format!("{p}conv"), x, c);
    b.silu(&format!("{p}act"), &y)
}

/// Ultralytics `C2f`: `cv1` 1x1 to `2c`, Split into halves, `n` bottlenecks
/// (two 3x3 convs, a residual Add with `shortcut`) chained on the second half,
/// Concat of all parts, `cv2` 1x1 to `out`.
fn c2f(b: &mut GraphBuilder, p: &str, x: &Value, out: usize, n: usize, shortcut: bool) -> Value {
    let c = out / 2;
    let y = conv_silu(b, &format!("{p}cv1."), x, Conv::new(2 * c, 1));
    let mut parts = b.chunk(&format!("{p}split"), &y, 1, 2);
    for i in 0..n {
        let q = format!("{p}m.{i}.");
        let last = parts.last().expect("two halves").clone();
        let z = conv_silu(b, &format!("{q}cv1."), &last, Conv::new(c, 3));
        let z = conv_silu(b, &format!("{q}cv2."), &z, Conv::new(c, 3));
        let z = if shortcut {
            b.add(&format!("{q}add"), &last, &z)
        } else {
            z
        };
        parts.push(z);
    }
    let refs: Vec<&Value> = parts.iter().collect();
    let y = b.concat(&format!("{p}concat"), &refs);
    conv_silu(b, &format!("{p}cv2."), &y, Conv::new(out, 1))
}

/// Ultralytics `SPPF`: 1x1 conv to half width, three chained 5x5 stride-1
/// max pools, Concat of the four, 1x1 conv to `out`.
fn sppf(b: &mut GraphBuilder, p: &str, x: &Value, out: usize) -> Value {
    let half = x.shape()[1] / 2;
    let mut parts = vec![conv_silu(b, &format!("{p}cv1."), x, Conv::new(half, 1))];
    for i in 0..3 {
        let pool = Pool::new(5, 1).pads([2; 4]);
        let y = b.max_pool(&format!("{p}m.{i}"), parts.last().expect("cv1"), pool);
        parts.push(y);
    }
    let refs: Vec<&Value> = parts.iter().collect();
    let y = b.concat(&format!("{p}concat"), &refs);
    conv_silu(b, &format!("{p}cv2."), &y, Conv::new(out, 1))
}

/// DFL bins per box side (`reg_max`).
const REG_MAX: usize = 16;

/// A YOLOv8 variant: ultralytics layer numbering (`model.{i}.`), one
/// detection scale per entry of `widths` from the third on.
pub(crate) struct Yolov8 {
    /// Output channels of the stem (P1/2), P2/4, then each detection level
    /// (P3/8, P4/16, ...; the last one also feeds the SPPF).
    pub widths: &'static [usize],
    /// Bottlenecks in the backbone C2f of P2/4 and of each detection level.
    pub depths: &'static [usize],
    /// Box-branch width of the head (`c2`).
    pub box_width: usize,
    /// Class-branch width of the head (`c3`).
    pub class_width: usize,
    /// Classes.
    pub classes: usize,
}

/// YOLOv8 with its export-time head: per-level box and class branches, the
/// levels flattened and concatenated on the anchor axis, Split into box and
/// class channels, DFL (Softmax over 16 bins, a fixed 1x1 conv `0..16`),
/// dist2bbox against constant anchor points, strides, and the class Sigmoid.
/// Output `[1, 4 + classes, anchors]`.
pub(crate) fn yolov8(b: &mut GraphBuilder, x: Value, cfg: &Yolov8) -> Value {
    let w = cfg.widths;
    let levels = w.len() - 2;
    let mut layer = 0;
    let mut next = || {
        layer += 1;
        format!("model.{}.", layer - 1)
    };
    let mut x = conv_silu(b, &next(), &x, Conv::new(w[0], 3).stride(2));
    // backbone: P2/4 and every detection level, each a strided conv + C2f
    let mut features = vec![];
    for (&width, &depth) in w[1..].iter().zip(cfg.depths) {
        x = conv_silu(b, &next(), &x, Conv::new(width, 3).stride(2));
        x = c2f(b, &next(), &x, width, depth, true);
        features.push(x.clone());
    }
    let mut features = features.split_off(1);
    let top = sppf(b, &next(), &x, w[levels + 1]);
    *features.last_mut().expect("levels") = top.clone();
    // top-down: upsample, Concat with the backbone level, C2f
    let mut down = top;
    let mut top_down = vec![];
    for level in (0..levels - 1).rev() {
        let up = b.upsample(&format!("{}upsample", next()), &down, 2);
        let cat = b.concat(&format!("{}concat", next()), &[&up, &features[level]]);
        down = c2f(b, &next(), &cat, w[level + 2], 1, false);
        top_down.push(down.clone());
    }
    top_down.reverse();
    // bottom-up: strided conv, Concat with the top-down level (or SPPF), C2f
    let mut outs = vec![top_down[0].clone()];
    for level in 1..levels {
        let prev = outs.last().expect("level 0");
        let y = conv_silu(b, &next(), prev, Conv::new(w[level + 1], 3).stride(2));
        let skip = top_down.get(level).unwrap_or(&features[levels - 1]);
        let cat = b.concat(&format!("{}concat", next()), &[&y, skip]);
        outs.push(c2f(b, &next(), &cat, w[level + 2], 1, false));
    }
    detect(b, &next(), &outs, cfg)
}

/// The ultralytics `Detect` head at export, on the levels `outs` (P3/8 first).
fn detect(b: &mut GraphBuilder, p: &str, outs: &[Value], cfg: &Yolov8) -> Value {
    let no = 4 * REG_MAX + cfg.classes;
    let mut flat = vec![];
    let (mut anchor_x, mut anchor_y, mut strides) = (vec![], vec![], vec![]);
    for (i, x) in outs.iter().enumerate() {
        let mut branch = |name: &str, width: usize, out: usize| {
            let q = format!("{p}{name}.{i}.");
            let y = conv_silu(b, &format!("{q}0."), x, Conv::new(width, 3));
            let y = conv_silu(b, &format!("{q}1."), &y, Conv::new(width, 3));
            b.conv(&format!("{q}2"), &y, Conv::new(out, 1))
        };
        let boxes = branch("cv2", cfg.box_width, 4 * REG_MAX);
        let classes = branch("cv3", cfg.class_width, cfg.classes);
        let y = b.concat(&format!("{p}concat.{i}"), &[&boxes, &classes]);
        let [_, _, h, w] = y.shape().try_into().expect("4-D");
        flat.push(b.reshape(&format!("{p}flatten.{i}"), &y, &[1, no, h * w]));
        // level i is P(3 + i): stride 8 << i
        let stride = 8 << i;
        for row in 0..h {
            for col in 0..w {
                anchor_x.push(col as f32 + 0.5);
                anchor_y.push(row as f32 + 0.5);
                strides.push(stride as f32);
            }
        }
    }
    let refs: Vec<&Value> = flat.iter().collect();
    let all = b.concat_on(&format!("{p}concat"), &refs, 2);
    let anchors = all.shape()[2];
    let [boxes, classes] = b
        .split(&format!("{p}split"), &all, 1, &[4 * REG_MAX, cfg.classes])
        .try_into()
        .expect("two parts");
    // DFL: expected bin of a softmax over 16 bins per box side
    let d = format!("{p}dfl.");
    let y = b.reshape(&format!("{d}view"), &boxes, &[1, 4, REG_MAX, anchors]);
    let y = b.transpose(&format!("{d}transpose"), &y, &[0, 2, 1, 3]);
    let y = b.softmax_on(&format!("{d}softmax"), &y, 1);
    let bins: Vec<f32> = (0..REG_MAX).map(|i| i as f32).collect();
    let conv = Conv::new(1, 1).no_bias();
    let y = b.conv_with_weight(&format!("{d}conv"), &y, conv, &bins);
    let distances = b.reshape(&format!("{d}out"), &y, &[1, 4, anchors]);
    // dist2bbox (xywh) against the anchor points, then the strides
    let points = [anchor_x, anchor_y].concat();
    let points = b.constant(&format!("{p}anchors"), &[1, 2, anchors], &points);
    let strides = b.constant(&format!("{p}strides"), &[1, anchors], &strides);
    let [lt, rb] = b
        .chunk(&format!("{p}chunk"), &distances, 1, 2)
        .try_into()
        .expect("two halves");
    let x1y1 = b.sub(&format!("{p}x1y1"), &points, &lt);
    let x2y2 = b.add(&format!("{p}x2y2"), &points, &rb);
    let sum = b.add(&format!("{p}corners"), &x1y1, &x2y2);
    let centre = b.div_const(&format!("{p}centre"), &sum, Operand::Scalar(2.0));
    let size = b.sub(&format!("{p}size"), &x2y2, &x1y1);
    let xywh = b.concat(&format!("{p}xywh"), &[&centre, &size]);
    let dbox = b.mul(&format!("{p}dbox"), &xywh, &strides);
    let scores = b.sigmoid(&format!("{p}sigmoid"), &classes);
    b.concat(&format!("{p}output"), &[&dbox, &scores])
}

/// YOLOv8n (width 0.25, depth 0.33, 80 classes) at 640x640: output `[1, 84, 8400]`.
pub(crate) fn yolov8n(b: &mut GraphBuilder, x: Value) -> Value {
    let cfg = Yolov8 {
        widths: &[16, 32, 64, 128, 256],
        depths: &[1, 2, 2, 1],
        // max(16, 64 / 4, 4 * reg_max) and max(64, min(80, 100))
        box_width: 64,
        class_width: 80,
        classes: 80,
    };
    yolov8(b, x, &cfg)
}

/// torchvision `LayerNorm2d`: Transpose to NHWC (`NAME.nhwc`), LayerNorm over
/// channels (`NAME.norm`), Transpose back (`NAME`).
fn layer_norm_2d(b: &mut GraphBuilder, name: &str, x: &Value) -> Value {
    let y = b.transpose(&format!("{name}.nhwc"), x, &[0, 2, 3, 1]);
    let y = b.layer_norm(&format!("{name}.norm"), &y, CONVNEXT_EPS);
    b.transpose(name, &y, &[0, 3, 1, 2])
}

/// LayerNorm epsilon of ConvNeXt.
const CONVNEXT_EPS: f32 = 1e-6;

/// torchvision `CNBlock`: 7x7 depthwise conv, Transpose to NHWC, [Cast,]
/// LayerNorm, Linear to 4C, GELU, Linear to C, Transpose back, layer scale
/// `[C, 1, 1]`, residual Add. `cast` adds the Cast to float that
/// mixed-precision exports put before a LayerNorm.
pub(crate) fn cn_block(b: &mut GraphBuilder, p: &str, x: &Value, cast: bool) -> Value {
    let c = x.shape()[1];
    let y = b.conv(&format!("{p}block.0"), x, Conv::new(c, 7).group(c));
    let mut y = b.transpose(&format!("{p}block.1"), &y, &[0, 2, 3, 1]);
    if cast {
        y = b.cast(&format!("{p}block.2.cast"), &y);
    }
    let y = b.layer_norm(&format!("{p}block.2"), &y, CONVNEXT_EPS);
    let y = b.matmul(&format!("{p}block.3"), &y, 4 * c, true);
    let y = b.gelu(&format!("{p}block.4"), &y);
    let y = b.matmul(&format!("{p}block.5"), &y, c, true);
    let y = b.transpose(&format!("{p}block.6"), &y, &[0, 3, 1, 2]);
    let scale = Operand::Learned {
        shape: &[c, 1, 1],
        lo: 0.5,
        hi: 1.5,
    };
    let y = b.mul_const(&format!("{p}layer_scale"), &y, scale);
    b.add(&format!("{p}add"), &y, x)
}

/// torchvision ConvNeXt features: patchify stem (4x4 stride 4 + LayerNorm2d),
/// then per stage `depths[i]` blocks of width `dims[i]`, with LayerNorm2d +
/// 2x2 stride-2 conv between stages. `cast` as in [`cn_block`].
pub(crate) fn convnext(
    b: &mut GraphBuilder,
    x: Value,
    depths: &[usize],
    dims: &[usize],
    cast: bool,
) -> Value {
    let patchify = Conv::new(dims[0], 4).stride(4).pads([0; 4]);
    let x = b.conv("features.0.0", &x, patchify);
    let mut x = layer_norm_2d(b, "features.0.1", &x);
    for (stage, (&depth, &dim)) in depths.iter().zip(dims).enumerate() {
        let index = 2 * stage + 1;
        if stage > 0 {
            let p = format!("features.{}.", index - 1);
            x = layer_norm_2d(b, &format!("{p}0"), &x);
            let down = Conv::new(dim, 2).stride(2).pads([0; 4]);
            x = b.conv(&format!("{p}1"), &x, down);
        }
        for i in 0..depth {
            x = cn_block(b, &format!("features.{index}.{i}."), &x, cast);
        }
    }
    x
}

/// torchvision ConvNeXt-Tiny at 224x224 with its classifier (GlobalAveragePool,
/// LayerNorm2d, Flatten, Gemm): output `[1, 1000]`.
pub(crate) fn convnext_tiny(b: &mut GraphBuilder, x: Value) -> Value {
    let x = convnext(b, x, &[3, 3, 9, 3], &[96, 192, 384, 768], false);
    let x = b.global_average_pool("avgpool", &x);
    let x = layer_norm_2d(b, "classifier.0", &x);
    let x = b.flatten("classifier.1", &x);
    b.gemm("classifier.2", &x, 1000)
}

/// torchvision `Conv2dNormActivation` with SiLU: `{p}0` conv (no bias),
/// `{p}1` BN, `{p}2` SiLU (Sigmoid + Mul).
fn conv_bn_silu(b: &mut GraphBuilder, p: &str, x: &Value, c: Conv) -> Value {
    let y = b.conv(&format!("{p}0"), x, c.no_bias());
    let y = b.batch_norm(&format!("{p}1"), &y);
    b.silu(&format!("{p}2"), &y)
}

/// One EfficientNet `MBConv` setting: expansion, kernel, first stride, output
/// channels, repeats.
#[derive(Clone, Copy)]
pub(crate) struct MbConv {
    /// Expansion ratio of the 1x1 expand conv (1: none).
    pub expand: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Stride of the first block.
    pub stride: usize,
    /// Output channels.
    pub out: usize,
    /// Blocks in the stage.
    pub repeats: usize,
}

/// torchvision `MBConv`: [1x1 expand + BN + SiLU], depthwise + BN + SiLU,
/// squeeze-excitation (pool, 1x1 reduce to `in / 4`, SiLU, 1x1 expand,
/// Sigmoid, Mul), 1x1 project + BN, residual Add when the shapes match.
fn mb_conv(b: &mut GraphBuilder, p: &str, x: &Value, m: MbConv, stride: usize) -> Value {
    let in_ch = x.shape()[1];
    let hidden = in_ch * m.expand;
    let mut y = x.clone();
    let mut k = 0;
    if m.expand != 1 {
        y = conv_bn_silu(b, &format!("{p}block.0."), &y, Conv::new(hidden, 1));
        k = 1;
    }
    let dw = Conv::new(hidden, m.kernel).stride(stride).group(hidden);
    y = conv_bn_silu(b, &format!("{p}block.{k}."), &y, dw);
    let se = format!("{p}block.{}.", k + 1);
    let s = b.global_average_pool(&format!("{se}avgpool"), &y);
    let s = b.conv(&format!("{se}fc1"), &s, Conv::new((in_ch / 4).max(1), 1));
    let s = b.silu(&format!("{se}activation"), &s);
    let s = b.conv(&format!("{se}fc2"), &s, Conv::new(hidden, 1));
    let s = b.sigmoid(&format!("{se}scale_activation"), &s);
    y = b.mul(&format!("{se}scale"), &s, &y);
    let project = format!("{p}block.{}.", k + 2);
    y = b.conv(&format!("{project}0"), &y, Conv::new(m.out, 1).no_bias());
    y = b.batch_norm(&format!("{project}1"), &y);
    if stride == 1 && in_ch == m.out {
        b.add(&format!("{p}add"), &y, x)
    } else {
        y
    }
}

/// torchvision EfficientNet features: stem 3x3 stride 2 conv + BN + SiLU, the
/// MBConv stages, then a 1x1 conv to `head` + BN + SiLU.
pub(crate) fn efficientnet(
    b: &mut GraphBuilder,
    x: Value,
    stem: usize,
    stages: &[MbConv],
    head: usize,
) -> Value {
    let mut x = conv_bn_silu(b, "features.0.", &x, Conv::new(stem, 3).stride(2));
    for (i, &m) in stages.iter().enumerate() {
        for j in 0..m.repeats {
            let stride = if j == 0 { m.stride } else { 1 };
            x = mb_conv(b, &format!("features.{}.{j}.", i + 1), &x, m, stride);
        }
    }
    let p = format!("features.{}.", stages.len() + 1);
    conv_bn_silu(b, &p, &x, Conv::new(head, 1))
}

/// torchvision EfficientNet-B0 at 224x224 with its classifier (pool, Flatten,
/// Dropout, Gemm): output `[1, 1000]`.
pub(crate) fn efficientnet_b0(b: &mut GraphBuilder, x: Value) -> Value {
    #[rustfmt::skip]
    const B0: [MbConv; 7] = [
        MbConv { expand: 1, kernel: 3, stride: 1, out: 16, repeats: 1 },
        MbConv { expand: 6, kernel: 3, stride: 2, out: 24, repeats: 2 },
        MbConv { expand: 6, kernel: 5, stride: 2, out: 40, repeats: 2 },
        MbConv { expand: 6, kernel: 3, stride: 2, out: 80, repeats: 3 },
        MbConv { expand: 6, kernel: 5, stride: 1, out: 112, repeats: 3 },
        MbConv { expand: 6, kernel: 5, stride: 2, out: 192, repeats: 4 },
        MbConv { expand: 6, kernel: 3, stride: 1, out: 320, repeats: 1 },
    ];
    let x = efficientnet(b, x, 32, &B0, 1280);
    let x = b.global_average_pool("avgpool", &x);
    let x = b.flatten("flatten", &x);
    let x = b.dropout("classifier.0", &x);
    b.gemm("classifier.1", &x, 1000)
}

/// Conv (no bias) + BN [+ Relu], torchvision `Sequential` indices from `i`:
/// `{p}{i}`, `{p}{i+1}`, `{p}{i+2}`.
fn conv_bn_maybe_relu(
    b: &mut GraphBuilder,
    p: &str,
    i: usize,
    x: &Value,
    c: Conv,
    relu: bool,
) -> Value {
    let y = b.conv(&format!("{p}{i}"), x, c.no_bias());
    let y = b.batch_norm(&format!("{p}{}", i + 1), &y);
    if relu {
        b.relu(&format!("{p}{}", i + 2), &y)
    } else {
        y
    }
}

/// ShuffleNetV2's branch2: 1x1 + BN + Relu, 3x3 depthwise (stride) + BN,
/// 1x1 + BN + Relu, all `width` wide.
fn shuffle_branch(b: &mut GraphBuilder, p: &str, x: &Value, width: usize, stride: usize) -> Value {
    let y = conv_bn_maybe_relu(b, p, 0, x, Conv::new(width, 1), true);
    let dw = Conv::new(width, 3).stride(stride).group(width);
    let y = conv_bn_maybe_relu(b, p, 3, &y, dw, false);
    conv_bn_maybe_relu(b, p, 5, &y, Conv::new(width, 1), true)
}

/// torchvision ShuffleNetV2 `InvertedResidual` to `out` channels: stride 1
/// splits the input into halves and transforms the second; stride 2 runs a
/// depthwise branch1 and branch2 on the whole input. Then Concat and the
/// channel shuffle (Reshape `[N, 2, C/2, H, W]`, Transpose, Reshape back).
fn shuffle_unit(b: &mut GraphBuilder, p: &str, x: &Value, out: usize, stride: usize) -> Value {
    let half = out / 2;
    let (left, right) = if stride == 1 {
        let [x1, x2] = b
            .chunk(&format!("{p}chunk"), x, 1, 2)
            .try_into()
            .expect("two halves");
        (x1, shuffle_branch(b, &format!("{p}branch2."), &x2, half, 1))
    } else {
        let in_ch = x.shape()[1];
        let q = format!("{p}branch1.");
        let dw = Conv::new(in_ch, 3).stride(stride).group(in_ch);
        let y = conv_bn_maybe_relu(b, &q, 0, x, dw, false);
        let y = conv_bn_maybe_relu(b, &q, 2, &y, Conv::new(half, 1), true);
        (
            y,
            shuffle_branch(b, &format!("{p}branch2."), x, half, stride),
        )
    };
    let y = b.concat(&format!("{p}concat"), &[&left, &right]);
    let [n, c, h, w] = y.shape().try_into().expect("4-D");
    let y = b.reshape(&format!("{p}shuffle.view"), &y, &[n, 2, c / 2, h, w]);
    let y = b.transpose(&format!("{p}shuffle.transpose"), &y, &[0, 2, 1, 3, 4]);
    b.reshape(&format!("{p}shuffle"), &y, &[n, c, h, w])
}

/// torchvision ShuffleNetV2 features: conv1 3x3 stride 2 + BN + Relu, 3x3
/// stride-2 max pool, stages of `(units, channels)` (the first unit of each
/// with stride 2), then conv5 1x1 to `conv5` + BN + Relu.
pub(crate) fn shufflenet_v2(
    b: &mut GraphBuilder,
    x: Value,
    stem: usize,
    stages: &[(usize, usize)],
    conv5: usize,
) -> Value {
    let x = conv_bn_maybe_relu(b, "conv1.", 0, &x, Conv::new(stem, 3).stride(2), true);
    let mut x = b.max_pool("maxpool", &x, Pool::new(3, 2).pads([1; 4]));
    for (i, &(units, channels)) in stages.iter().enumerate() {
        for j in 0..units {
            let stride = if j == 0 { 2 } else { 1 };
            x = shuffle_unit(b, &format!("stage{}.{j}.", i + 2), &x, channels, stride);
        }
    }
    conv_bn_maybe_relu(b, "conv5.", 0, &x, Conv::new(conv5, 1), true)
}

/// torchvision ShuffleNetV2 x1.0 at 224x224 with its head (mean over H and W
/// as ReduceMean, Gemm): output `[1, 1000]`.
pub(crate) fn shufflenetv2(b: &mut GraphBuilder, x: Value) -> Value {
    let x = shufflenet_v2(b, x, 24, &[(4, 116), (8, 232), (4, 464)], 1024);
    let x = b.reduce_mean("mean", &x, &[2, 3], false);
    b.gemm("fc", &x, 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::tensor_proto::DataType;

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

    /// Learned parameters of `define` as PyTorch counts them: f32
    /// initializers except BN running statistics and exported constants
    /// (scalars, Resize scales, anchor points, strides).
    fn parameters(define: fn(&mut GraphBuilder, Value) -> Value, input: [usize; 4]) -> usize {
        let mut b = GraphBuilder::new("params");
        let x = b.input("input", &input);
        let y = define(&mut b, x);
        let graph = b.finish("", &[&y]).graph.expect("graph");
        let constant = [".mean", ".var", ".value", ".scales", ".anchors", ".strides"];
        graph
            .initializer
            .iter()
            .filter(|t| t.data_type == DataType::Float as i32)
            .filter(|t| !constant.iter().any(|c| t.name.ends_with(c)))
            .map(|t| t.raw_data.len() / 4)
            .sum()
    }

    #[test]
    fn todays_architectures_match_the_reference_parameter_counts() {
        // ultralytics `YOLOv8n summary (fused)` and torchvision's model docs
        assert_eq!(parameters(yolov8n, [1, 3, 640, 640]), 3_151_904);
        assert_eq!(parameters(convnext_tiny, [1, 3, 224, 224]), 28_589_128);
        assert_eq!(parameters(efficientnet_b0, [1, 3, 224, 224]), 5_288_548);
        assert_eq!(parameters(shufflenetv2, [1, 3, 224, 224]), 2_278_604);
        assert_eq!(parameters(alexnet, [1, 3, 224, 224]), 61_100_840);
    }

    #[test]
    fn todays_architectures_output_shapes_and_conv_macs() {
        let (m, y) = macs(yolov8n, [1, 3, 640, 640]);
        assert_eq!((giga(m), y.shape()), (4.37, &[1, 84, 8400][..]));
        // ConvNeXt's MatMuls (4.16 G MACs) are not convs
        let (m, y) = macs(convnext_tiny, [1, 3, 224, 224]);
        assert_eq!((giga(m), y.shape()), (0.29, &[1, 1000][..]));
        let (m, y) = macs(efficientnet_b0, [1, 3, 224, 224]);
        assert_eq!((giga(m), y.shape()), (0.38, &[1, 1000][..]));
        let (m, y) = macs(shufflenetv2, [1, 3, 224, 224]);
        assert_eq!((giga(m), y.shape()), (0.14, &[1, 1000][..]));
        // AlexNet's FC head (58.6 M MACs) is not convs either
        let (m, y) = macs(alexnet, [1, 3, 224, 224]);
        assert_eq!((giga(m), y.shape()), (0.66, &[1, 1000][..]));
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
