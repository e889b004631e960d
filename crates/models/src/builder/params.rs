//! Conv and pool parameters, and the output-size rule they share.

/// Convolution parameters; ONNX pads order `[top, left, bottom, right]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv {
    /// Output channels.
    pub out_channels: usize,
    /// Kernel `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Strides `[sh, sw]`.
    pub stride: [usize; 2],
    /// Pads `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    /// Dilations `[dh, dw]`.
    pub dilation: [usize; 2],
    /// Groups (input channels for a depthwise conv).
    pub group: usize,
    /// Whether the conv has a bias input.
    pub bias: bool,
}

impl Conv {
    /// A `k`x`k` conv, stride 1, "same" pads `k/2`, with bias.
    pub fn new(out_channels: usize, k: usize) -> Self {
        Conv {
            out_channels,
            kernel: [k, k],
            stride: [1, 1],
            pads: [k / 2; 4],
            dilation: [1, 1],
            group: 1,
            bias: true,
        }
    }

    /// Sets both strides.
    pub fn stride(self, s: usize) -> Self {
        Conv {
            stride: [s, s],
            ..self
        }
    }

    /// Sets the pads `[top, left, bottom, right]`.
    pub fn pads(self, pads: [usize; 4]) -> Self {
        Conv { pads, ..self }
    }

    /// Sets both dilations (pads are left as they are).
    pub fn dilation(self, d: usize) -> Self {
        Conv {
            dilation: [d, d],
            ..self
        }
    }

    /// Sets the group count.
    pub fn group(self, group: usize) -> Self {
        Conv { group, ..self }
    }

    /// Drops the bias input (for a conv followed by BatchNormalization).
    pub fn no_bias(self) -> Self {
        Conv {
            bias: false,
            ..self
        }
    }
}

/// MaxPool / AveragePool parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Kernel `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Strides `[sh, sw]`.
    pub stride: [usize; 2],
    /// Pads `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    /// Round output sizes up instead of down.
    pub ceil_mode: bool,
    /// AveragePool only: count padding cells in the divisor.
    pub count_include_pad: bool,
}

impl Pool {
    /// A `k`x`k` pool with stride `s`, no padding, floor mode.
    pub fn new(k: usize, s: usize) -> Self {
        Pool {
            kernel: [k, k],
            stride: [s, s],
            pads: [0; 4],
            ceil_mode: false,
            count_include_pad: false,
        }
    }

    /// Sets the pads `[top, left, bottom, right]`.
    pub fn pads(self, pads: [usize; 4]) -> Self {
        Pool { pads, ..self }
    }

    /// Sets `ceil_mode = 1`.
    pub fn ceil_mode(self) -> Self {
        Pool {
            ceil_mode: true,
            ..self
        }
    }

    /// Sets `count_include_pad = 1`.
    pub fn count_include_pad(self) -> Self {
        Pool {
            count_include_pad: true,
            ..self
        }
    }
}

/// The constant second operand of [`GraphBuilder::add_const`],
/// [`GraphBuilder::mul_const`] and [`GraphBuilder::div_const`].
///
/// [`GraphBuilder::add_const`]: super::GraphBuilder::add_const
/// [`GraphBuilder::mul_const`]: super::GraphBuilder::mul_const
/// [`GraphBuilder::div_const`]: super::GraphBuilder::div_const
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Operand<'a> {
    /// A fixed 0-D value, the initializer `NODE.value` (an epsilon, a GELU constant).
    Scalar(f32),
    /// Learned values uniform in `[lo, hi)` of a shape that broadcasts against
    /// the input (`[C]` channels-last, `[C, 1, 1]` channels-first): the
    /// initializer `NODE.weight` of a Mul or Div, `NODE.bias` of an Add.
    Learned {
        /// The constant's shape.
        shape: &'a [usize],
        /// Lower bound of the values.
        lo: f32,
        /// Upper bound of the values (excluded).
        hi: f32,
    },
}

/// Output size of a window op along one axis (PyTorch/ONNX rule: with
/// `ceil`, a last window starting inside the end padding is dropped).
pub(super) fn window_out(
    size: usize,
    k: usize,
    s: usize,
    d: usize,
    pads: (usize, usize),
    ceil: bool,
) -> usize {
    let span = d * (k - 1) + 1;
    let padded = size + pads.0 + pads.1;
    assert!(
        padded >= span,
        "window {span} larger than padded input {padded}"
    );
    let mut out = if ceil {
        (padded - span).div_ceil(s) + 1
    } else {
        (padded - span) / s + 1
    };
    if ceil && (out - 1) * s >= size + pads.0 {
        out -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sizes() {
        assert_eq!(window_out(224, 3, 1, 1, (1, 1), false), 224);
        assert_eq!(window_out(224, 2, 2, 1, (0, 0), false), 112);
        assert_eq!(window_out(112, 3, 2, 1, (1, 1), false), 56);
        assert_eq!(window_out(13, 2, 1, 1, (0, 1), false), 13);
        assert_eq!(window_out(24, 3, 2, 1, (0, 0), true), 12);
        assert_eq!(window_out(24, 3, 2, 1, (0, 0), false), 11);
        assert_eq!(window_out(24, 3, 1, 2, (2, 2), false), 24);
        // ceil mode never starts a window in the end padding
        assert_eq!(window_out(5, 2, 2, 1, (0, 1), true), 3);
        assert_eq!(window_out(4, 2, 2, 1, (0, 1), true), 2);
    }
}
