//! int8 compute for convolutions: the `neo_q8_conv` operator.
//!
//! tract 0.23 runs an int8 ONNX convolution (QLinearConv) as an im2col, an int8 matrix
//! product and a chain of a dozen unfused element-wise steps for the zero points and the
//! requantization (`neoc baseline --profile` shows them), which made int8 EfficientNet-Lite0
//! 24x slower than f32 on AVX2 and still 7-10x on a VNNI Xeon. This operator does the whole
//! convolution in one node with f32 in and f32 out, so it drops into tract's f32 graph:
//!
//! 1. quantize the input with the calibrated per-tensor scale and zero point (uint8),
//! 2. lay it out as the int8 matrix product wants (im2col, four input values per 32-bit lane,
//!    padding filled with the zero point),
//! 3. multiply with the int8 weights (symmetric, per output channel) into i32,
//! 4. one multiply-add per output back to f32: `acc × (input scale × weight scale) + offset`,
//!    where the offset holds the bias and the zero point's share (`zp × Σw`).
//!
//! Steps 1, 2 and 4 touch each value once; step 3 runs on the CPU's int8 dot product where it
//! has one: AVX-512 VNNI (`vpdpbusd`, u8 × i8) on x86_64, the Armv8.2 dot product (`sdot`,
//! i8 × i8: the input is flipped to i8 and the difference taken back through `128 × Σw`) on
//! aarch64, else portable Rust. All kernels produce the same i32 sums and share step 4, so
//! the results are bit-identical whichever kernel a device has.

use std::sync::{Arc, OnceLock};
use tract_nnef::internal::*;
use tract_nnef::ser::{ints, invocation, numeric};

/// The NNEF primitive's name.
pub const PRIMITIVE: &str = "neo_q8_conv";
/// Output channels per micro-tile (weights are packed in blocks of this many).
const MR: usize = 8;
/// Output pixels are computed in tiles of this many (the widest kernel's tile).
const NR_PAD: usize = 32;
/// Depthwise outputs are summed this many columns at a time.
const DW_BLOCK: usize = 16;
/// Largest kernel side, stride and dilation accepted, and largest padding.
const MAX_WINDOW: usize = 64;
const MAX_PADDING: usize = 1024;

/// Which int8 dot-product kernel runs the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    /// x86_64 with AVX2 but no VNNI: the portable code compiled for AVX2.
    Avx2,
    /// x86_64 AVX-512 VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// aarch64 Armv8.2 dot product (`sdot`).
    NeonDot,
}

impl Kernel {
    /// The fastest kernel this CPU runs; `NEO_Q8_KERNEL=portable` (or `avx2`, where the CPU
    /// has it) forces a slower one, for comparisons.
    pub fn detect() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            let best = Kernel::best();
            match std::env::var("NEO_Q8_KERNEL").as_deref() {
                Ok("portable") => Kernel::Portable,
                Ok("avx2") if best != Kernel::Portable && best != Kernel::NeonDot => Kernel::Avx2,
                _ => best,
            }
        })
    }

    /// Whether this kernel runs on an int8 dot-product instruction (else int8 compute is
    /// slower than f32 here).
    pub fn is_dot_product(self) -> bool {
        matches!(self, Kernel::Avx512Vnni | Kernel::NeonDot)
    }

    fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Kernel::Avx512Vnni;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            return Kernel::Avx2;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Kernel::NeonDot;
        }
        Kernel::Portable
    }

    /// Pixels per tile.
    fn nr(self) -> usize {
        match self {
            Kernel::Portable | Kernel::Avx2 | Kernel::Avx512Vnni => 32,
            Kernel::NeonDot => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::NeonDot => "neon-dotprod",
        }
    }
}

/// A 2-D convolution's shape (NCHW): one group, or depthwise (one group per channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    pub input_channels: usize,
    pub output_channels: usize,
    /// 1, or the number of channels (depthwise: input channels = output channels).
    pub group: usize,
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// Zero padding: top, left, bottom, right.
    pub padding: [usize; 4],
}

impl Geometry {
    /// Output height and width for an input of `h` × `w`.
    pub fn output_hw(&self, h: usize, w: usize) -> TractResult<(usize, usize)> {
        let mut out = [0; 2];
        for (axis, size) in [h, w].into_iter().enumerate() {
            let span = self.dilations[axis] * (self.kernel[axis] - 1) + 1;
            let padded = size + self.padding[axis] + self.padding[axis + 2];
            ensure!(
                padded >= span && self.strides[axis] > 0,
                "the convolution's window ({span}) is larger than its padded input ({padded})"
            );
            out[axis] = (padded - span) / self.strides[axis] + 1;
        }
        Ok((out[0], out[1]))
    }

    /// Input values per output value (the im2col matrix's rows for one group).
    fn depth(&self) -> usize {
        self.input_channels / self.group * self.kernel[0] * self.kernel[1]
    }

    fn depthwise(&self) -> bool {
        self.group > 1
    }
}

/// A convolution computed in int8 (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Q8Conv {
    pub geometry: Geometry,
    /// The input's quantization: `q = round(x / scale) + zero`, clamped to 0..=255.
    pub input_scale: f32,
    pub input_zero: u8,
    /// int8 weights, `[output channels, input channels, kernel h, kernel w]`.
    pub weights: Arc<Tensor>,
    /// Per output channel: `weight = int8 × scale`.
    pub weight_scales: Arc<Tensor>,
    /// Per output channel, f32.
    pub bias: Arc<Tensor>,
    /// The output is clamped to `[lo, hi]`: a following ReLU or ReLU6 folded in (no clamp:
    /// −∞, +∞).
    pub clamp: [f32; 2],
    packed: Arc<Packed>,
}

/// The weights as the kernels read them, and the per-channel output transform.
#[derive(Debug)]
struct Packed {
    /// Blocks of four rows of the im2col matrix.
    k4: usize,
    blocks: usize,
    /// `[block][k4][MR][4]`, zero beyond the real channels and rows (empty for depthwise).
    weights: Vec<i8>,
    /// Depthwise: each channel's taps, widened once here rather than per image.
    taps: Vec<i32>,
    /// Σ of each output channel's weights.
    sums: Vec<i32>,
    /// `input scale × weight scale`.
    multiplier: Vec<f32>,
    /// `bias − multiplier × zero × Σw`.
    offset: Vec<f32>,
}

impl PartialEq for Q8Conv {
    fn eq(&self, other: &Self) -> bool {
        self.geometry == other.geometry
            && self.input_scale.to_bits() == other.input_scale.to_bits()
            && self.input_zero == other.input_zero
            && self.weights == other.weights
            && self.weight_scales == other.weight_scales
            && self.bias == other.bias
            && self.clamp.map(f32::to_bits) == other.clamp.map(f32::to_bits)
    }
}
impl Eq for Q8Conv {}

impl Q8Conv {
    /// Checks the parts against each other and packs the weights.
    pub fn new(
        geometry: Geometry,
        input_scale: f32,
        input_zero: u8,
        weights: Arc<Tensor>,
        weight_scales: Arc<Tensor>,
        bias: Arc<Tensor>,
    ) -> TractResult<Q8Conv> {
        let g = geometry;
        ensure!(
            g.kernel
                .iter()
                .chain(&g.strides)
                .chain(&g.dilations)
                .all(|v| *v > 0),
            "kernel, strides and dilations must be positive"
        );
        // A damaged or crafted graph must not make the device allocate without bound.
        ensure!(
            g.kernel
                .iter()
                .chain(&g.strides)
                .chain(&g.dilations)
                .all(|v| *v <= MAX_WINDOW)
                && g.padding.iter().all(|p| *p <= MAX_PADDING),
            "kernel {:?}, strides {:?}, dilations {:?} (at most {MAX_WINDOW}) or padding {:?} \
             (at most {MAX_PADDING}) out of range",
            g.kernel,
            g.strides,
            g.dilations,
            g.padding
        );
        ensure!(
            input_scale.is_finite() && input_scale > 0.0,
            "input scale {input_scale} must be positive"
        );
        ensure!(
            weights.datum_type() == i8::datum_type(),
            "weights must be int8"
        );
        ensure!(
            g.group == 1 || (g.group == g.input_channels && g.group == g.output_channels),
            "only plain (group 1) and depthwise convolutions, not {} groups of {}→{}",
            g.group,
            g.input_channels,
            g.output_channels
        );
        ensure!(
            weights.shape()
                == [
                    g.output_channels,
                    g.input_channels / g.group,
                    g.kernel[0],
                    g.kernel[1]
                ],
            "weights of shape {:?} for a {}→{} {}x{} convolution",
            weights.shape(),
            g.input_channels,
            g.output_channels,
            g.kernel[0],
            g.kernel[1]
        );
        let scales = weight_scales.to_plain_array_view::<f32>()?;
        let bias_values = bias.to_plain_array_view::<f32>()?;
        ensure!(
            scales.len() == g.output_channels && bias_values.len() == g.output_channels,
            "one weight scale and one bias per output channel"
        );
        let w = weights.to_plain_array_view::<i8>()?;
        let w = w.as_slice().context("weights are not contiguous")?;
        let k = g.depth();
        let sums: Vec<i32> = w
            .chunks_exact(k)
            .map(|c| c.iter().map(|v| *v as i32).sum())
            .collect();
        let taps: Vec<i32> = if g.depthwise() {
            w.iter().map(|v| *v as i32).collect()
        } else {
            Vec::new()
        };
        // Depthwise: the taps above. Otherwise blocks of MR channels × 4 rows.
        let (k4, blocks, packed) = if g.depthwise() {
            (0, 0, Vec::new())
        } else {
            let k4 = k.div_ceil(4);
            let blocks = g.output_channels.div_ceil(MR);
            let mut packed = vec![0i8; blocks * k4 * MR * 4];
            for (co, row) in w.chunks_exact(k).enumerate() {
                let (block, m) = (co / MR, co % MR);
                for (kk, &v) in row.iter().enumerate() {
                    packed[((block * k4 + kk / 4) * MR + m) * 4 + kk % 4] = v;
                }
            }
            (k4, blocks, packed)
        };
        let mut multiplier = Vec::with_capacity(g.output_channels);
        let mut offset = Vec::with_capacity(g.output_channels);
        for ((s, b), sum) in scales.iter().zip(bias_values.iter()).zip(&sums) {
            let m = input_scale * s;
            multiplier.push(m);
            offset.push(b - m * (input_zero as i32 * sum) as f32);
        }
        Ok(Q8Conv {
            geometry,
            input_scale,
            input_zero,
            weights,
            weight_scales,
            bias,
            clamp: [f32::NEG_INFINITY, f32::INFINITY],
            packed: Arc::new(Packed {
                k4,
                blocks,
                weights: packed,
                taps,
                sums,
                multiplier,
                offset,
            }),
        })
    }

    /// The same convolution with its output clamped to `[lo, hi]` (a ReLU folded in).
    pub fn with_clamp(mut self, lo: f32, hi: f32) -> TractResult<Q8Conv> {
        ensure!(lo <= hi, "clamp [{lo}, {hi}] is empty or not a number");
        self.clamp = [lo, hi];
        Ok(self)
    }

    /// The convolution of one image: `x` is `[C, H, W]`, `out` `[C', H', W']`.
    #[allow(unsafe_code)]
    fn run_image(&self, kernel: Kernel, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512Vnni {
            // SAFETY: the VNNI kernel is chosen only on CPUs with AVX-512F/BW and VNNI.
            return unsafe { self.run_image_avx512(kernel, x, h, w, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx2 {
            // SAFETY: the AVX2 kernel is chosen only on CPUs with AVX2.
            return unsafe { self.run_image_avx2(kernel, x, h, w, out) };
        }
        self.run_image_with(kernel, x, h, w, out)
    }

    /// [`Self::run_image_with`] compiled for AVX2 (the portable code, vectorized 8 wide).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    unsafe fn run_image_avx2(
        &self,
        kernel: Kernel,
        x: &[f32],
        h: usize,
        w: usize,
        out: &mut [f32],
    ) {
        self.run_image_with(kernel, x, h, w, out)
    }

    /// [`Self::run_image_with`] compiled for AVX-512: the quantization, im2col and output
    /// loops vectorize 16 wide (same operations, same results as the baseline build).
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    unsafe fn run_image_avx512(
        &self,
        kernel: Kernel,
        x: &[f32],
        h: usize,
        w: usize,
        out: &mut [f32],
    ) {
        self.run_image_with(kernel, x, h, w, out)
    }

    #[inline(always)]
    fn run_image_with(&self, kernel: Kernel, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
        let g = &self.geometry;
        let (oh, ow) = self
            .geometry
            .output_hw(h, w)
            .expect("checked by output_facts");
        let n = oh * ow;
        let npad = n.div_ceil(NR_PAD) * NR_PAD;
        let p = &*self.packed;
        // 1. Quantize, rounding half to even by adding and taking away 1.5 × 2^23 (plain f32
        //    arithmetic: it vectorizes where `round` is a libm call per value).
        let inv = 1.0 / self.input_scale;
        let zero = self.input_zero as f32;
        let mut q = vec![0u8; x.len()];
        quantize(kernel, x, inv, zero, &mut q);
        if g.depthwise() {
            return self.depthwise_image(kernel, &q, h, w, out);
        }
        // 2. im2col, four rows interleaved per 32-bit lane: b[kb][pixel][4].
        let mut b = vec![self.input_zero; p.k4 * npad * 4];
        let [kh, kw] = g.kernel;
        if [kh, kw] == [1, 1] && g.strides == [1, 1] && g.padding == [0; 4] {
            // Pointwise: the rows are the channels, interleaved four at a time, whole planes at
            // once (the general path below, per output row, made SqueezeNet 10.3 ms, not 8.7).
            for (kb, dst) in b.chunks_exact_mut(npad * 4).enumerate() {
                let row = |j: usize| q.get((kb * 4 + j) * n..(kb * 4 + j + 1) * n);
                if let (Some(r0), Some(r1), Some(r2), Some(r3)) = (row(0), row(1), row(2), row(3)) {
                    for (i, d) in dst[..n * 4].chunks_exact_mut(4).enumerate() {
                        d.copy_from_slice(&[r0[i], r1[i], r2[i], r3[i]]);
                    }
                } else {
                    for j in 0..4 {
                        if let Some(r) = row(j) {
                            for (d, v) in dst.chunks_exact_mut(4).zip(r) {
                                d[j] = *v;
                            }
                        }
                    }
                }
            }
        } else {
            let [sy, sx] = g.strides;
            let [dy, dx] = g.dilations;
            let (top, left) = (g.padding[0], g.padding[1]);
            // Per row of the im2col matrix: its plane, its kernel row offset, and the output
            // columns whose input column ox·sx + kx·dx − left is inside.
            let rows: Vec<(usize, usize, usize, usize, usize)> = (0..g.depth())
                .map(|row| {
                    let (ci, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
                    let shift = kx * dx;
                    let lo = left.saturating_sub(shift).div_ceil(sx).min(ow);
                    let hi = (w + left).saturating_sub(shift).div_ceil(sx).clamp(lo, ow);
                    (ci, ky * dy, shift, lo, hi)
                })
                .collect();
            // The input row an output row reads for a kernel row offset, if inside.
            let input_row = |oy: usize, ky: usize| {
                let iy = oy * sy + ky;
                (iy >= top && iy - top < h).then(|| iy - top)
            };
            for (kb, group) in rows.chunks(4).enumerate() {
                let dst = &mut b[kb * npad * 4..(kb + 1) * npad * 4];
                for oy in 0..oh {
                    let out_row = &mut dst[oy * ow * 4..(oy + 1) * ow * 4];
                    let src = |j: usize| {
                        let (ci, ky, _, _, _) = group[j];
                        input_row(oy, ky).map(|iy| &q[(ci * h + iy) * w..(ci * h + iy + 1) * w])
                    };
                    // Four rows inside over a common span: written as 4-byte groups.
                    let (mut lo, mut hi) = (0, ow);
                    let full = group.len() == 4
                        && (0..4).all(|j| {
                            lo = lo.max(group[j].3);
                            hi = hi.min(group[j].4);
                            src(j).is_some()
                        });
                    if full && lo < hi {
                        let s: [&[u8]; 4] = std::array::from_fn(|j| src(j).expect("checked above"));
                        let at = |j: usize, ox: usize| ox * sx + group[j].2 - left;
                        for (ox, d) in (lo..hi).zip(out_row[lo * 4..hi * 4].chunks_exact_mut(4)) {
                            d.copy_from_slice(&[
                                s[0][at(0, ox)],
                                s[1][at(1, ox)],
                                s[2][at(2, ox)],
                                s[3][at(3, ox)],
                            ]);
                        }
                    } else {
                        (lo, hi) = (ow, ow); // nothing written yet
                    }
                    // The rest, one row at a time (edges, rows outside, a last partial group).
                    for (j, &(_, _, shift, rlo, rhi)) in group.iter().enumerate() {
                        let Some(s) = src(j) else {
                            continue; // stays the zero point
                        };
                        for ox in (rlo..rhi.min(lo)).chain(rlo.max(hi)..rhi) {
                            out_row[ox * 4 + j] = s[ox * sx + shift - left];
                        }
                    }
                }
            }
        }
        // 3 + 4. Tiles of MR channels × nr pixels, then back to f32.
        let nr = kernel.nr();
        let mut acc = [0i32; MR * NR_PAD];
        let flipped = kernel == Kernel::NeonDot;
        for n0 in (0..npad).step_by(nr) {
            for block in 0..p.blocks {
                let wb = &p.weights[block * p.k4 * MR * 4..(block + 1) * p.k4 * MR * 4];
                let bb = &b[n0 * 4..];
                tile(kernel, p.k4, wb, bb, npad * 4, &mut acc);
                for m in 0..MR {
                    let co = block * MR + m;
                    if co >= g.output_channels {
                        break;
                    }
                    let (mul, off) = (p.multiplier[co], p.offset[co]);
                    let [lo, hi] = self.clamp;
                    let fix = if flipped { 128 * p.sums[co] } else { 0 };
                    let row = &mut out[co * n..(co + 1) * n];
                    for i in 0..nr.min(n.saturating_sub(n0)) {
                        row[n0 + i] = ((acc[m * nr + i] + fix) as f32 * mul + off).max(lo).min(hi);
                    }
                }
            }
        }
    }
}

impl Q8Conv {
    /// A depthwise convolution of one quantized image: per channel, the zero-padded plane
    /// (split into `stride` column phases so every tap reads contiguous values), then each
    /// output row as i32 sums over the taps, vectorized along the row.
    #[inline(always)]
    fn depthwise_image(&self, kernel: Kernel, q: &[u8], h: usize, w: usize, out: &mut [f32]) {
        let g = &self.geometry;
        let p = &*self.packed;
        let (oh, ow) = g.output_hw(h, w).expect("checked by output_facts");
        let [kh, kw] = g.kernel;
        let [sy, sx] = g.strides;
        let [dy, dx] = g.dilations;
        let (top, left) = (g.padding[0], g.padding[1]);
        let (ph, pw) = (h + top + g.padding[2], w + left + g.padding[3]);
        let phase_w = pw.div_ceil(sx);
        // Only the interior is rewritten per channel: the border stays the zero point.
        let mut phases = vec![self.input_zero; sx * ph * phase_w + DW_BLOCK];
        // Where each tap's values start in `phases`, relative to an output's (row, column).
        let offsets: Vec<usize> = (0..kh * kw)
            .map(|t| {
                let (ky, kx) = (t / kw, t % kw);
                ((kx * dx % sx) * ph + ky * dy) * phase_w + kx * dx / sx
            })
            .collect();
        for c in 0..g.output_channels {
            let plane = &q[c * h * w..(c + 1) * h * w];
            for (y, row) in plane.chunks_exact(w).enumerate() {
                if sx == 1 {
                    let start = (y + top) * phase_w + left;
                    phases[start..start + w].copy_from_slice(row);
                    continue;
                }
                for phase in 0..sx {
                    // Padded columns px ≡ phase (mod sx) go to phase `phase`, column px / sx.
                    let first = (phase + sx - left % sx) % sx; // first x with (x + left) % sx == phase
                    if first >= w {
                        continue;
                    }
                    let start = (phase * ph + y + top) * phase_w + (first + left) / sx;
                    let dst = &mut phases[start..];
                    for (d, v) in dst.iter_mut().zip(row[first..].iter().step_by(sx)) {
                        *d = *v;
                    }
                }
            }
            let taps = &p.taps[c * kh * kw..(c + 1) * kh * kw];
            let (mul, off) = (p.multiplier[c], p.offset[c]);
            let [lo, hi] = self.clamp;
            let dst = &mut out[c * oh * ow..(c + 1) * oh * ow];
            for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
                // Blocks of 16 columns summed in registers over all taps. The last block may
                // read past the row into the slack: those sums are not stored.
                for x0 in (0..ow).step_by(DW_BLOCK) {
                    let base = oy * sy * phase_w + x0;
                    let acc = dw_block(kernel, &phases, base, &offsets, taps);
                    let n = (ow - x0).min(DW_BLOCK);
                    if let Ok(o) = <&mut [f32; DW_BLOCK]>::try_from(&mut out_row[x0..x0 + n]) {
                        // A whole block: one vector operation each.
                        for (o, a) in o.iter_mut().zip(&acc) {
                            *o = (*a as f32 * mul + off).max(lo).min(hi);
                        }
                    } else {
                        for (o, a) in out_row[x0..x0 + n].iter_mut().zip(&acc) {
                            *o = (*a as f32 * mul + off).max(lo).min(hi);
                        }
                    }
                }
            }
        }
    }
}

/// One depthwise block: `acc[i] = Σ_t taps[t] · phases[base + offsets[t] + i]`, 16 columns.
#[allow(unsafe_code)]
#[inline(always)]
fn dw_block(
    kernel: Kernel,
    phases: &[u8],
    base: usize,
    offsets: &[usize],
    taps: &[i32],
) -> [i32; DW_BLOCK] {
    let last = offsets.iter().max().map_or(0, |o| base + o + DW_BLOCK);
    assert!(last <= phases.len() && offsets.len() == taps.len());
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni {
        // SAFETY: AVX-512F with the VNNI kernel; every read is below `last`, checked above.
        return unsafe { x86::dw_block(phases.as_ptr(), base, offsets, taps) };
    }
    let _ = kernel;
    let mut acc = [0i32; DW_BLOCK];
    for (o, t) in offsets.iter().zip(taps) {
        for (a, v) in acc.iter_mut().zip(&phases[base + o..base + o + DW_BLOCK]) {
            *a += t * *v as i32;
        }
    }
    acc
}

/// `q = round_half_even(clamp(x × inv + zero, 0, 255))`, per value.
#[allow(unsafe_code)]
#[inline(always)]
fn quantize(kernel: Kernel, x: &[f32], inv: f32, zero: f32, q: &mut [u8]) {
    assert_eq!(x.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni {
        // SAFETY: the VNNI kernel is chosen only on CPUs with AVX-512F and BW; lengths equal.
        return unsafe { x86::quantize_avx512(x, inv, zero, q) };
    }
    let _ = kernel;
    quantize_portable(x, inv, zero, q);
}

/// Rounds half to even by adding and taking away 1.5 × 2^23 (plain f32 arithmetic, where
/// `round` is a libm call per value); NaN becomes 0.
#[inline(always)]
fn quantize_portable(x: &[f32], inv: f32, zero: f32, q: &mut [u8]) {
    const ROUND: f32 = 12_582_912.0;
    for (d, v) in q.iter_mut().zip(x) {
        *d = (((v * inv + zero).clamp(0.0, 255.0) + ROUND) - ROUND) as u8;
    }
}

/// One tile: `acc[m][i] = Σ_k w[k][m] · b[k][i]` for MR channels and the kernel's pixels.
#[allow(unsafe_code)]
#[inline(always)]
fn tile(kernel: Kernel, k4: usize, w: &[i8], b: &[u8], stride: usize, acc: &mut [i32]) {
    assert!(w.len() >= k4 * MR * 4 && (k4 == 0 || b.len() >= (k4 - 1) * stride + kernel.nr() * 4));
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only when the CPU has AVX-512F and VNNI; bounds asserted above.
        Kernel::Avx512Vnni => unsafe { x86::tile_vnni(k4, w.as_ptr(), b.as_ptr(), stride, acc) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: chosen only when the CPU has the dot product; bounds asserted above.
        Kernel::NeonDot => unsafe { arm::tile_sdot(k4, w.as_ptr(), b.as_ptr(), stride, acc) },
        _ => tile_portable(k4, w, b, stride, acc),
    }
}

#[inline(always)]
fn tile_portable(k4: usize, w: &[i8], b: &[u8], stride: usize, acc: &mut [i32]) {
    const NR: usize = 32;
    let acc = &mut acc[..MR * NR];
    acc.fill(0);
    for kb in 0..k4 {
        let row = &b[kb * stride..kb * stride + NR * 4];
        let wk = &w[kb * MR * 4..(kb + 1) * MR * 4];
        for (m, wm) in wk.chunks_exact(4).enumerate() {
            let [w0, w1, w2, w3] = [wm[0] as i32, wm[1] as i32, wm[2] as i32, wm[3] as i32];
            for (a, px) in acc[m * NR..(m + 1) * NR]
                .iter_mut()
                .zip(row.chunks_exact(4))
            {
                *a += px[0] as i32 * w0 + px[1] as i32 * w1 + px[2] as i32 * w2 + px[3] as i32 * w3;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::MR;
    use std::arch::x86_64::*;

    /// [`super::dw_block`]: the 16 sums in one register.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `phases` must be readable for 16 bytes at every
    /// `base + offset`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dw_block(
        phases: *const u8,
        base: usize,
        offsets: &[usize],
        taps: &[i32],
    ) -> [i32; super::DW_BLOCK] {
        let mut acc = _mm512_setzero_si512();
        for (o, t) in offsets.iter().zip(taps) {
            // SAFETY: within the bounds the caller guarantees.
            let v = unsafe { _mm_loadu_si128(phases.add(base + o) as *const __m128i) };
            let v = _mm512_cvtepu8_epi32(v);
            acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(v, _mm512_set1_epi32(*t)));
        }
        let mut out = [0i32; super::DW_BLOCK];
        // SAFETY: out holds 16 values.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, acc) };
        out
    }

    /// [`super::quantize_portable`] 16 values at a time: the same multiply, add and clamp,
    /// then the conversion's round-to-nearest-even (the default rounding mode).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and BW; `x` and `q` must have the same length.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_avx512(x: &[f32], inv: f32, zero: f32, q: &mut [u8]) {
        let whole = x.len() / 16 * 16;
        let (vi, vz) = (_mm512_set1_ps(inv), _mm512_set1_ps(zero));
        let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 ≤ whole ≤ the length of both.
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(i));
                let y = _mm512_add_ps(_mm512_mul_ps(v, vi), vz);
                // max(NaN, 0) is 0, as the portable clamp-then-cast gives.
                let y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
                let r = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(y));
                _mm_storeu_si128(q.as_mut_ptr().add(i) as *mut __m128i, r);
            }
        }
        super::quantize_portable(&x[whole..], inv, zero, &mut q[whole..]);
    }

    /// 8 channels × 32 pixels: 16 zmm accumulators, `vpdpbusd` (u8 pixels × i8 weights).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; `w` must hold `k4 × 32` bytes, `b`
    /// `(k4 − 1) × stride + 128`, `acc` 256 values.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile_vnni(k4: usize, w: *const i8, b: *const u8, stride: usize, acc: &mut [i32]) {
        let mut c = [[_mm512_setzero_si512(); 2]; MR];
        for kb in 0..k4 {
            // SAFETY: within the bounds the caller guarantees.
            unsafe {
                let row = b.add(kb * stride);
                let b0 = _mm512_loadu_si512(row as *const __m512i);
                let b1 = _mm512_loadu_si512(row.add(64) as *const __m512i);
                let wk = w.add(kb * MR * 4) as *const i32;
                for (m, cm) in c.iter_mut().enumerate() {
                    let wv = _mm512_set1_epi32(wk.add(m).read_unaligned());
                    cm[0] = _mm512_dpbusd_epi32(cm[0], b0, wv);
                    cm[1] = _mm512_dpbusd_epi32(cm[1], b1, wv);
                }
            }
        }
        for (m, cm) in c.iter().enumerate() {
            // SAFETY: acc holds MR × 32 values.
            unsafe {
                _mm512_storeu_si512(acc.as_mut_ptr().add(m * 32) as *mut __m512i, cm[0]);
                _mm512_storeu_si512(acc.as_mut_ptr().add(m * 32 + 16) as *mut __m512i, cm[1]);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod arm {
    use super::MR;
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// `acc += b · w[lane]`: four pixels' four int8 values times one channel's four weights.
    macro_rules! sdot {
        ($acc:expr, $b:expr, $w:expr, $lane:literal) => {
            asm!(
                concat!("sdot {a:v}.4s, {b:v}.16b, {w:v}.4b[", $lane, "]"),
                a = inout(vreg) $acc,
                b = in(vreg) $b,
                w = in(vreg) $w,
                options(pure, nomem, nostack)
            )
        };
    }

    /// 8 channels × 8 pixels: 16 accumulators, `sdot` (pixels flipped to i8 by − 128: the
    /// caller adds `128 × Σw` back).
    ///
    /// # Safety
    /// The CPU must have the dot-product extension; `w` must hold `k4 × 32` bytes, `b`
    /// `(k4 − 1) × stride + 32`, `acc` 64 values.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn tile_sdot(k4: usize, w: *const i8, b: *const u8, stride: usize, acc: &mut [i32]) {
        let flip = vdupq_n_u8(0x80);
        let mut c = [[vdupq_n_s32(0); 2]; MR];
        for kb in 0..k4 {
            // SAFETY: within the bounds the caller guarantees.
            unsafe {
                let row = b.add(kb * stride);
                let b0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(row), flip));
                let b1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(row.add(16)), flip));
                let w0 = vld1q_s8(w.add(kb * MR * 4));
                let w1 = vld1q_s8(w.add(kb * MR * 4 + 16));
                sdot!(c[0][0], b0, w0, "0");
                sdot!(c[0][1], b1, w0, "0");
                sdot!(c[1][0], b0, w0, "1");
                sdot!(c[1][1], b1, w0, "1");
                sdot!(c[2][0], b0, w0, "2");
                sdot!(c[2][1], b1, w0, "2");
                sdot!(c[3][0], b0, w0, "3");
                sdot!(c[3][1], b1, w0, "3");
                sdot!(c[4][0], b0, w1, "0");
                sdot!(c[4][1], b1, w1, "0");
                sdot!(c[5][0], b0, w1, "1");
                sdot!(c[5][1], b1, w1, "1");
                sdot!(c[6][0], b0, w1, "2");
                sdot!(c[6][1], b1, w1, "2");
                sdot!(c[7][0], b0, w1, "3");
                sdot!(c[7][1], b1, w1, "3");
            }
        }
        for (m, cm) in c.iter().enumerate() {
            // SAFETY: acc holds MR × 8 values.
            unsafe {
                vst1q_s32(acc.as_mut_ptr().add(m * 8), cm[0]);
                vst1q_s32(acc.as_mut_ptr().add(m * 8 + 4), cm[1]);
            }
        }
    }
}

impl Op for Q8Conv {
    fn name(&self) -> StaticName {
        "Q8Conv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}→{} {}x{} stride {:?} dilation {:?} padding {:?}, input scale {} zero {}, {} kernel",
            g.input_channels,
            g.output_channels,
            g.kernel[0],
            g.kernel[1],
            g.strides,
            g.dilations,
            g.padding,
            self.input_scale,
            self.input_zero,
            Kernel::detect().name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Q8Conv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let x = input.to_plain_array_view::<f32>()?;
        ensure!(
            x.ndim() == 4,
            "Q8Conv takes NCHW input, got shape {:?}",
            x.shape()
        );
        let (batch, h, w) = (x.shape()[0], x.shape()[2], x.shape()[3]);
        let g = &self.geometry;
        ensure!(
            x.shape()[1] == g.input_channels,
            "Q8Conv: {} input channels, expected {}",
            x.shape()[1],
            g.input_channels
        );
        let (oh, ow) = g.output_hw(h, w)?;
        let x = x.as_standard_layout();
        let x = x.as_slice().context("input is not contiguous")?;
        let kernel = Kernel::detect();
        let (per_in, per_out) = (g.input_channels * h * w, g.output_channels * oh * ow);
        // Written in place: the tensor tract gets is the buffer the kernels fill.
        let mut out = Tensor::zero::<f32>(&[batch, g.output_channels, oh, ow])?;
        {
            let mut view = out.to_plain_array_view_mut::<f32>()?;
            let dst = view.as_slice_mut().context("a new tensor is contiguous")?;
            for (image, dst) in x.chunks_exact(per_in).zip(dst.chunks_exact_mut(per_out)) {
                self.run_image(kernel, image, h, w, dst);
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Q8Conv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let fact = inputs[0];
        ensure!(
            fact.datum_type == f32::datum_type(),
            "Q8Conv takes f32 input"
        );
        ensure!(fact.rank() == 4, "Q8Conv takes NCHW input");
        ensure!(
            fact.shape[1] == self.geometry.input_channels.to_dim(),
            "Q8Conv: input has {} channels, expected {}",
            fact.shape[1],
            self.geometry.input_channels
        );
        let (h, w) = (fact.shape[2].to_usize()?, fact.shape[3].to_usize()?);
        let (oh, ow) = self.geometry.output_hw(h, w)?;
        let shape = [
            fact.shape[0].clone(),
            self.geometry.output_channels.to_dim(),
            oh.into(),
            ow.into(),
        ];
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let out = self.output_facts(inputs)?;
        let macs = out[0].shape.iter().product::<TDim>() * self.geometry.depth();
        Ok(tvec!((Cost::FMA(i8::datum_type()), macs)))
    }
}

/// NNEF parameters of `neo_q8_conv`.
fn parameters() -> Vec<Parameter> {
    vec![
        TypeName::Scalar.tensor().named("input"),
        TypeName::Integer.tensor().named("weights"),
        TypeName::Scalar.tensor().named("weight_scales"),
        TypeName::Scalar.tensor().named("bias"),
        TypeName::Integer.array().named("kernel"),
        TypeName::Integer.array().named("strides"),
        TypeName::Integer.array().named("dilations"),
        TypeName::Integer.array().named("padding"),
        TypeName::Scalar.named("input_scale"),
        TypeName::Integer.named("input_zero"),
        TypeName::Integer.named("group").default(1),
        TypeName::Scalar.array().named("clamp"),
    ]
}

fn dump(ast: &mut IntoAst, node: &TypedNode, op: &Q8Conv) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    let weights = ast.konst_variable(format!("{}.weights", node.name), &op.weights)?;
    let scales = ast.konst_variable(format!("{}.weight_scales", node.name), &op.weight_scales)?;
    let bias = ast.konst_variable(format!("{}.bias", node.name), &op.bias)?;
    let g = &op.geometry;
    Ok(Some(invocation(
        PRIMITIVE,
        &[input, weights, scales, bias],
        &[
            ("kernel", ints(&g.kernel)),
            ("strides", ints(&g.strides)),
            ("dilations", ints(&g.dilations)),
            ("padding", ints(&g.padding)),
            ("input_scale", numeric(op.input_scale)),
            ("input_zero", numeric(op.input_zero)),
            ("group", numeric(g.group)),
            ("clamp", tract_nnef::ser::array(op.clamp.map(numeric))),
        ],
    )))
}

fn load(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = invocation.named_arg_as(builder, "input")?;
    let weights: Arc<Tensor> = invocation.named_arg_as(builder, "weights")?;
    let weight_scales: Arc<Tensor> = invocation.named_arg_as(builder, "weight_scales")?;
    let bias: Arc<Tensor> = invocation.named_arg_as(builder, "bias")?;
    let pair = |name: &str, v: TVec<usize>| -> TractResult<[usize; 2]> {
        ensure!(
            v.len() == 2,
            "neo_q8_conv: {name} needs 2 values, got {v:?}"
        );
        Ok([v[0], v[1]])
    };
    let kernel = pair("kernel", invocation.named_arg_as(builder, "kernel")?)?;
    let strides = pair("strides", invocation.named_arg_as(builder, "strides")?)?;
    let dilations = pair("dilations", invocation.named_arg_as(builder, "dilations")?)?;
    let padding: TVec<usize> = invocation.named_arg_as(builder, "padding")?;
    ensure!(
        padding.len() == 4,
        "neo_q8_conv: padding needs 4 values, got {padding:?}"
    );
    let input_scale: f32 = invocation.named_arg_as(builder, "input_scale")?;
    let input_zero: i64 = invocation.named_arg_as(builder, "input_zero")?;
    let input_zero = u8::try_from(input_zero)
        .map_err(|_| format_err!("neo_q8_conv: input_zero {input_zero} is not in 0..=255"))?;
    let shape = weights.shape().to_vec();
    ensure!(
        shape.len() == 4,
        "neo_q8_conv: weights must be OIHW, got shape {shape:?}"
    );
    let group: i64 = invocation.named_arg_as(builder, "group")?;
    let group = usize::try_from(group)
        .ok()
        .filter(|g| *g > 0)
        .ok_or_else(|| format_err!("neo_q8_conv: group {group} must be positive"))?;
    let geometry = Geometry {
        input_channels: shape[1] * group,
        output_channels: shape[0],
        group,
        kernel,
        strides,
        dilations,
        padding: [padding[0], padding[1], padding[2], padding[3]],
    };
    ensure!(
        kernel == [shape[2], shape[3]],
        "neo_q8_conv: kernel {kernel:?} vs weights {shape:?}"
    );
    let clamp: TVec<f32> = invocation.named_arg_as(builder, "clamp")?;
    ensure!(
        clamp.len() == 2,
        "neo_q8_conv: clamp needs 2 values, got {clamp:?}"
    );
    let op = Q8Conv::new(
        geometry,
        input_scale,
        input_zero,
        weights,
        weight_scales,
        bias,
    )?
    .with_clamp(clamp[0], clamp[1])?;
    builder.wire(op, &[input])
}

/// neo's NNEF operators (today `neo_q8_conv`).
pub fn registry() -> Registry {
    let mut registry = Registry::new("neo")
        .with_doc("neo's operators: int8 convolution with f32 input and output (neo_q8_conv).");
    registry.register_dumper(dump);
    registry.register_primitive(
        PRIMITIVE,
        &parameters(),
        &[("output", TypeName::Scalar.tensor())],
        load,
    );
    registry
}

/// The NNEF framework artifacts are read and written with: tract's core operators, the ONNX
/// extensions, and neo's.
pub fn nnef() -> tract_nnef::framework::Nnef {
    use tract_onnx_opl::WithOnnx;
    tract_nnef::nnef().with_onnx().with_registry(registry())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference convolution on the dequantized values, in f64.
    fn reference(op: &Q8Conv, x: &[f32], h: usize, w: usize) -> Vec<f32> {
        let g = &op.geometry;
        let (oh, ow) = g.output_hw(h, w).unwrap();
        let wq = op.weights.to_plain_array_view::<i8>().unwrap();
        let ws = op.weight_scales.to_plain_array_view::<f32>().unwrap();
        let bias = op.bias.to_plain_array_view::<f32>().unwrap();
        let q = |v: f32| {
            // As the operator defines it: times the reciprocal of the scale, ties to even.
            ((v * (1.0 / op.input_scale) + op.input_zero as f32)
                .round_ties_even()
                .clamp(0.0, 255.0) as f64
                - op.input_zero as f64)
                * op.input_scale as f64
        };
        let mut out = vec![0f32; g.output_channels * oh * ow];
        for co in 0..g.output_channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = bias[co] as f64;
                    let per_group = g.input_channels / g.group;
                    let first = co / (g.output_channels / g.group) * per_group;
                    for (cw, ci) in (first..first + per_group).enumerate() {
                        for ky in 0..g.kernel[0] {
                            for kx in 0..g.kernel[1] {
                                let iy = (oy * g.strides[0] + ky * g.dilations[0]) as isize
                                    - g.padding[0] as isize;
                                let ix = (ox * g.strides[1] + kx * g.dilations[1]) as isize
                                    - g.padding[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let v = x[(ci * h + iy as usize) * w + ix as usize];
                                s += q(v) * wq[[co, cw, ky, kx]] as f64 * ws[co] as f64;
                            }
                        }
                    }
                    out[(co * oh + oy) * ow + ox] = s as f32;
                }
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    fn conv(g: Geometry, zero: u8, seed: u64) -> Q8Conv {
        let mut s = seed;
        let n = g.output_channels * g.input_channels / g.group * g.kernel[0] * g.kernel[1];
        let w: Vec<i8> = (0..n)
            .map(|_| (lcg(&mut s) * 127.0).round() as i8)
            .collect();
        let weights = Tensor::from_shape(
            &[
                g.output_channels,
                g.input_channels / g.group,
                g.kernel[0],
                g.kernel[1],
            ],
            &w,
        )
        .unwrap();
        let scales: Vec<f32> = (0..g.output_channels)
            .map(|_| 0.01 + lcg(&mut s).abs() * 0.02)
            .collect();
        let bias: Vec<f32> = (0..g.output_channels).map(|_| lcg(&mut s)).collect();
        Q8Conv::new(
            g,
            0.02,
            zero,
            weights.into_arc_tensor(),
            tensor1(&scales).into_arc_tensor(),
            tensor1(&bias).into_arc_tensor(),
        )
        .unwrap()
    }

    fn geometries() -> Vec<Geometry> {
        let g = |cin, cout, k: usize, s: usize, d: usize, pad: [usize; 4]| Geometry {
            input_channels: cin,
            output_channels: cout,
            group: 1,
            kernel: [k, k],
            strides: [s, s],
            dilations: [d, d],
            padding: pad,
        };
        vec![
            g(16, 24, 1, 1, 1, [0; 4]),      // pointwise, channels not a multiple of 8
            g(3, 10, 3, 2, 1, [0, 0, 1, 1]), // a stem: 27 rows (not a multiple of 4), odd padding
            g(13, 9, 3, 1, 1, [1; 4]),       // padded 3x3
            g(5, 7, 3, 1, 2, [2; 4]),        // dilated
            depthwise(8, 3, 1, 1, [1; 4]),
            depthwise(6, 3, 2, 1, [0, 0, 1, 1]), // EfficientNet's stride-2 padding
            depthwise(5, 5, 2, 1, [2; 4]),
            depthwise(4, 3, 1, 2, [2, 1, 2, 1]), // dilated, uneven padding
        ]
    }

    fn depthwise(c: usize, k: usize, s: usize, d: usize, pad: [usize; 4]) -> Geometry {
        Geometry {
            input_channels: c,
            output_channels: c,
            group: c,
            kernel: [k, k],
            strides: [s, s],
            dilations: [d, d],
            padding: pad,
        }
    }

    #[test]
    fn int8_convolution_matches_the_dequantized_reference() {
        for (i, g) in geometries().into_iter().enumerate() {
            for zero in [0u8, 128] {
                let op = conv(g, zero, i as u64 + 7);
                let (h, w) = (11, 9);
                let mut s = 99 + i as u64;
                // Values past the quantization range too: they must clamp, not wrap.
                let x: Vec<f32> = (0..g.input_channels * h * w)
                    .map(|_| lcg(&mut s) * 3.0)
                    .collect();
                let expected = reference(&op, &x, h, w);
                let (oh, ow) = g.output_hw(h, w).unwrap();
                let mut out = vec![0f32; g.output_channels * oh * ow];
                for kernel in [Kernel::Portable, Kernel::detect()] {
                    op.run_image(kernel, &x, h, w, &mut out);
                    for (a, b) in out.iter().zip(&expected) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{g:?} zero {zero} kernel {kernel:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn squeezenet_sized_layers_match_the_reference() {
        let g = |cin, cout, k: usize, pad: usize| Geometry {
            input_channels: cin,
            output_channels: cout,
            group: 1,
            kernel: [k, k],
            strides: [1, 1],
            dilations: [1, 1],
            padding: [pad; 4],
        };
        for (i, g) in [g(64, 16, 1, 0), g(16, 64, 3, 1)].into_iter().enumerate() {
            let op = conv(g, 0, 40 + i as u64);
            let (h, w) = (55, 55);
            let mut s = 7;
            let x: Vec<f32> = (0..g.input_channels * h * w)
                .map(|_| lcg(&mut s).abs() * 4.0)
                .collect();
            let expected = reference(&op, &x, h, w);
            let mut out = vec![0f32; expected.len()];
            op.run_image(Kernel::detect(), &x, h, w, &mut out);
            for (j, (a, b)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{g:?} at {j}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn a_folded_relu6_clamps_the_output() {
        let g = geometries()[2];
        let op = conv(g, 0, 5);
        let (h, w) = (9, 8);
        let mut s = 17;
        let x: Vec<f32> = (0..g.input_channels * h * w)
            .map(|_| lcg(&mut s) * 2.0)
            .collect();
        let expected = reference(&op, &x, h, w);
        let clamped = op.clone().with_clamp(0.0, 0.6).unwrap();
        let mut out = vec![0f32; expected.len()];
        clamped.run_image(Kernel::detect(), &x, h, w, &mut out);
        assert!(expected.iter().any(|v| *v < 0.0) && expected.iter().any(|v| *v > 0.6));
        for (a, b) in out.iter().zip(&expected) {
            assert!((a - b.clamp(0.0, 0.6)).abs() <= 1e-4, "{a} vs {b}");
        }
        assert!(op.with_clamp(1.0, 0.0).is_err());
    }

    #[test]
    fn a_geometry_out_of_range_is_refused() {
        let mut g = geometries()[2];
        g.padding = [1 << 30, 0, 0, 0];
        let err = Q8Conv::new(
            g,
            0.1,
            0,
            conv(geometries()[2], 0, 1).weights,
            tensor1(&[1f32; 9]).into_arc_tensor(),
            tensor1(&[0f32; 9]).into_arc_tensor(),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("out of range"), "{err}");
    }

    #[test]
    fn kernels_agree_bit_for_bit() {
        // What the device runs is what the compiler's gate measured, whichever kernel it has.
        // (The log shows which kernel this CPU got: the check is only as good as that.)
        eprintln!("q8 kernel on this CPU: {}", Kernel::detect().name());
        for g in [geometries()[2], geometries()[5]] {
            let op = conv(g, 128, 3);
            let (h, w) = (17, 23);
            let mut s = 5;
            let x: Vec<f32> = (0..g.input_channels * h * w).map(|_| lcg(&mut s)).collect();
            let (oh, ow) = g.output_hw(h, w).unwrap();
            let mut a = vec![0f32; g.output_channels * oh * ow];
            let mut b = a.clone();
            op.run_image(Kernel::Portable, &x, h, w, &mut a);
            op.run_image(Kernel::detect(), &x, h, w, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{:?} differs from portable on {g:?}",
                Kernel::detect()
            );
        }
    }

    #[test]
    fn quantization_is_the_same_on_every_path() {
        // Ties, NaN, infinities and values out of range, then a long random run.
        let mut x = vec![
            0.5,
            1.5,
            2.5,
            -0.5,
            254.5,
            255.5,
            f32::NAN,
            f32::INFINITY,
            -1e9,
            3.0,
        ];
        let mut s = 3;
        x.extend((0..1000).map(|_| lcg(&mut s) * 300.0));
        let (mut a, mut b) = (vec![0u8; x.len()], vec![0u8; x.len()]);
        quantize_portable(&x, 1.0, 0.0, &mut a);
        quantize(Kernel::detect(), &x, 1.0, 0.0, &mut b);
        assert_eq!(a, b);
        assert_eq!(a[..10], [0, 2, 2, 0, 254, 255, 0, 255, 0, 3]);
    }

    #[test]
    fn writes_to_nnef_and_reads_back() {
        // A plain convolution (stride 2, odd padding) and a depthwise one.
        for (g, out_shape) in [
            (geometries()[1], [1, 10, 6, 5]),
            (geometries()[5], [1, 6, 6, 5]),
        ] {
            let op = conv(g, 0, 11);
            let c = g.input_channels;
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([1, c, 12, 10])).unwrap();
            let y = model.wire_node("conv", op.clone(), &[x]).unwrap();
            model.select_output_outlets(&y).unwrap();
            let nnef = nnef();
            let mut tar = Vec::new();
            nnef.write_to_tar(&model, &mut tar).unwrap();
            let back = nnef
                .model_for_read(&mut std::io::Cursor::new(&tar))
                .unwrap();
            let read = back
                .nodes()
                .iter()
                .find_map(|n| n.op_as::<Q8Conv>())
                .expect("the operator survives the round trip");
            assert_eq!(read, &op);
            let mut s = 1;
            let input: Vec<f32> = (0..c * 12 * 10).map(|_| lcg(&mut s)).collect();
            let input = Tensor::from_shape(&[1, c, 12, 10], &input).unwrap();
            let run = |m: TypedModel| {
                m.into_optimized()
                    .unwrap()
                    .into_runnable()
                    .unwrap()
                    .run(tvec!(input.clone().into()))
                    .unwrap()
            };
            let (a, b) = (run(model), run(back));
            assert_eq!(a[0].shape(), out_shape);
            assert_eq!(*a[0], *b[0]);
        }
    }
}
